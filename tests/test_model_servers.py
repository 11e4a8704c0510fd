"""Managed model servers, with real processes: `tests/model_server.py` plays llama-server.

A provider with a `[providers.X.server]` table gets one server process per model, started on
first use, reused by every session and orchestrator process of the host, evicted least
recently used, restarted when it dies, stopped when idle; its failures end the task with the
exit status and the last log lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from events import EventLog, replay
from events.projections import ModelServerEntry
from orchestrator import Orchestrator
from orchestrator.config import ConfigError, load_config
from tests.conftest import kill_all, processes_under
from tests.helpers import op, run, wait_for

SERVER = str(Path(__file__).with_name("model_server.py"))
CLI = [str(Path(sys.executable).parent / "orchestrator")]
MODELS = {"m1": 100, "m2": 200, "m3": 300}


def config_text(
    max_servers: int = 2,
    idle_timeout: float = 900,
    backend: str = "server",
    memory_mb: int | None = None,
    startup: float = 0.1,
) -> str:
    """A TOML configuration: provider `lab` managed (models m1..m3, `broken` that crashes),
    provider `stuck` whose one model never becomes ready within its 1 s start_timeout."""
    command = json.dumps(
        [
            *(sys.executable, SERVER, "--model", "{path}", "--port", "{port}"),
            *("--startup", "{startup}", "--mode", "{mode}"),
        ]
    )
    lines = [
        'model = "lab/m1"',
        "[pool]",
        f"max_model_servers = {max_servers}",
        f"idle_timeout = {idle_timeout}",
        *([f"memory_mb = {memory_mb}"] if memory_mb else []),
        "[providers.lab]",
        'kind = "openai"',
        "[providers.lab.server]",
        f"command = {command}",
        "start_timeout = 30",
        "[providers.stuck]",
        'kind = "openai"',
        "[providers.stuck.server]",
        f"command = {command}",
        "start_timeout = 1",
        '[providers.stuck.models."s"]',
        'path = "/models/s.gguf"',
        'startup = "0"',
        'mode = "never-ready"',
        '[providers.lab.models."broken"]',
        'path = "/models/broken.gguf"',
        'startup = "0"',
        'mode = "crash"',
    ]
    for name, memory in MODELS.items():
        lines += [
            f'[providers.lab.models."{name}"]',
            f'path = "/models/{name}.gguf"',
            f"memory_mb = {memory}",
            f'startup = "{startup}"',
            'mode = "normal"',
        ]
    lines += ["[profiles.coder]", 'model = "lab/m1"', f'backend = "{backend}"']
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def no_server_left(state_home: Path) -> Iterator[None]:
    """Every model server (and supervisor) a test started under its state dir is gone at
    the end: killed here if the test left it."""
    yield
    kill_all(model_server_processes(state_home))


def model_server_processes(state_home: Path) -> list[psutil.Process]:
    """Model servers and their supervisors started under one state dir."""
    return processes_under(state_home, lambda cmd: "model_server" in " ".join(cmd))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "orchestrator.toml"
    path.write_text(config_text())
    return path


def servers(orch: Orchestrator) -> list[ModelServerEntry]:
    """The registry's model-server rows."""
    return [r for r in orch.task_list(view="registry") if r.kind == "model_server"]


