"""Worker processes you can trust: identity, credentials, respawn, lifecycle, owners, cancel.

Real worker processes and local OpenAI-protocol servers throughout; each test asserts what a
user sees: which server got the request and with which key, the task's status and error,
`ps`-level liveness, the registry's status and the events with their reasons.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from events.catalogue import WorkerExited, WorkerSpawnFailed
from orchestrator import Orchestrator
from orchestrator.config import OrchestratorConfig, load_config
from orchestrator.processes import worker_token
from orchestrator.worker_env import TOKEN_ENV
from tests.chat import ChatServer, Reply
from tests.conftest import OpenOrch, worker_processes
from tests.helpers import config_with, lab_config, op, run, set_model, wait_for

ROOT = Path(__file__).parent.parent


@pytest.fixture
def store(tmp_path: Path) -> str:
    """These tests are about processes, not stores: one SQLite file each (the store matrix
    runs in test_server_workers)."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def events_of(orch: Orchestrator, type_: str, **filters: Any) -> list[dict[str, Any]]:
    return [
        e.data | {"session_id": e.session_id, "task_id": e.task_id, "worker_id": e.worker_id}
        for e in orch.task_list(view="events", type=type_, **filters)
    ]


def served(orch: Orchestrator, task_id: str) -> dict[str, Any]:
    return events_of(orch, "TaskCompleted", task_id=task_id)[0]


def status_of(orch: Orchestrator, instance_id: str) -> str:
    return {e.instance_id: e.status for e in orch.task_list(view="registry")}[instance_id]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- identity: the fingerprint covers where a request goes ------------------------------------


def test_a_changed_base_url_is_never_served_by_the_old_process(
    open_orch: OpenOrch, chat_server: ChatServer, chat_server_b: ChatServer
) -> None:
    first = open_orch(config=lab_config(chat_server.port), session_id="a")
    rec = run(first, "coder", "one")
    assert rec.status == "completed", rec.error
    old_pid = served(first, rec.task_id)["pid"]
    # Same provider name, another endpoint (Ollama -> vLLM, say).
    second = open_orch(config=lab_config(chat_server_b.port), session_id="b")
    rec = run(second, "coder", "two")
    assert rec.status == "completed", rec.error
    assert [r.body["messages"][-1]["content"] for r in chat_server.requests] == ["one"]
    assert [r.body["messages"][-1]["content"] for r in chat_server_b.requests] == ["two"]
    assert served(second, rec.task_id)["pid"] != old_pid
    rejected = events_of(second, "WorkerReuseRejected", session_id="b")
    assert [r["reason"] for r in rejected] == ["provider_mismatch"]
    assert "providers.lab.base_url" in rejected[0]["detail"]
    assert str(chat_server_b.port) in rejected[0]["detail"]
    expl = second.task_list(view="explain", task_id=rec.task_id)[0]
    assert any("provider_mismatch" in line for line in expl.summary)


def test_a_mismatch_is_recorded_once_not_on_every_task(
    open_orch: OpenOrch, chat_server: ChatServer, chat_server_b: ChatServer
) -> None:
    open_orch(config=lab_config(chat_server.port), session_id="a")
    assert run(open_orch(config=lab_config(chat_server.port)), "coder", "x").status == "completed"
    other = open_orch(config=lab_config(chat_server_b.port), session_id="b")
    for text in ("1", "2", "3"):
        assert run(other, "coder", text).status == "completed"
    assert len(events_of(other, "WorkerReuseRejected")) == 1


# --- credentials: per request, never in the worker's environment -------------------------------


