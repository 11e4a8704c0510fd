"""The event log itself: upcasting old versions, atomic multi-stream appends, conflicts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psycopg
import pytest
from eventsourcing.persistence import StoredEvent
from psycopg import sql

from events import EventLog, StreamConflict, replay
from events.catalogue import MemoryPut, SessionOpened
from orchestrator import Orchestrator
from tests.conftest import POSTGRES_URL, postgres_schema
from tests.helpers import config_with, run


def test_a_v1_model_set_written_by_an_old_release_is_read_as_a_sticky_override() -> None:
    log = EventLog("memory")
    v1 = {
        "version": 1,
        "session_id": "old",
        "worker_id": "coder",
        "task_id": None,
        "timestamp": "2026-01-01T00:00:00Z",
        "model_ref": "local/echo-small",
        "resolved_model": "local/echo-small",
    }
    # What release 1 wrote: no model_policy, no reason.
    log._recorder.insert_events(
        [StoredEvent("session:old", 1, "WorkerModelSet", json.dumps(v1).encode())]
    )
    with Orchestrator.open(config=config_with(), store=log, session_id="old") as orch:
        assert run(orch, "coder", "hi").response == "[local/echo-small] hi"
        override = orch.session.refresh().overrides["coder"]
        assert override.model_policy == "sticky"
    record = log.records(types=["WorkerModelSet"])[0]
    assert record.data["version"] == 2
    assert replay(log).sessions["old"].overrides["coder"].model_policy == "sticky"


def test_appends_to_several_streams_land_together_or_not_at_all() -> None:
    log = EventLog("memory")
    opened = SessionOpened(session_id="a", resumed=False, host="h", pid=1)
    note = MemoryPut(session_id="a", key="k", value="v")
    log.append("session:a", [opened], 0)
    with pytest.raises(StreamConflict):
        # The session stream is at 1 already: the memory half must not land either.
        log.append_batches([("memory", [note], 0), ("session:a", [opened], 0)])
    assert log.read_stream("memory") == []
    assert [p for p, _ in log.read_log()] == [1]


def test_event_lines_are_structlog_lines_when_logging_is_on() -> None:
    import logging

    from structlog.testing import capture_logs

    events_logger = logging.getLogger("orchestrator.events")
    before = events_logger.level
    events_logger.setLevel(logging.INFO)
    try:
        with (
            capture_logs() as lines,
            Orchestrator.open(config=config_with(), store="memory", session_id="logged") as orch,
        ):
            orch.task_start(
                kind="op", op="worker.model.set", worker={"worker_id": "coder", "model": "auto"}
            )
    finally:
        events_logger.setLevel(before)
    assert [(x["event"], x["position"], x["stream"]) for x in lines[:3]] == [
        ("SessionOpened", 1, "session:logged"),
        ("TaskStarted", 2, "session:logged"),
        ("WorkerModelSet", 3, "session:logged"),
    ]
    assert lines[1]["args"] == "..." and lines[1]["log_level"] == "info"
    assert lines[2]["resolved_model"] == "local/echo-large"


def test_without_logging_no_line_is_built_and_structlog_is_not_imported() -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from orchestrator import Orchestrator\n"
        "with Orchestrator.open(store='memory') as o:\n"
        "    o.task_start(kind='op', op='memory.put', memory={'key': 'k', 'value': 'v'})\n"
        "print('structlog' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


def test_cli_verbose_prints_one_json_line_per_event(tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("orchestrator"))
    url = f"sqlite:///{tmp_path / 'v.db'}"
    out = subprocess.run(
        [exe, "-v", "--store", url, "set-model", "coder", "local/echo-small"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [x["event"] for x in lines] == [
        "SessionOpened",
        "TaskStarted",
        "WorkerModelSet",
        "TaskCompleted",
    ]
    assert all(x["timestamp"].endswith("Z") and x["stream"] == "session:cli" for x in lines)
    assert [x["position"] for x in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("topic", "extra", "says"),
    [
        ("WorkerTeleported", {}, "which this version does not know"),
        ("TaskCancelled", {"flux": 1}, "does not match this version's schema: flux"),
    ],
)
def test_an_event_this_version_cannot_read_is_one_clear_store_error(
    topic: str, extra: dict[str, object], says: str
) -> None:
    from events.store import StoreError

    log = EventLog("memory")
    data = {"version": 1, "session_id": "s", "timestamp": "2026-01-01T00:00:00Z", **extra}
    log._recorder.insert_events([StoredEvent("session:s", 1, topic, json.dumps(data).encode())])
    with pytest.raises(StoreError, match=says):
        list(log.read_log())
    log.close()


# --- opening to read, and one channel per store ---------------------------------------------


def test_opening_to_read_where_there_is_no_store_makes_nothing(tmp_path: Path) -> None:
    from events.store import NoStore

    where = tmp_path / "here"
    where.mkdir()
    url = f"sqlite:///{where / 'typo.db'}"
    with pytest.raises(NoStore, match=f"^no orchestrator store at {re.escape(url)}$"):
        EventLog(url, create=False)
    assert list(where.iterdir()) == []
    EventLog(url).close()  # made by a writer: now it opens to read
    EventLog(url, create=False).close()


def test_opening_to_read_an_empty_postgresql_schema_makes_nothing() -> None:
    from events.store import NoStore

    with postgres_schema() as url:
        schema = url.rsplit("schema=", 1)[1]
        with pytest.raises(NoStore, match=r"^no orchestrator store at postgresql://"):
            EventLog(url, create=False)
        assert schema_objects(schema) == {}


def schema_objects(schema: str) -> dict[str, list[str]]:
    """What a PostgreSQL schema holds (the schema itself, tables, types, functions)."""
    queries = {
        "schema": "SELECT schema_name FROM information_schema.schemata WHERE schema_name = %s",
        "tables": "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        "types": "SELECT user_defined_type_name FROM information_schema.user_defined_types "
        "WHERE user_defined_type_schema = %s",
        "routines": "SELECT routine_name FROM information_schema.routines "
        "WHERE routine_schema = %s",
    }
    found: dict[str, list[str]] = {}
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for what, query in queries.items():
            rows = [r[0] for r in conn.execute(query, (schema,)).fetchall()]
            if rows:
                found[what] = rows
    return found


def test_a_postgresql_store_notifies_only_its_own_listeners() -> None:
    with postgres_schema() as url_a, postgres_schema() as url_b:
        a, b = EventLog(url_a), EventLog(url_b)
        try:
            assert a.notify_channel != b.notify_channel
            with psycopg.connect(POSTGRES_URL, autocommit=True) as listener:
                listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(str(a.notify_channel))))
                b.append(
                    "session:b", [SessionOpened(session_id="b", resumed=False, host="h", pid=1)], 0
                )
                # Deadline-bounded: B's append must not reach A's listener at all.
                assert list(listener.notifies(timeout=2, stop_after=1)) == []
                a.append(
                    "session:a", [SessionOpened(session_id="a", resumed=False, host="h", pid=1)], 0
                )
                assert len(list(listener.notifies(timeout=30, stop_after=1))) == 1
        finally:
            a.close()
            b.close()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_an_unreadable_event_after_readable_ones_is_named_by_its_position(
    store: str, tmp_path: Path
) -> None:
    from events.store import StoreError

    log = EventLog("memory" if store == "memory" else f"sqlite:///{tmp_path / 'e.db'}")
    log.append("memory", [MemoryPut(session_id="s", key="k", value="v", tags=[])], 0)
    bad = {"version": 1, "session_id": "s", "timestamp": "2026-01-01T00:00:00Z", "flux": 1}
    log._recorder.insert_events(
        [StoredEvent("session:s", 1, "TaskCancelled", json.dumps(bad).encode())]
    )
    assert [p for p, _ in log.select(limit=1)] == [1]  # read one by one: stops before it
    with pytest.raises(StoreError, match="the event at position 2 "):
        list(log.read_log())
    with pytest.raises(StoreError, match="the event at position 2 "):
        replay(log)
    log.close()


def test_replay_leaves_the_cycle_collector_as_it_found_it() -> None:
    import gc

    from events.store import StoreError

    log = EventLog("memory")
    log.append("memory", [MemoryPut(session_id="s", key="k", value="v", tags=[])], 0)
    assert gc.isenabled()
    assert replay(log).position == 1
    assert gc.isenabled()
    gc.disable()
    try:
        replay(log)
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()
    log._recorder.insert_events([StoredEvent("session:s", 1, "WorkerTeleported", b"{}")])
    with pytest.raises(StoreError, match="does not know"):
        replay(log)
    assert gc.isenabled()  # also when the replay fails
    log.close()