def live(orch: Orchestrator, model: str | None = None) -> list[ModelServerEntry]:
    return [s for s in servers(orch) if s.status == "ready" and model in (None, s.model)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc


# --- start, reuse, route ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["server", "agent"])
def test_first_use_starts_the_server_and_the_reply_names_its_model(
    tmp_path: Path, backend: str
) -> None:
    cfg = tmp_path / "o.toml"
    cfg.write_text(config_text(backend=backend))
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        assert servers(orch) == []
        rec = run(orch, "coder", "hello")
        assert rec.status == "completed", rec.error
        assert rec.response == "[loaded m1.gguf] hello"
        (server,) = live(orch)
        assert (server.model, server.memory_mb, server.kind) == ("lab/m1", 100, "model_server")
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        tail = ["--port", str(server.port), "--startup", "0.1", "--mode", "normal"]
        assert server.command[-6:] == tail
        assert alive(server.pid)
        summary = "\n".join(orch.task_list(view="explain", task_id=rec.task_id)[0].summary)
        assert f"model server {server.instance_id} of lab/m1" in summary
        assert "was started for this task" in summary and "ready in" in summary
        # The second task reuses it and says so.
        again = run(orch, "coder", "again")
        assert again.response == "[loaded m1.gguf] again"
        assert [s.instance_id for s in live(orch)] == [server.instance_id]
        expl = orch.task_list(view="explain", task_id=again.task_id)[0]
        assert [(c.action, c.instance_id) for c in expl.model_servers] == [
            ("reused", server.instance_id)
        ]
        orch.close(stop_workers=True)
    assert not alive(server.pid)


def test_another_session_and_another_process_reuse_the_server(
    tmp_path: Path, config_file: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'e.db'}"
    with Orchestrator.open(config=config_file, store=store, session_id="a") as orch:
        assert run(orch, "coder", "one").status == "completed"
        (server,) = live(orch)
        # Another orchestrator process, another session, through the CLI.
        out = cli(
            "--store", store, "--config", str(config_file), "--session", "b", "run", "coder", "two"
        )
        assert "[loaded m1.gguf] two" in out.stdout
        assert [s.instance_id for s in live(orch)] == [server.instance_id]
        assert server.sessions == ["a"]
        (now,) = live(orch)
        assert set(now.sessions) == {"a", "b"}
        orch.close(stop_workers=True)


def test_two_models_with_one_slot_evict_the_least_recently_used(tmp_path: Path) -> None:
    cfg = tmp_path / "o.toml"
    cfg.write_text(config_text(max_servers=2))
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        for model in ("lab/m1", "lab/m2", "lab/m1"):  # m2 is now the least recently used
            assert run(orch, "coder", "x", model=model).status == "completed"
        m1, m2 = live(orch, "lab/m1")[0], live(orch, "lab/m2")[0]
        rec = run(orch, "coder", "three", model="lab/m3")
        assert rec.response == "[loaded m3.gguf] three"
        assert sorted(s.model for s in live(orch)) == ["lab/m1", "lab/m3"]
        assert not alive(m2.pid) and alive(m1.pid)
        stopped = orch.task_list(view="events", type="ModelServerStopped")
        assert [(e.data["instance_id"], e.data["reason"]) for e in stopped] == [
            (m2.instance_id, "evicted")
        ]
        summary = orch.task_list(view="explain", task_id=rec.task_id)[0].summary
        assert any(f"evicted model server {m2.instance_id}" in line for line in summary)
        orch.close(stop_workers=True)


def test_memory_budget_evicts_too(tmp_path: Path) -> None:
    cfg = tmp_path / "o.toml"
    cfg.write_text(config_text(max_servers=3, memory_mb=450))
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        for model in ("lab/m1", "lab/m2", "lab/m3"):  # 100 + 200 + 300 > 450
            assert run(orch, "coder", "x", model=model).status == "completed"
        assert sorted(s.model for s in live(orch)) == ["lab/m3"]  # 300 + 100 + 200 > 450 too
        orch.close(stop_workers=True)


def test_eviction_waits_for_the_request_in_flight(tmp_path: Path) -> None:
    cfg = tmp_path / "o.toml"
    cfg.write_text(config_text(max_servers=1))
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        assert run(orch, "coder", "x").status == "completed"
        (m1,) = live(orch)
        # Another orchestrator's request is in flight on m1: it holds the server's lease.
        other = Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}")
        held = other.servers.acquire("lab/m1", {"session_id": other.session_id})
        assert held is not None and held.entry.instance_id == m1.instance_id
        handle = orch.task_start(kind="worker", worker_id="coder", task="y", model="lab/m2")
        time.sleep(0.5)
        assert orch.task_peek(handle.task_id).status == "running"
        assert alive(m1.pid), "a server serving a request was evicted"
        held.release()
        rec = orch.task_await(handle.task_id, timeout=30)
        assert rec.status == "completed", rec.error
        wait_for(lambda: not alive(m1.pid), timeout=10)
        other.close()
        orch.close(stop_workers=True)