@pytest.mark.parametrize("backend", ["server", "agent"])
def test_keys_travel_with_each_request_and_rotation_takes_effect(
    open_orch: OpenOrch,
    chat_server: ChatServer,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    cfg = lab_config(chat_server.port, backend=backend, api_key_env="LAB_KEY")  # type: ignore[arg-type]
    orch = open_orch(config=cfg)
    monkeypatch.setenv("LAB_KEY", "key-one")
    first = run(orch, "coder", "a")
    assert first.status == "completed", first.error
    monkeypatch.setenv("LAB_KEY", "key-two")
    second = run(orch, "coder", "b")
    assert second.status == "completed", second.error
    assert chat_server.auth == ["Bearer key-one", "Bearer key-two"]
    assert served(orch, first.task_id)["instance_id"] == served(orch, second.task_id)["instance_id"]

    monkeypatch.delenv("LAB_KEY")
    third = run(orch, "coder", "c")
    assert third.status == "failed"
    assert third.error == 'Provider "lab" needs an API key: set LAB_KEY.'
    assert len(chat_server.requests) == 2

    if backend == "server":
        pid = served(orch, first.task_id)["pid"]
        env = psutil.Process(pid).environ()
        assert "LAB_KEY" not in env
        assert not any("key-one" in v or "key-two" in v for v in env.values())
        assert not any("key-" in part for part in psutil.Process(pid).cmdline())
    dumped = json.dumps([e.model_dump(mode="json") for e in orch.task_list(view="events")])
    assert "key-one" not in dumped and "key-two" not in dumped


def test_a_worker_starts_with_an_allow_listed_environment(
    open_orch: OpenOrch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    monkeypatch.setenv("SOME_TOKEN", "nope")
    orch = open_orch(config=config_with("server"))
    spawned = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    env = psutil.Process(spawned["pid"]).environ()
    assert "OPENAI_API_KEY" not in env and "SOME_TOKEN" not in env
    assert TOKEN_ENV in env  # its own token only, readable by this user alone
    assert "PATH" in env


# --- respawn: never fails a task of any session -------------------------------------------------


def _two_model_lab(port: int, **provider: Any) -> OrchestratorConfig:
    return lab_config(port, models=("big", "small"), **provider)


def test_respawn_by_one_session_does_not_touch_a_process_another_session_uses(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    cfg = _two_model_lab(chat_server.port)
    a = open_orch(config=cfg, session_id="a")
    b = open_orch(config=cfg, session_id="b")
    warm = run(a, "coder", "warm")
    assert warm.status == "completed", warm.error
    shared = served(a, warm.task_id)
    chat_server.script = [Reply(delay=2.0)]
    slow = b.task_start(kind="worker", worker_id="coder", task="five second job")
    wait_for(lambda: len(chat_server.requests) == 2)

    result = set_model(a, "coder", "lab/small", respawn=True)
    assert result.status == "completed", result.error
    assert result.result["respawned"] is True

    rec = b.task_await(slow.task_id, timeout=30)
    assert rec.status == "completed", rec.error
    assert rec.response == "big says five second job"
    # Session b used it too, so it stays for b; nothing drained, nothing stopped.
    assert alive(shared["pid"])
    assert status_of(a, shared["instance_id"]) == "ready"
    assert events_of(a, "WorkerDraining") == [] and events_of(a, "WorkerStopped") == []
    small = run(a, "coder", "next")
    assert small.response == "small says next"
    assert served(a, small.task_id)["instance_id"] != shared["instance_id"]


def test_respawn_drains_a_process_only_this_session_used_and_its_task_finishes(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    cfg = _two_model_lab(chat_server.port)
    a = open_orch(config=cfg, session_id="a")
    first = run(a, "coder", "warm")
    old = served(a, first.task_id)
    chat_server.script = [Reply(delay=2.0)]
    slow = a.task_start(kind="worker", worker_id="coder", task="in flight")
    wait_for(lambda: len(chat_server.requests) == 2)

    assert set_model(a, "coder", "lab/small", respawn=True).status == "completed"
    assert status_of(a, old["instance_id"]) == "draining"
    assert alive(old["pid"])
    rec = a.task_await(slow.task_id, timeout=30)
    assert rec.status == "completed", rec.error
    assert rec.response == "big says in flight"
    wait_for(lambda: not alive(old["pid"]))
    wait_for(lambda: status_of(a, old["instance_id"]) == "stopped")
    stops = events_of(a, "WorkerStopped")
    assert [(s["instance_id"], s["reason"]) for s in stops] == [(old["instance_id"], "respawn")]


# --- slow and failing providers fail the task, never the process ----------------------------------


def test_a_slow_provider_fails_the_task_and_leaves_the_process_ready(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    chat_server.delay = 3.0
    orch = open_orch(config=lab_config(chat_server.port, timeout=0.5, max_retries=0))
    rec = run(orch, "coder", "slow")
    assert rec.status == "failed"
    assert rec.error == 'Provider "lab" for model "slow" timed out after 0.5 s'
    spawned = events_of(orch, "WorkerSpawned")[0]
    assert alive(spawned["pid"])
    assert status_of(orch, spawned["instance_id"]) == "ready"
    assert events_of(orch, "WorkerExited") == []
    result = op(orch, "worker.stop", worker={"worker_id": "coder"}).result
    assert result["stopped"] == [spawned["instance_id"]]
    wait_for(lambda: not alive(spawned["pid"]))


def test_provider_errors_keep_the_status_and_message_and_5xx_is_retried(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    orch = open_orch(config=lab_config(chat_server.port, max_retries=2))
    chat_server.script = [Reply(status=500, error="upstream exploded")] * 3
    rec = run(orch, "coder", "x")
    assert rec.status == "failed"
    assert "HTTP 500" in str(rec.error) and "upstream exploded" in str(rec.error)
    assert "after 3 attempts" in str(rec.error)
    assert len(chat_server.requests) == 3

    chat_server.script = [Reply(status=401, error="invalid api key")]
    rec = run(orch, "coder", "y")
    assert rec.error == 'Provider "lab" for model "slow" answered HTTP 401: invalid api key'
    assert len(chat_server.requests) == 4  # a 4xx the request caused is not retried

    chat_server.script = [Reply(status=429, error="slow down", retry_after="0.2")]
    rec = run(orch, "coder", "z")
    assert rec.status == "completed", rec.error
    gap = chat_server.requests[-1].at - chat_server.requests[-2].at
    assert gap >= 0.2  # Retry-After was honoured


def test_stop_stops_a_live_process_whatever_its_recorded_status(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    spawned = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    # A wrong record (as the old slow-provider bug wrote): exited, yet the process runs.
    orch.pool.registry.append(
        [
            WorkerExited(
                session_id="x", worker_id="coder", instance_id=spawned["instance_id"], detail="bug"
            )
        ]
    )
    assert status_of(orch, spawned["instance_id"]) == "exited"
    result = op(orch, "worker.stop", worker={"worker_id": "coder"}).result
    assert result["stopped"] == [spawned["instance_id"]]
    wait_for(lambda: not alive(spawned["pid"]))
    assert status_of(orch, spawned["instance_id"]) == "stopped"


# --- owners that die -----------------------------------------------------------------------------

OWNER = """
import sys, time
from orchestrator import Orchestrator
from tests.helpers import lab_config
url, port = sys.argv[1], int(sys.argv[2])
orch = Orchestrator.open(config=lab_config(port, backend="agent"), store=url, session_id="dies")
handle = orch.task_start(kind="worker", worker_id="coder", task="never answered")
print(handle.task_id, flush=True)
time.sleep(120)
"""


def _start_owner(url: str, port: int, env: dict[str, str] | None = None) -> tuple[Any, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, url, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    task_id = proc.stdout.readline().strip()
    assert task_id.startswith("t-"), task_id
    return proc, task_id


def test_a_task_whose_orchestrator_died_ends_failed_naming_it(
    tmp_path: Path, chat_server: ChatServer
) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    chat_server.delay = 60.0
    proc, task_id = _start_owner(url, chat_server.port)
    with Orchestrator.open(config=config_with(), store=url, session_id="other") as orch:
        assert orch.task_peek(task_id).status == "running"
        proc.kill()
        proc.wait(timeout=10)
        rec = orch.task_await(task_id, timeout=None)  # no longer blocks forever
        assert rec.status == "failed"
        assert f"pid {proc.pid}" in str(rec.error) and "is gone" in str(rec.error)
        assert [e["error"] for e in events_of(orch, "TaskFailed", task_id=task_id)] == [rec.error]
        assert rec.session_id == "dies"


def test_a_task_of_a_host_whose_lease_lapsed_ends_failed(
    postgres_url: str, chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat_server.delay = 60.0
    proc, task_id = _start_owner(postgres_url, chat_server.port, {"ORCHESTRATOR_HOST_ID": "h2"})
    monkeypatch.setenv("ORCHESTRATOR_HOST_ID", "h1")
    with Orchestrator.open(config=config_with(), store=postgres_url) as orch:
        assert orch.task_peek(task_id).status == "running"  # h2 holds its lease
        proc.kill()
        proc.wait(timeout=10)
        rec = wait_for(lambda: (r := orch.task_peek(task_id)).status == "failed" and r)
        assert "host h2" in str(rec.error)


@pytest.fixture
def postgres_url() -> Any:
    from tests.conftest import postgres_schema

    with postgres_schema() as url:
        yield url


# --- no orphans ---------------------------------------------------------------------------------


def test_the_key_file_is_never_read_half_written(state_home: Path) -> None:
    # Many processes race to create the key; every one must derive the same token.
    code = "from orchestrator.processes import worker_token; print(worker_token('i'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(12)
    ]
    tokens = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(tokens) == 1 and tokens == {worker_token("i")}
    key = state_home / "orchestrator" / "worker.key"
    assert key.stat().st_size == 32 and (key.stat().st_mode & 0o077) == 0
    assert [p.name for p in key.parent.iterdir() if p.name.startswith(".worker.key")] == []


SPAWNER = """
import json, os, subprocess, sys, time
from orchestrator.config import default_config
from orchestrator.processes import worker_environment, worker_token
spec = {"worker_id": "coder", "instance_id": "coder-orphan", "fingerprint": "fp-x",
        "model": "local/echo-large", "model_policy": "dynamic", "system_prompt": "",
        "idle_timeout": 900, "spawner_pid": os.getpid(), "log_dir": sys.argv[1],
        "providers": {p: c.identity() for p, c in default_config().providers.items()}}
env = worker_environment(os.environ, {"ORCHESTRATOR_WORKER_SPEC": json.dumps(spec),
                                      "ORCHESTRATOR_WORKER_TOKEN": worker_token("coder-orphan")})
proc = subprocess.Popen([sys.executable, "-m", "orchestrator.worker"], env=env,
                        stdout=subprocess.PIPE, start_new_session=True)
print(proc.stdout.readline().decode().strip(), flush=True)
time.sleep(120)
"""


def test_a_worker_whose_spawner_dies_before_registering_it_exits(tmp_path: Path) -> None:
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert spawner.stdout is not None
    ready = spawner.stdout.readline()
    assert ready.startswith("READY "), ready
    pid = json.loads(ready[len("READY ") :])["pid"]
    assert alive(pid)
    spawner.kill()  # between READY and WorkerSpawned
    spawner.wait(timeout=10)
    wait_for(lambda: not alive(pid), timeout=20)
    assert (tmp_path / "coder-orphan.exit").read_text() == "spawner gone"


def test_a_memory_store_leaves_no_worker_behind(state_home: Path) -> None:
    cmd = [
        str(Path(sys.executable).parent / "orchestrator"),
        "--store",
        "memory",
        "run",
        "coder",
        "hi",
    ]
    for _ in range(2):
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[local/echo-large] hi"
    assert worker_processes(state_home) == []


def test_an_unresponsive_process_of_ours_is_stopped_not_orphaned(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    first = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    orch.pool.distrust(first["instance_id"])  # as if its proof had lapsed
    os.kill(first["pid"], signal.SIGSTOP)  # alive, same start time, never answers
    rec = run(orch, "coder", "x")
    assert rec.status == "completed", rec.error
    assert served(orch, rec.task_id)["pid"] != first["pid"]
    wait_for(lambda: not alive(first["pid"]))
    rejected = events_of(orch, "WorkerReuseRejected")
    assert [r["reason"] for r in rejected] == ["health_failed"]
    stops = events_of(orch, "WorkerStopped")
    assert [(s["instance_id"], s["reason"]) for s in stops] == [(first["instance_id"], "unhealthy")]


# --- claims --------------------------------------------------------------------------------------


def test_any_error_while_spawning_ends_the_claim_and_the_task(
    open_orch: OpenOrch, state_home: Path
) -> None:
    orch = open_orch(config=config_with("server"))
    logs = orch.pool.log_dir
    logs.rmdir()
    logs.write_text("not a directory")  # opening the worker log fails
    for _ in range(2):  # the second does not wait on a leaked claim
        began = time.monotonic()
        rec = run(orch, "coder", "x")
        assert rec.status == "failed"
        assert str(rec.error).startswith('cannot spawn worker "coder": ')
        assert time.monotonic() - began < 20  # far below the claim timeout
    spawn_op = op(orch, "worker.spawn", worker={"worker_id": "coder"})
    assert spawn_op.status == "failed"
    claims = events_of(orch, "WorkerSpawnRequested")
    failed = events_of(orch, "WorkerSpawnFailed")
    assert sorted(c["claim_id"] for c in claims) == sorted(f["claim_id"] for f in failed)
    assert orch.pool.registry.refresh().claims == {}
    logs.unlink()
    assert run(orch, "coder", "y").status == "completed"


def test_a_claim_taken_over_cannot_be_fulfilled(open_orch: OpenOrch, state_home: Path) -> None:
    orch = open_orch(config=config_with("server"))
    spec = orch.worker_spec("coder", orch.session_decision("coder"))
    ids = {"session_id": orch.session_id, "worker_id": "coder", "task_id": None}
    request = spec.request(orch.pool.host)
    decided = orch.pool._decide(request, ids, {}, {}, spawn=True)
    assert decided is not None and decided.claim_id is not None
    claim_id = decided.claim_id
    # A waiter judged the claimant stalled and took the claim over.
    orch.pool.registry.append(
        [WorkerSpawnFailed(**ids, claim_id=claim_id, error="taken over by a waiter")]
    )
    late = orch.pool._spawn(spec, claim_id, ids, False, 900.0, 8)
    assert late is None  # fenced: not registered, and its process is stopped
    assert events_of(orch, "WorkerSpawned") == []
    wait_for(lambda: worker_processes(state_home) == [])


@pytest.mark.parametrize("worker_id", ["team/docs", "../../../x", "", "a" * 65, "-x"])
def test_profile_ids_are_restricted_at_config_load(worker_id: str) -> None:
    raw = {"model": "local/echo-large", "profiles": {worker_id: {}}}
    with pytest.raises(ValueError, match="not a valid id"):
        load_config(raw)


# --- lifecycle -----------------------------------------------------------------------------------


def test_an_idle_process_stops_itself_and_is_recorded_idle(open_orch: OpenOrch) -> None:
    raw = config_with("server").model_dump()
    orch = open_orch(config={**raw, "pool": {"idle_timeout": 0.5}})
    first = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    wait_for(lambda: not alive(first["pid"]))
    orch.pool.reap_children()
    assert run(orch, "coder", "x").status == "completed"
    stops = events_of(orch, "WorkerStopped")
    assert [(s["instance_id"], s["reason"]) for s in stops] == [(first["instance_id"], "idle")]


def test_max_processes_evicts_the_least_recently_used_idle_process(open_orch: OpenOrch) -> None:
    raw = config_with("server").model_dump()
    orch = open_orch(config={**raw, "pool": {"max_processes": 2}})
    coder = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    docs = op(orch, "worker.spawn", worker={"worker_id": "docs"}).result
    assert run(orch, "coder", "keep me recent").status == "completed"
    explorer = op(orch, "worker.spawn", worker={"worker_id": "explorer"}).result
    assert explorer["reused"] is False
    stops = events_of(orch, "WorkerStopped")
    assert [(s["instance_id"], s["reason"]) for s in stops] == [(docs["instance_id"], "evicted")]
    wait_for(lambda: not alive(docs["pid"]))
    assert alive(coder["pid"])


# --- cancel and concurrency ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["server", "agent"])
def test_cancel_interrupts_the_request_in_flight(
    open_orch: OpenOrch, chat_server: ChatServer, backend: str
) -> None:
    orch = open_orch(config=lab_config(chat_server.port, backend=backend))  # type: ignore[arg-type]
    assert run(orch, "coder", "warm").status == "completed"
    chat_server.delay = 30.0
    handle = orch.task_start(kind="worker", worker_id="coder", task="long")
    wait_for(lambda: len(chat_server.requests) == 2)
    began = time.monotonic()
    orch.task_cancel(handle.task_id)
    rec = orch.task_await(handle.task_id, timeout=20)
    assert rec.status == "cancelled"
    assert time.monotonic() - began < 10  # far below the provider's 30 s
    if backend == "server":
        # The worker dropped the request: nothing is in flight there any more.
        entry = orch.task_list(view="registry")[0]
        from orchestrator.backends.client import WorkerClient

        client = WorkerClient(str(entry.url), entry.instance_id)
        wait_for(lambda: client.health().in_flight == 0)
    chat_server.delay = 0.0
    assert run(orch, "coder", "after").response == "slow says after"
    assert orch.task_peek(handle.task_id).status == "cancelled"  # the late reply was dropped


def test_a_task_cancelled_mid_request_keeps_its_reuse_fact(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    orch = open_orch(config=lab_config(chat_server.port, backend="server"))
    assert run(orch, "coder", "warm").status == "completed"
    chat_server.delay = 30.0
    handle = orch.task_start(kind="worker", worker_id="coder", task="long")
    wait_for(lambda: len(chat_server.requests) == 2)
    assert orch.task_cancel(handle.task_id).status == "cancelled"
    chat_server.delay = 0.0

    def reused() -> list[str | None]:
        return [e.task_id for e in orch.task_list(view="events", type="WorkerReused")]

    # The process it was served on was reused: the registry says so once the request ends.
    wait_for(lambda: reused() == [handle.task_id])
    assert orch.task_peek(handle.task_id).status == "cancelled"


SERVING_OWNER = """
import sys, time
from orchestrator import Orchestrator
from tests.helpers import lab_config
url, port = sys.argv[1], int(sys.argv[2])
orch = Orchestrator.open(config=lab_config(port, backend="server"), store=url, session_id="owner")
handle = orch.task_start(kind="worker", worker_id="coder", task="long")
print(handle.task_id, flush=True)
began = time.monotonic()
rec = orch.task_await(handle.task_id, timeout=60)
print(rec.status, round(time.monotonic() - began, 1), flush=True)
orch.close()
"""


def test_cancel_from_another_process_interrupts_the_owners_request(
    chat_server: ChatServer, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'cancel.db'}"
    chat_server.delay = 30.0
    owner = subprocess.Popen(
        [sys.executable, "-c", SERVING_OWNER, url, str(chat_server.port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert owner.stdout is not None
        task_id = owner.stdout.readline().strip()
        wait_for(lambda: len(chat_server.requests) == 1, timeout=30)
        other = Orchestrator.open(config=lab_config(chat_server.port, backend="server"), store=url)
        assert other.task_cancel(task_id).status == "cancelled"
        # The owner's request was dropped by its worker: it stops waiting far below 30 s.
        status, waited = owner.stdout.readline().split()
        assert status == "cancelled" and float(waited) < 20
        assert owner.wait(timeout=30) == 0
    finally:
        owner.kill()
        owner.wait()
    entry = other.task_list(view="registry")[0]
    from orchestrator.backends.client import WorkerClient

    client = WorkerClient(str(entry.url), entry.instance_id)
    wait_for(lambda: client.health().in_flight == 0)
    assert other.task_peek(task_id).status == "cancelled"
    other.close(stop_workers=True)


def test_tasks_beyond_max_concurrency_wait_and_say_so_in_explain(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    raw = lab_config(chat_server.port, backend="agent").model_dump()
    orch = open_orch(config={**raw, "pool": {"max_concurrency": 1}})
    chat_server.delay = 0.5
    handles = [orch.task_start(kind="worker", worker_id="coder", task=str(i)) for i in range(3)]
    records = [orch.task_await(h.task_id, timeout=30) for h in handles]
    assert [r.status for r in records] == ["completed"] * 3
    starts = sorted(r.at for r in chat_server.requests)
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(starts))  # one at a time
    queued = events_of(orch, "TaskQueued")
    assert [q["task_id"] for q in queued] == [h.task_id for h in handles[1:]]
    expl = orch.task_list(view="explain", task_id=handles[2].task_id)[0]
    assert any("concurrency slots were busy" in line for line in expl.summary)


# --- proof without a /health round trip on every task --------------------------------------------


def test_reuse_is_proven_by_replies_without_a_health_call_per_task(
    open_orch: OpenOrch, state_home: Path
) -> None:
    orch = open_orch(config=config_with("server"))
    pids = set()
    for i in range(5):
        rec = run(orch, "coder", str(i))
        pids.add(served(orch, rec.task_id)["pid"])
    assert len(pids) == 1
    second = open_orch(config=config_with("server"))  # no proof yet: asks /health once
    for i in range(3):
        assert run(second, "coder", str(i)).status == "completed"
    entry = orch.task_list(view="registry")[0]
    log = (orch.pool.log_dir / f"{entry.instance_id}.log").read_text()
    assert log.count("GET /health") == 1
    assert log.count("POST /prompt") == 8


def test_a_reply_from_another_process_is_never_the_tasks_result(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    real = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    # Point the registered instance at another process's url, as a recycled port would.
    other = op(orch, "worker.spawn", worker={"worker_id": "coder", "force_new": True}).result
    lease = orch.server.acquire(
        orch.worker_spec("coder", orch.session_decision("coder")),
        {"session_id": orch.session_id, "worker_id": "coder", "task_id": None},
        False,
    )
    assert lease is not None
    from dataclasses import replace

    from orchestrator.backends import PromptRequest, TaskError

    wrong = replace(lease, url=other["url"] if lease.url == real["url"] else real["url"])
    with pytest.raises(TaskError):
        orch.server.prompt(wrong, PromptRequest("t-x", "hi", "local/echo-large"), threading.Event())


def test_worker_http_rejects_malformed_bodies_with_a_reason(open_orch: OpenOrch) -> None:
    import httpx

    orch = open_orch(config=config_with("server"))
    spawned = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    auth = {"Authorization": f"Bearer {worker_token(spawned['instance_id'])}"}
    url = spawned["url"] + "/prompt"
    for body, needle in [
        (b"[1, 2]", "JSON object"),
        (b'{"text": null}', '"text" is required'),
        (b"not json", "not JSON"),
        (b'{"text": "x", "credentials": {"K": 1}}', "credentials"),
    ]:
        resp = httpx.post(url, content=body, headers=auth, timeout=5)
        assert resp.status_code == 400, body
        assert needle in resp.json()["error"]
    assert alive(spawned["pid"])
