"""Server workers as real processes: reuse, rejection, force_new, respawn, stop, crash."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from events.catalogue import WorkerReady, WorkerSpawned, WorkerSpawnRequested
from orchestrator import Orchestrator
from orchestrator.processes import host_id, start_time
from tests.conftest import ChatServer, OpenOrch
from tests.helpers import config_with, lab_config, op, reset_model, run, set_model, wait_for


def events_of(orch: Orchestrator, type_: str) -> list[dict[str, object]]:
    return [
        e.data | {"session_id": e.session_id, "task_id": e.task_id}
        for e in orch.task_list(view="events", type=type_)
    ]


def served_pid(orch: Orchestrator, worker_id: str, text: str = "x", **kwargs: object) -> int:
    rec = run(orch, worker_id, text, **kwargs)
    assert rec.status == "completed", rec.error
    started = [e for e in events_of(orch, "TaskCompleted") if e["task_id"] == rec.task_id]
    return int(started[0]["pid"])  # type: ignore[call-overload]


def test_a_second_orchestrator_reuses_the_running_process(open_orch: OpenOrch) -> None:
    first = open_orch(config=config_with("server"), session_id="a")
    pid = served_pid(first, "coder")
    second = open_orch(config=config_with("server"), session_id="b")
    assert served_pid(second, "coder") == pid
    assert len(events_of(second, "WorkerSpawned")) == 1
    reused = events_of(second, "WorkerReused")
    assert [r["session_id"] for r in reused] == ["b"]
    assert len(second.task_list(view="registry")) == 1


def test_a_different_configured_model_is_not_reused(open_orch: OpenOrch) -> None:
    first = open_orch(config=config_with("server"), session_id="a")
    pid = served_pid(first, "coder")
    other_cfg = config_with("server", model="local/echo-small")
    second = open_orch(config=other_cfg, session_id="b")
    assert served_pid(second, "coder") != pid
    rejected = events_of(second, "WorkerReuseRejected")
    assert [(r["reason"], r["session_id"]) for r in rejected] == [("model_mismatch", "b")]
    assert psutil.pid_exists(pid)  # the other model's process is left alone


def test_a_session_override_is_not_served_by_the_default_process(open_orch: OpenOrch) -> None:
    a = open_orch(config=config_with("server"), session_id="a")
    pid = served_pid(a, "coder")
    b = open_orch(config=config_with("server"), session_id="b")
    set_model(b, "coder", "local/echo-small")
    assert served_pid(b, "coder") != pid
    # Same model pinned sticky is still another fingerprint: the policy differs.
    c = open_orch(config=config_with("server"), session_id="c")
    set_model(c, "coder", "local/echo-large")
    assert served_pid(c, "coder") != pid
    reasons = {r["reason"] for r in events_of(c, "WorkerReuseRejected") if r["session_id"] == "c"}
    assert "policy_mismatch" in reasons


def test_force_new_spawns_even_when_a_match_runs(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    pid = served_pid(orch, "coder")
    new_pid = served_pid(orch, "coder", force_new=True)
    assert new_pid != pid
    assert psutil.pid_exists(pid)
    assert [r["reason"] for r in events_of(orch, "WorkerReuseRejected")] == ["force_new"]
    claims = events_of(orch, "WorkerSpawnRequested")
    assert [c["force_new"] for c in claims] == [False, True]
    spawned = op(orch, "worker.spawn", worker={"worker_id": "coder", "force_new": True}).result
    assert spawned["reused"] is False and spawned["pid"] not in (pid, new_pid)
    again = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    assert again["reused"] is True
    assert set(again) == {
        "worker_id",
        "instance_id",
        "pid",
        "url",
        "fingerprint",
        "model",
        "model_policy",
        "reused",
        "reason",
    }


def _forge_entry(orch: Orchestrator, instance_id: str, pid: int, started: float, url: str) -> None:
    """Put an entry in the registry the way a spawn would: as events in the log."""
    spec = orch.worker_spec("coder", orch.session_decision("coder"))
    ids = {"session_id": "forger", "worker_id": "coder"}
    orch.pool.registry.append(
        [
            WorkerSpawned(
                **ids,
                instance_id=instance_id,
                backend="server",
                host=host_id(),
                pid=pid,
                pid_started_at=started,
                url=url,
                fingerprint=spec.fingerprint,
                model=spec.model,
                model_policy=spec.model_policy,
            ),
            WorkerReady(**ids, instance_id=instance_id),
        ]
    )


def test_a_recycled_pid_is_never_trusted(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    unrelated = subprocess.Popen(["sleep", "30"])
    try:
        # The recorded start time is not the start time of the process now holding the pid.
        _forge_entry(
            orch,
            "coder-recycled",
            unrelated.pid,
            start_time(unrelated.pid) - 100,
            "http://127.0.0.1:9",
        )
        pid = served_pid(orch, "coder")
        assert pid != unrelated.pid
        rejected = events_of(orch, "WorkerReuseRejected")
        assert [(r["instance_id"], r["reason"]) for r in rejected] == [
            ("coder-recycled", "pid_recycled")
        ]
        exited = [e["instance_id"] for e in events_of(orch, "WorkerExited")]
        assert exited == ["coder-recycled"]
        registry = {e.instance_id: e.status for e in orch.task_list(view="registry")}
        assert registry["coder-recycled"] == "exited"
    finally:
        unrelated.kill()
        unrelated.wait()


def test_an_entry_whose_health_answers_as_another_instance_is_not_reused(
    open_orch: OpenOrch,
) -> None:
    orch = open_orch(config=config_with("server"))
    real = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    # Same live pid, same url, right start time, but recorded as another instance.
    _forge_entry(orch, "coder-impostor", real["pid"], start_time(real["pid"]), real["url"])
    assert served_pid(orch, "coder") == real["pid"]
    rejected = events_of(orch, "WorkerReuseRejected")
    assert [(r["instance_id"], r["reason"]) for r in rejected] == [
        ("coder-impostor", "health_failed")
    ]


def test_a_dead_process_is_detected_and_replaced(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    pid = served_pid(orch, "coder")
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    new_pid = served_pid(orch, "coder")
    assert new_pid != pid
    assert [r["reason"] for r in events_of(orch, "WorkerReuseRejected")] == ["process_gone"]
    assert len(events_of(orch, "WorkerExited")) == 1


def test_a_worker_dying_mid_task_fails_the_task_clearly_and_the_next_spawns(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    chat_server.delay = 2.0
    cfg = lab_config(chat_server.server_address[1])
    orch = open_orch(config=cfg)
    spawned = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    handle = orch.task_start(kind="worker", worker_id="coder", task="long job")
    while not chat_server.seen:
        time.sleep(0.02)
    os.kill(spawned["pid"], signal.SIGKILL)
    rec = orch.task_await(handle.task_id, timeout=30)
    assert rec.status == "failed"
    assert "stopped answering while serving this task" in str(rec.error)
    assert "next request will spawn a fresh one" in str(rec.error)
    assert [e["instance_id"] for e in events_of(orch, "WorkerExited")] == [spawned["instance_id"]]
    chat_server.delay = 0.0
    assert served_pid(orch, "coder") != spawned["pid"]


def test_respawn_replaces_the_process_and_plain_set_leaves_it(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    pid = served_pid(orch, "coder")

    kept = set_model(orch, "coder", "local/echo-small").result
    assert kept["respawned"] is False and kept["running"] is True
    assert psutil.pid_exists(pid)

    replaced = set_model(orch, "coder", "local/echo-vision", respawn=True).result
    assert replaced["respawned"] is True
    live = [e for e in orch.task_list(view="registry") if e.status == "ready"]
    assert [e.model for e in live if e.model == "local/echo-vision"] == ["local/echo-vision"]
    new_pid = served_pid(orch, "coder", "after")
    assert new_pid in {e.pid for e in live}
    # Only this session used the old process: it drained, then stopped for the respawn.
    _wait_gone(pid)
    wait_for(lambda: [e["reason"] for e in events_of(orch, "WorkerStopped")] == ["respawn"])
    assert [e["instance_id"] for e in events_of(orch, "WorkerDraining")] == [
        e.instance_id for e in orch.task_list(view="registry") if e.pid == pid
    ]

    back = reset_model(orch, "coder", respawn=True).result
    assert back["respawned"] is True
    assert back["model"] == "local/echo-large"
    _wait_gone(new_pid)


def test_stop_and_close_are_reflected_in_the_registry(open_orch: OpenOrch, store: object) -> None:
    orch = open_orch(config=config_with("server"), session_id="a")
    pid = served_pid(orch, "coder")
    orch.close()  # server workers outlive their orchestrator, for reuse
    assert psutil.pid_exists(pid)
    later = open_orch(config=config_with("server"), session_id="b")
    assert [e.status for e in later.task_list(view="registry")] == ["ready"]
    result = op(later, "worker.stop", worker={"worker_id": "coder"}).result
    assert len(result["stopped"]) == 1
    _wait_gone(pid)
    assert [e.status for e in later.task_list(view="registry")] == ["stopped"]

    pid2 = served_pid(later, "docs")
    later.close(stop_workers=True)
    _wait_gone(pid2)
    observer = open_orch(config=config_with("server"), session_id="c")
    assert sorted(e.status for e in observer.task_list(view="registry")) == ["stopped", "stopped"]


def test_auto_spawn_false_only_uses_a_running_process(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    rec = run(orch, "coder", "x", auto_spawn=False)
    assert rec.status == "failed"
    assert "auto_spawn is false" in str(rec.error)
    op(orch, "worker.spawn", worker={"worker_id": "coder"})
    assert run(orch, "coder", "y", auto_spawn=False).response == "[local/echo-large] y"


def test_an_abandoned_spawn_claim_does_not_block_others(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    spec = orch.worker_spec("coder", orch.session_decision("coder"))
    dead = subprocess.Popen(["true"])
    dead_started = start_time(dead.pid)
    dead.wait()
    orch.pool.registry.append(
        [
            WorkerSpawnRequested(
                session_id="crashed",
                worker_id="coder",
                claim_id="claim-of-the-dead",
                fingerprint=spec.fingerprint,
                model=spec.model,
                model_policy=spec.model_policy,
                host=host_id(),
                claimant_pid=dead.pid,
                claimant_started_at=dead_started,
            )
        ]
    )
    began = time.monotonic()
    assert run(orch, "coder", "x").status == "completed"
    assert time.monotonic() - began < 20  # far less than the claim timeout
    failed = events_of(orch, "WorkerSpawnFailed")
    assert [f["claim_id"] for f in failed] == ["claim-of-the-dead"]


def test_workers_listen_on_loopback_and_require_their_token(
    open_orch: OpenOrch, state_home: Path
) -> None:
    orch = open_orch(config=config_with("server"))
    spawned = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    assert spawned["url"].startswith("http://127.0.0.1:")
    assert httpx.get(spawned["url"] + "/health").status_code == 401
    bad = httpx.get(spawned["url"] + "/health", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    cmdline = " ".join(psutil.Process(spawned["pid"]).cmdline())
    assert cmdline.endswith("-m orchestrator.worker")
    for path in [state_home / "orchestrator", *(state_home / "orchestrator").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is readable by others ({oct(mode)})"


def test_many_threads_asking_at_once_start_one_process(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    handles = [orch.task_start(kind="worker", worker_id="coder", task=str(i)) for i in range(8)]
    records = [orch.task_await(h.task_id, timeout=60) for h in handles]
    assert [r.status for r in records] == ["completed"] * len(handles)
    assert len({_pid_of(orch, r.task_id) for r in records}) == 1
    assert len(events_of(orch, "WorkerSpawned")) == 1


def _pid_of(orch: Orchestrator, task_id: str) -> int:
    done = [e for e in events_of(orch, "TaskCompleted") if e["task_id"] == task_id]
    return int(done[0]["pid"])  # type: ignore[call-overload]


CONTENDER = """
import sys, time
from orchestrator import Orchestrator
from tests.helpers import config_with, run
url, go_at = sys.argv[1], float(sys.argv[2])
orch = Orchestrator.open(config=config_with("server"), store=url)
time.sleep(max(0.0, go_at - time.time()))
rec = run(orch, "coder", "hi")
print(rec.status, rec.error)
orch.close()
"""


@pytest.mark.parametrize("processes", [4, 8])
def test_separate_processes_sharing_a_store_start_one_worker(store: object, processes: int) -> None:
    if not isinstance(store, str):
        pytest.skip("an in-memory log cannot be shared between processes")
    url = store
    go_at = time.time() + 3.0  # all start deciding at the same instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, url, str(go_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for _ in range(processes)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [o[0].split()[0] for o in outputs] == ["completed"] * processes, outputs
    with Orchestrator.open(config=config_with("server"), store=url) as observer:
        assert len(events_of(observer, "WorkerSpawned")) == 1
        pids = {int(e["pid"]) for e in events_of(observer, "TaskCompleted")}  # type: ignore[call-overload]
        assert len(pids) == 1
        assert len(events_of(observer, "WorkerReused")) == processes - 1
        for entry in observer.pool.live_entries():
            observer.pool.stop(entry, {"session_id": observer.session_id})


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still running")