# --- failures ---------------------------------------------------------------------------------


def test_a_killed_server_is_found_exited_and_restarted(tmp_path: Path, config_file: Path) -> None:
    with Orchestrator.open(config=config_file, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        assert run(orch, "coder", "x").status == "completed"
        (first,) = live(orch)
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: not alive(first.pid))
        rec = run(orch, "coder", "after")
        assert rec.status == "completed" and rec.response == "[loaded m1.gguf] after"
        (second,) = live(orch)
        assert second.instance_id != first.instance_id
        rows = {s.instance_id: s for s in servers(orch)}
        assert rows[first.instance_id].status == "exited"
        (exited,) = orch.task_list(view="events", type="ModelServerExited")
        assert "status -9" in exited.data["detail"]
        orch.close(stop_workers=True)


def test_not_ready_in_time_fails_the_task_with_status_and_log(
    tmp_path: Path, config_file: Path, state_home: Path
) -> None:
    with Orchestrator.open(config=config_file, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        rec = run(orch, "coder", "x", model="stuck/s")
        assert rec.status == "failed"
        assert "was not ready within 1 s" in str(rec.error)
        assert "exit status -15" in str(rec.error)
        assert "loading /models/s.gguf" in str(rec.error)  # its last log lines
        assert "server.log" in str(rec.error)  # and where the log is
        (row,) = servers(orch)
        assert row.status == "stopped" and not alive(row.pid)
        assert model_server_processes(state_home) == []
        (failed,) = orch.task_list(view="events", type="ModelServerStartFailed")
        assert failed.data["exit_status"] == -15 and failed.data["stopped"] is True
        orch.close()


def test_a_crash_at_start_fails_the_task_with_its_exit_status(
    tmp_path: Path, config_file: Path, state_home: Path
) -> None:
    with Orchestrator.open(config=config_file, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        rec = run(orch, "coder", "x", model="lab/broken")
        assert rec.status == "failed"
        assert "exited with status 3 before it was ready" in str(rec.error)
        assert "bad magic number" in str(rec.error)
        assert model_server_processes(state_home) == []
        (row,) = servers(orch)
        assert row.status == "exited"
        # The log stays, and `orchestrator logs` shows it.
        out = cli("--store", f"sqlite:///{tmp_path / 'e.db'}", "logs", row.instance_id)
        assert "bad magic number" in out.stdout
        orch.close()


def test_a_command_that_cannot_run_fails_the_task(tmp_path: Path) -> None:
    cfg = load_config(
        {
            "providers": {
                "lab": {
                    "server": {"command": ["/nonexistent/llama-server", "--port", "{port}"]},
                    "models": {"m": {}},
                }
            }
        }
    )
    with Orchestrator.open(config=cfg, store="memory") as orch:
        rec = run(orch, "coder", "x", model="lab/m")
        assert rec.status == "failed"
        assert "could not be started: cannot run '/nonexistent/llama-server'" in str(rec.error)


# --- configuration and the CLI ---------------------------------------------------------------


def test_an_unknown_placeholder_is_a_one_line_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "orchestrator.toml"
    bad.write_text(config_text().replace('"{mode}"', '"{mood}"'))
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2  # the placeholder in both providers' commands
    assert (
        lines[0].startswith('o.toml: providers.lab.server.command[9]: unknown placeholder "{mood}"')
        or 'providers.lab.server.command[9]: unknown placeholder "{mood}"' in lines[0]
    )
    proc = cli("--config", str(bad), "config", "check", code=2)
    assert "Traceback" not in proc.stderr
    assert 'providers.lab.server.command[9]: unknown placeholder "{mood}"' in proc.stderr


def test_config_check_shows_each_managed_models_command(config_file: Path) -> None:
    out = cli("--config", str(config_file), "config", "check").stdout
    assert (
        f"server lab/m2: {sys.executable} {SERVER} --model /models/m2.gguf --port {{port}} "
        "--startup 0.1 --mode normal (ready: GET /v1/models)"
    ) in out


def test_stop_all_and_logs(tmp_path: Path, config_file: Path) -> None:
    store = f"sqlite:///{tmp_path / 'e.db'}"
    base = ["--store", store, "--config", str(config_file)]
    assert "[loaded m1.gguf]" in cli(*base, "run", "coder", "hi").stdout
    rows = json.loads(cli(*base, "registry", "--json").stdout)
    (server,) = [r for r in rows if r["kind"] == "model_server"]
    assert "loading /models/m1.gguf" in cli(*base, "logs", server["instance_id"]).stdout
    wrong = cli(*base, "logs", server["instance_id"][:-1] + "x", code=2)
    assert "Did you mean" in wrong.stderr
    out = cli(*base, "stop", "--all").stdout
    assert f"model server: stopped {server['instance_id']}" in out
    assert not alive(server["pid"])
    rows = json.loads(cli(*base, "registry", "--json").stdout)
    assert [r["status"] for r in rows if r["kind"] == "model_server"] == ["stopped"]


def test_set_model_with_respawn_starts_the_server_at_once(
    tmp_path: Path, config_file: Path
) -> None:
    with Orchestrator.open(config=config_file, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        rec = op(
            orch,
            "worker.model.set",
            worker={"worker_id": "coder", "model": "lab/m2", "respawn": True},
        )
        assert rec.status == "completed", rec.error
        assert [s.model for s in live(orch)] == ["lab/m2"]
        task = run(orch, "coder", "now")
        assert task.response == "[loaded m2.gguf] now"
        expl = orch.task_list(view="explain", task_id=task.task_id)[0]
        assert [c.action for c in expl.model_servers] == ["reused"]
        orch.close(stop_workers=True)


def test_an_idle_server_is_stopped_and_recorded(tmp_path: Path) -> None:
    cfg = tmp_path / "o.toml"
    # Agent workers: a worker process would go idle too, which is not what this is about.
    cfg.write_text(config_text(idle_timeout=1, backend="agent"))
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        assert run(orch, "coder", "x").status == "completed"
        (server,) = live(orch)
        wait_for(lambda: not alive(server.pid), timeout=10)
        (row,) = servers(orch)  # reading the registry records what happened
        assert row.status == "stopped"
        (stopped,) = orch.task_list(view="events", type="ModelServerStopped")
        assert stopped.data["reason"] == "idle"
        again = run(orch, "coder", "y")
        assert again.response == "[loaded m1.gguf] y", again.error  # started again
        orch.close(stop_workers=True)


# --- contention ---------------------------------------------------------------------------------

CONTEND = """
import sys
from orchestrator import Orchestrator
with Orchestrator.open(config=sys.argv[1], store=sys.argv[2], session_id=sys.argv[3]) as o:
    h = o.task_start(kind="worker", worker_id="coder", task="p")
    print(o.task_await(h.task_id, timeout=60).response)
"""


def test_threads_and_processes_asking_at_once_start_one_server(tmp_path: Path) -> None:
    cfg = tmp_path / "o.toml"
    cfg.write_text(config_text(startup=0.5))
    store = f"sqlite:///{tmp_path / 'e.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTEND, str(cfg), store, f"p{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    with Orchestrator.open(config=cfg, store=store) as orch:
        handles = [orch.task_start(kind="worker", worker_id="coder", task="t") for _ in range(4)]
        records = [orch.task_await(h.task_id, timeout=60) for h in handles]
        assert all(r.response == "[loaded m1.gguf] t" for r in records), records
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert out.strip() == "[loaded m1.gguf] p"
        assert len(orch.task_list(view="events", type="ModelServerStarted")) == 1
        assert len(live(orch)) == 1
        orch.close(stop_workers=True)


def test_a_starter_that_dies_before_registering_leaves_no_server(
    tmp_path: Path, state_home: Path
) -> None:
    cfg = tmp_path / "o.toml"
    cfg.write_text(config_text(startup=30))
    store = f"sqlite:///{tmp_path / 'e.db'}"
    proc = subprocess.Popen([sys.executable, "-c", CONTEND, str(cfg), store, "dies"])
    log = EventLog(store)
    try:
        wait_for(lambda: any(t == "ModelServerStarted" for t in _types(log)), timeout=30, every=0.1)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: model_server_processes(state_home) == [], timeout=10)
    finally:
        log.close()
    with Orchestrator.open(config=cfg, store=store) as orch:
        rows = servers(orch)
        assert [r.status for r in rows] == ["exited"]


def _types(log: EventLog) -> list[str]:
    return [record.type for record in log.records()]


# --- the state machine --------------------------------------------------------------------------

SESSIONS = ["s1", "s2"]
CHOICES = ["lab/m1", "lab/m2", "lab/m3"]
MAX = 2


class ModelServerMachine(RuleBasedStateMachine):
    """Tasks, set/reset, killed servers and idle ticks: at most MAX servers alive, never two
    for one fingerprint, no task failed by an eviction, replay = live."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()
        root = Path(self._tmp.name)
        cfg = root / "o.toml"
        cfg.write_text(config_text(max_servers=MAX, backend="agent", startup=0.0))
        self.log = EventLog(f"sqlite:///{root / 'e.db'}")
        self.orchs = {
            s: Orchestrator.open(config=cfg, store=self.log, session_id=s) for s in SESSIONS
        }
        self.overrides: dict[str, str] = {}

    def any_orch(self) -> Orchestrator:
        return self.orchs[SESSIONS[0]]

    def running(self) -> list[ModelServerEntry]:
        state = self.any_orch().pool.registry.refresh()
        return [s for s in state.servers.values() if s.live]

    @rule(session=st.sampled_from(SESSIONS), model=st.sampled_from([None, *CHOICES]))
    def task(self, session: str, model: str | None) -> None:
        kwargs = {"model": model} if model else {}
        rec = run(self.orchs[session], "coder", "q", **kwargs)
        wanted = model or self.overrides.get(session, "lab/m1")
        assert rec.status == "completed", rec.error
        assert rec.response == f"[loaded {wanted.split('/')[1]}.gguf] q"

    @rule(session=st.sampled_from(SESSIONS), model=st.sampled_from(CHOICES), now=st.booleans())
    def set(self, session: str, model: str, now: bool) -> None:
        rec = op(
            self.orchs[session],
            "worker.model.set",
            worker={"worker_id": "coder", "model": model, "respawn": now},
        )
        assert rec.status == "completed", rec.error
        self.overrides[session] = model

    @rule(session=st.sampled_from(SESSIONS))
    def reset(self, session: str) -> None:
        rec = op(self.orchs[session], "worker.model.reset", worker={"worker_id": "coder"})
        assert rec.status == "completed", rec.error
        self.overrides.pop(session, None)

    @rule(index=st.integers(0, MAX))
    def kill_server(self, index: int) -> None:
        found = [s for s in self.running() if alive(s.pid)]
        if found:
            victim = found[index % len(found)]
            os.kill(victim.pid, signal.SIGKILL)
            wait_for(lambda: not alive(victim.pid), timeout=10)

    @rule(index=st.integers(0, MAX))
    def idle_tick(self, index: int) -> None:
        """Time passes for one server: its last use moves past the idle timeout, and its
        supervisor stops it."""
        found = [s for s in self.running() if alive(s.pid)]
        if found:
            victim = found[index % len(found)]
            used = Path(victim.log_path).parent / "used"
            past = time.time() - 3600
            os.utime(used, (past, past))
            wait_for(lambda: not alive(victim.pid), timeout=10)

    @invariant()
    def bounded_and_single(self) -> None:
        alive_rows = [s for s in self.running() if alive(s.pid)]
        assert len(alive_rows) <= MAX
        fingerprints = [s.fingerprint for s in alive_rows]
        assert len(fingerprints) == len(set(fingerprints))

    @invariant()
    def replay_equals_live(self) -> None:
        live_state = self.any_orch().pool.registry.refresh()
        replayed = replay(self.log).registry
        assert replayed.servers == live_state.servers
        assert replayed.server_claims == live_state.server_claims

    def teardown(self) -> None:
        for orch in self.orchs.values():
            orch.close(stop_workers=True)
        self.log.close()
        self._tmp.cleanup()


TestModelServerMachine = ModelServerMachine.TestCase
TestModelServerMachine.settings = settings(max_examples=20, stateful_step_count=10, deadline=None)
