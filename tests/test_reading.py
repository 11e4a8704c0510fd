"""Views answered from a bare log: `reading.SessionReader` with `reading.NO_WRITES`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from events.catalogue import TaskStarted, WorkerReady, WorkerSpawned
from events.store import EventLog
from orchestrator import Orchestrator, views
from orchestrator.processes import host_id, start_time
from orchestrator.reading import NO_WRITES, SessionReader
from tests.chat import ChatServer
from tests.ui_session import SESSION, record, view_queries


def rows(found: list[Any]) -> list[Any]:
    return [r.model_dump(mode="json") for r in found]


def test_every_view_from_a_bare_log_equals_task_list_and_appends_nothing(
    tmp_path: Path, chat_server: ChatServer
) -> None:
    """Every view, `workers` and `registry` included, gives the rows `task_list` gives: the
    recording stopped its processes and ended its tasks, so there is nothing for an
    orchestrator to settle first (where there is, they differ: see the next test)."""
    rec = record(f"sqlite:///{tmp_path / 'events.db'}", chat_server)
    whatif_file = tmp_path / "whatif.toml"
    whatif_file.write_text('model = "lab/small"\n')
    queries = view_queries(rec, whatif_file)
    log = EventLog(rec.url, create=False)
    head = log.head()
    reader = SessionReader(rec.config, log, SESSION)
    read = [rows(views.run(view, reader, NO_WRITES, **filters)) for view, filters in queries]
    assert log.head() == head
    with Orchestrator.open(config=rec.config, store=rec.url, session_id=SESSION) as orch:
        for (view, filters), got in zip(queries, read, strict=True):
            assert got == rows(orch.task_list(view, **filters)), (view, filters)
            assert got, (view, filters)
    log.close()


def test_a_reader_shows_what_an_orchestrator_would_settle_as_the_log_has_it(
    tmp_path: Path,
) -> None:
    """A task whose owning process is gone and a worker process that died unrecorded: the
    reader shows both as recorded (running) and appends nothing; `task_list` ends the task
    and records the process's end first. This is where the two legitimately differ."""
    url = f"sqlite:///{tmp_path / 'events.db'}"
    config = {"profiles": {"coder": {"backend": "server"}}}
    gone = subprocess.Popen(["sleep", "30"])
    started = start_time(gone.pid)
    gone.kill()
    gone.wait(timeout=10)
    owner = {"host": host_id(), "pid": gone.pid, "pid_started_at": started}
    with Orchestrator.open(config=config, store=url, session_id=SESSION) as orch:
        spec = orch.worker_spec("coder", orch.session_decision("coder"))
        ids = {"session_id": SESSION, "worker_id": "coder"}
        orch.record(
            TaskStarted(**ids, task_id="t-orphan", kind="worker", **owner),
            WorkerSpawned(
                **ids,
                instance_id="coder-dead",
                backend="server",
                **owner,
                url="http://127.0.0.1:9",
                fingerprint=spec.fingerprint,
                model=spec.model,
                model_policy=spec.model_policy,
            ),
            WorkerReady(**ids, instance_id="coder-dead"),
        )
    log = EventLog(url, create=False)
    head = log.head()
    reader = SessionReader(config, log, SESSION)
    tasks = views.run("tasks", reader, NO_WRITES)
    coder = [w for w in views.run("workers", reader, NO_WRITES) if w.worker_id == "coder"]
    assert [t.status for t in tasks] == ["running"]
    assert [(w.status, w.instance_id) for w in coder] == [("ready", "coder-dead")]
    assert log.head() == head
    with Orchestrator.open(config=config, store=url, session_id=SESSION) as orch:
        assert [t.status for t in orch.task_list("tasks")] == ["failed"]
        coder = [w for w in orch.task_list("workers") if w.worker_id == "coder"]
        assert [(w.status, w.instance_id) for w in coder] == [("not_running", None)]
    assert log.head() > head
    log.close()
