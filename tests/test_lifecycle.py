"""The lifecycle of server processes as a user sees it: `stop` works from the registry alone,
the registry tells the truth when read, and eviction never takes a process someone uses.

Real worker processes, real CLI invocations and a local OpenAI-protocol server; liveness is
checked with psutil, never taken from the registry on trust.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator import Orchestrator, pool
from orchestrator.backends.server import ServerBackend
from tests.chat import ChatServer
from tests.conftest import OpenOrch
from tests.helpers import config_with, op, run, wait_for

CLI = [str(Path(sys.executable).parent / "orchestrator")]
ROOT = Path(__file__).parent.parent


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A file store, so CLI invocations and orchestrators in this process share it."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cli_in(cwd: Path, store: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    """Run the console script in `cwd`, so it loads that directory's orchestrator.toml."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(cwd / ".config"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*CLI, "--store", store, *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc


def registry_rows(cwd: Path, store: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(cli_in(cwd, store, "registry", "--json").stdout)
    return {r["worker_id"]: r for r in rows}


def project(tmp_path: Path, name: str, toml: str) -> Path:
    where = tmp_path / name
    where.mkdir()
    (where / "orchestrator.toml").write_text(toml)
    return where


# --- stop works from the registry alone ------------------------------------------------------


def test_stop_from_another_configuration_stops_processes_it_has_no_profile_for(
    tmp_path: Path, store: str
) -> None:
    a = project(
        tmp_path,
        "a",
        '[profiles.srv]\nmodel = "local/echo-large"\n'
        '[profiles.other]\nmodel = "local/echo-small"\n',
    )
    b = project(tmp_path, "b", '[profiles.mine]\nmodel = "local/echo-small"\n')
    assert cli_in(a, store, "run", "srv", "hi").stdout.strip() == "[local/echo-large] hi"
    assert cli_in(a, store, "run", "other", "hi").stdout.strip() == "[local/echo-small] hi"
    before = registry_rows(b, store)
    assert {w: r["status"] for w, r in before.items()} == {"srv": "ready", "other": "ready"}
    srv, other = before["srv"]["pid"], before["other"]["pid"]

    stopped = cli_in(b, store, "stop", "srv").stdout
    assert f"srv: stopped {before['srv']['instance_id']}" in stopped
    wait_for(lambda: not alive(srv), timeout=10)
    assert alive(other)

    rest = cli_in(b, store, "stop", "--all").stdout
    assert f"other: stopped {before['other']['instance_id']}" in rest
    wait_for(lambda: not alive(other), timeout=10)
    after = registry_rows(b, store)
    assert {w: r["status"] for w, r in after.items()} == {"srv": "stopped", "other": "stopped"}
    assert cli_in(b, store, "stop", "--all").stdout.strip() == "nothing to stop on this host"


def test_stop_of_a_worker_nobody_knows_is_still_an_error(tmp_path: Path, store: str) -> None:
    b = project(tmp_path, "b", '[profiles.mine]\nmodel = "local/echo-small"\n')
    cli_in(b, store, "run", "mine", "hi")
    err = cli_in(b, store, "stop", "nosuch", code=1).stderr
    assert err.strip().splitlines() == ['error: Unknown worker "nosuch".']
    cli_in(b, store, "stop", "--all")


# --- the registry tells the truth when read --------------------------------------------------


def test_an_idle_timeout_of_one_second_is_kept_and_read_back_as_stopped(
    tmp_path: Path, store: str
) -> None:
    a = project(
        tmp_path,
        "a",
        '[pool]\nidle_timeout = 1\n[profiles.srv]\nmodel = "local/echo-large"\n',
    )
    cli_in(a, store, "run", "srv", "hi")
    # The CLI returned after the reply, so the process has been idle since at most now.
    idle_since = time.monotonic()
    row = registry_rows(a, store)["srv"]
    wait_for(lambda: not alive(row["pid"]), timeout=2.0 - (time.monotonic() - idle_since))
    # Nothing ran since: only reading the registry finds out, and records it.
    shown = registry_rows(a, store)["srv"]
    assert (shown["instance_id"], shown["status"]) == (row["instance_id"], "stopped")
    stops = json.loads(cli_in(a, store, "events", "--type", "WorkerStopped", "--json").stdout)
    assert [(s["data"]["instance_id"], s["data"]["reason"]) for s in stops] == [
        (row["instance_id"], "idle")
    ]
    workers = {w["worker_id"]: w for w in json.loads(cli_in(a, store, "workers", "--json").stdout)}
    assert workers["srv"]["status"] == "not_running"


def test_workers_and_stop_record_a_process_found_dead(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    coder = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    docs = op(orch, "worker.spawn", worker={"worker_id": "docs"}).result
    for pid in (coder["pid"], docs["pid"]):
        psutil.Process(pid).kill()
    wait_for(lambda: not any(alive(p) for p in (coder["pid"], docs["pid"])))
    orch.pool.reap_children()

    rows = {w.worker_id: w for w in orch.task_list(view="workers")}
    assert rows["coder"].status == "not_running" and rows["coder"].pid is None
    exited = orch.task_list(view="events", type="WorkerExited")
    assert {e.data["instance_id"] for e in exited} == {coder["instance_id"], docs["instance_id"]}
    # Found once, recorded once: reading again adds nothing.
    orch.task_list(view="registry")
    orch.task_list(view="workers")
    assert len(orch.task_list(view="events", type="WorkerExited")) == 2
    status = {e.instance_id: e.status for e in orch.task_list(view="registry")}
    assert status[coder["instance_id"]] == status[docs["instance_id"]] == "exited"


def test_stop_records_a_process_found_dead_and_says_it_was_already_gone(
    open_orch: OpenOrch,
) -> None:
    orch = open_orch(config=config_with("server"))
    coder = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
    psutil.Process(coder["pid"]).kill()
    wait_for(lambda: not alive(coder["pid"]))
    orch.pool.reap_children()
    result = op(orch, "worker.stop", worker={"worker_id": "coder"}).result
    assert (result["stopped"], result["exited"]) == ([], [coder["instance_id"]])
    exited = orch.task_list(view="events", type="WorkerExited")
    assert [e.data["instance_id"] for e in exited] == [coder["instance_id"]]


# --- eviction never takes a process someone uses ---------------------------------------------


def rival_claimed(orch: Orchestrator) -> bool:
    """Has the rival claimed its spawn (or even finished it)?"""
    state = orch.pool.registry.refresh()
    return any(c.worker_id == "docs" for c in state.claims.values()) or any(
        e.worker_id == "docs" for e in state.entries.values()
    )


def test_eviction_waits_for_a_process_acquired_by_another_session(
    tmp_path: Path, store: str, chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session a acquires process P and holds a slow request on it; meanwhile a CLI in
    another OS process needs a new process with max_processes = 1. P is neither stopped
    between its acquisition and the request reaching it, nor while the request runs: the
    spawn waits its turn, and both tasks complete."""
    chat_server.delay = 1.5
    toml = (
        'model = "lab/slow"\n[pool]\nmax_processes = 1\n'
        f'[providers.lab]\nkind = "openai"\nbase_url = "{chat_server.url}"\n'
        "[providers.lab.models.slow]\n[providers.lab.models.fast]\n"
        '[profiles.coder]\nmodel = "lab/slow"\n[profiles.docs]\nmodel = "lab/fast"\n'
    )
    here = project(tmp_path, "p", toml)
    orch = Orchestrator.open(config=here / "orchestrator.toml", store=store, session_id="a")
    try:
        p = op(orch, "worker.spawn", worker={"worker_id": "coder"}).result
        other: list[subprocess.Popen[str]] = []
        real_prompt = ServerBackend.prompt

        def prompt_after_a_rival_spawns(self: ServerBackend, lease: Any, *rest: Any) -> Any:
            # Between this task's acquisition of P and its request reaching P, another
            # process asks for room; give it the time it would need to stop P.
            if lease.instance_id == p["instance_id"] and not other:
                env = {
                    **os.environ,
                    "XDG_CONFIG_HOME": str(here / ".config"),
                    "PYTHONPATH": str(ROOT),
                }
                other.append(
                    subprocess.Popen(
                        [*CLI, "--store", store, "--session", "b", "run", "docs", "rival"],
                        cwd=here,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
                wait_for(lambda: rival_claimed(orch), timeout=30)
                deadline = time.monotonic() + 2.0
                while alive(p["pid"]) and time.monotonic() < deadline:
                    time.sleep(0.05)
            return real_prompt(self, lease, *rest)

        monkeypatch.setattr(ServerBackend, "prompt", prompt_after_a_rival_spawns)
        held = run(orch, "coder", "held")
        assert held.status == "completed", held.error
        assert held.response == "slow says held"
        served = orch.task_list(view="events", type="TaskCompleted", task_id=held.task_id)
        assert served[0].data["instance_id"] == p["instance_id"]

        out, err = other[0].communicate(timeout=60)
        assert other[0].returncode == 0, (out, err)
        assert out.strip() == "fast says rival"
        # P was evicted only after its task ended.
        ended = served[0].position
        stops = orch.task_list(view="events", type="WorkerStopped")
        evicted = [s.position for s in stops if s.data["instance_id"] == p["instance_id"]]
        assert [s.data["reason"] for s in stops] == ["evicted"]
        assert evicted[0] > ended
    finally:
        for rival in other:
            if rival.poll() is None:
                rival.kill()
                rival.communicate()
        orch.close(stop_workers=True)


def test_a_spawn_that_finds_no_room_in_time_fails_saying_so(
    open_orch: OpenOrch, chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "ROOM_WAIT", 0.5)  # 30 s in real life
    chat_server.delay = 4.0
    config = {
        "model": "lab/slow",
        "pool": {"max_processes": 1},
        "providers": {
            "lab": {"kind": "openai", "base_url": chat_server.url, "models": {"slow": {}}}
        },
        "profiles": {"coder": {"model": "lab/slow"}, "docs": {"model": "lab/slow"}},
    }
    a = open_orch(config=config, session_id="a")
    b = open_orch(config=config, session_id="b")
    held = a.task_start(kind="worker", worker_id="coder", task="held")
    wait_for(lambda: chat_server.seen, timeout=30)  # in flight on the only process
    refused = run(b, "docs", "no room")
    assert refused.status == "failed"
    assert (
        'no room for worker "docs": max_processes=1 and every worker process on this host is '
        "in use (a request in flight, or acquired or used in the last 5 s) for 0.5 s. Try "
        "again, or raise [pool] max_processes." in str(refused.error)
    )
    done = a.task_await(held.task_id, timeout=30)
    assert done.status == "completed", done.error
    assert done.response == "slow says held"
    assert a.task_list(view="events", type="WorkerStopped") == []
