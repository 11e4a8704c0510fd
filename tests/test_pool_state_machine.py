"""Stateful property test over real worker processes: set/reset/spawn/stop/crash/task.

The oracle keeps which processes are alive and what (model, policy) each was started for.
A request must reuse a live process with the session's (model, policy) when one exists and
spawn otherwise; every task must be served by the session's effective model; and the live
registry and sessions must equal a replay of the log. Few processes may run at once, so
spawns evict: no task ever fails because the process serving it was evicted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

import psutil
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from events import EventLog, SessionState, replay
from orchestrator import Orchestrator, pool
from orchestrator.history import apply_diff, flatten
from tests.helpers import (
    assert_replay_view_matches,
    config_with,
    op,
    reset_model,
    run,
    set_model,
    wait_for,
)

SESSIONS = ["s1", "s2"]
WORKERS = ["coder", "explorer"]
DEFAULTS = {"coder": "local/echo-large", "explorer": "local/echo-small"}
MODELS = ["local/echo-large", "local/echo-small"]
# Room for fewer processes than the machine asks for, so spawns evict; and a short grace
# for recently acquired processes, so a spawn waits a fraction of a second, not 5 s.
MAX_PROCESSES = 2
GRACE = 0.3


class PoolMachine(RuleBasedStateMachine):
    """Reuse follows fingerprints; dead processes are never handed out."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.log = EventLog(f"sqlite:///{Path(self._tmp.name) / 'e.db'}")
        cfg = config_with("server")
        cfg.pool.max_processes = MAX_PROCESSES
        self._grace, pool.ACQUIRED_GRACE = pool.ACQUIRED_GRACE, GRACE
        self.orchs = {
            s: Orchestrator.open(config=cfg, store=self.log, session_id=s) for s in SESSIONS
        }
        self.overrides: dict[tuple[str, str], str] = {}
        # instance_id -> (worker_id, model, policy, pid)
        self.live: dict[str, tuple[str, str, str, int]] = {}
        # instance_id -> the sessions that have used it (respawn retires only a lone user's)
        self.used: dict[str, set[str]] = {}

    def wanted(self, session: str, worker: str) -> tuple[str, str]:
        if (session, worker) in self.overrides:
            return self.overrides[(session, worker)], "sticky"
        return DEFAULTS[worker], "dynamic"

    def forget_evicted(self) -> None:
        """Evictions are the pool's to choose: learn them from the log."""
        stops = self.orchs["s1"].task_list(view="events", type="WorkerStopped")
        for stop in stops:
            if stop.data["reason"] == "evicted":
                self.live.pop(stop.data["instance_id"], None)

    def matching(self, session: str, worker: str) -> set[str]:
        model, policy = self.wanted(session, worker)
        return {i for i, (w, m, p, _) in self.live.items() if (w, m, p) == (worker, model, policy)}

    def check_acquired(self, session: str, worker: str, instance_id: str, pid: int) -> None:
        # Only a spawn evicts, and only when nothing matched: no match is forgotten here.
        self.forget_evicted()
        before = self.matching(session, worker)
        if before:
            assert instance_id in before, "a matching live process existed but was not reused"
        else:
            assert instance_id not in self.live, "no match was alive, yet nothing was spawned"
            model, policy = self.wanted(session, worker)
            self.live[instance_id] = (worker, model, policy, pid)
        self.used.setdefault(instance_id, set()).add(session)

    @rule(
        session=st.sampled_from(SESSIONS),
        worker=st.sampled_from(WORKERS),
        model=st.sampled_from(MODELS),
    )
    def set(self, session: str, worker: str, model: str) -> None:
        assert set_model(self.orchs[session], worker, model).status == "completed"
        self.overrides[(session, worker)] = model

    @rule(session=st.sampled_from(SESSIONS), worker=st.sampled_from(WORKERS))
    def reset(self, session: str, worker: str) -> None:
        assert reset_model(self.orchs[session], worker).status == "completed"
        self.overrides.pop((session, worker), None)

    @rule(session=st.sampled_from(SESSIONS), worker=st.sampled_from(WORKERS))
    def task(self, session: str, worker: str) -> None:
        orch = self.orchs[session]
        rec = run(orch, worker, "ping")
        assert rec.status == "completed", rec.error
        model, _ = self.wanted(session, worker)
        assert rec.response == f"[{model}] ping"
        done = orch.task_list(view="events", type="TaskCompleted", task_id=rec.task_id)[0]
        self.check_acquired(session, worker, done.data["instance_id"], done.data["pid"])

    @rule(
        session=st.sampled_from(SESSIONS),
        worker=st.sampled_from(WORKERS),
        model=st.sampled_from(MODELS),
    )
    def respawn_with_a_task_in_flight(self, session: str, worker: str, model: str) -> None:
        """The other session has a task in flight; this one sets a model with respawn."""
        self.forget_evicted()
        other = next(s for s in SESSIONS if s != session)
        orch = self.orchs[other]
        handle = orch.task_start(kind="worker", worker_id=worker, task="in flight")
        taken = wait_for(lambda: self._acquired(orch, handle.task_id))
        self.check_acquired(other, worker, *taken)
        before = self.matching_for(worker, model, "sticky")
        old = {
            i
            for i, v in self.live.items()
            if v[0] == worker and session in self.used[i] and (v[1], v[2]) != (model, "sticky")
        }
        rec = set_model(self.orchs[session], worker, model, respawn=True)
        assert rec.status == "completed", rec.error
        assert rec.result["respawned"] is True
        self.overrides[(session, worker)] = model
        done = orch.task_await(handle.task_id, timeout=60)
        assert done.status == "completed", done.error  # respawn never fails a task
        assert done.response == f"[{self.wanted(other, worker)[0]}] in flight"
        ready = {
            e.instance_id: e.pid
            for e in orch.task_list(view="registry")
            if e.status == "ready"
            and (e.worker_id, e.model, e.model_policy) == (worker, model, "sticky")
        }
        if before:
            assert set(ready) == before, "respawn spawned although a match was running"
        else:
            assert len(ready) == 1, "respawn did not start the process the new model asks for"
            instance_id, pid = next(iter(ready.items()))
            self.live[instance_id] = (worker, model, "sticky", pid)
        for instance_id in ready:
            self.used.setdefault(instance_id, set()).add(session)
        # Only a process no other session used is retired; it drains, then stops.
        retired = {i for i in old if self.used[i] == {session}}
        for instance_id in retired:
            pid = self.live.pop(instance_id)[3]
            wait_for(lambda pid=pid: self._gone(pid))
        wait_for(lambda: retired <= self._stopped(orch))

    def matching_for(self, worker: str, model: str, policy: str) -> set[str]:
        return {i for i, (w, m, p, _) in self.live.items() if (w, m, p) == (worker, model, policy)}

    def _acquired(self, orch: Orchestrator, task_id: str) -> tuple[str, int] | None:
        for row in orch.task_list(view="events", task_id=task_id):
            if row.type in ("WorkerReused", "WorkerSpawned"):
                instance_id = row.data["instance_id"]
                pids = {e.instance_id: e.pid for e in orch.task_list(view="registry")}
                return instance_id, pids[instance_id]
        return None

    def _gone(self, pid: int) -> bool:
        for orch in self.orchs.values():
            orch.pool.reap_children()
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def _stopped(self, orch: Orchestrator) -> set[str]:
        return {e.instance_id for e in orch.task_list(view="registry") if e.status == "stopped"}

    @rule(session=st.sampled_from(SESSIONS), worker=st.sampled_from(WORKERS))
    def spawn(self, session: str, worker: str) -> None:
        result = op(self.orchs[session], "worker.spawn", worker={"worker_id": worker}).result
        assert result["reused"] == bool(self.matching(session, worker))
        self.check_acquired(session, worker, result["instance_id"], result["pid"])

    @rule(session=st.sampled_from(SESSIONS), worker=st.sampled_from(WORKERS))
    def stop(self, session: str, worker: str) -> None:
        self.forget_evicted()
        result = op(self.orchs[session], "worker.stop", worker={"worker_id": worker}).result
        expected = {i for i, v in self.live.items() if v[0] == worker}
        assert set(result["stopped"]) == expected
        assert not set(result["exited"]) & expected
        for instance_id in expected:
            del self.live[instance_id]

    @rule(
        session=st.sampled_from(SESSIONS),
        worker=st.sampled_from(WORKERS),
        force_new=st.booleans(),
    )
    def task_while_another_session_spawns(self, session: str, worker: str, force_new: bool) -> None:
        """A task runs while the other session spawns a process for the other worker (with
        force_new, always a spawn that needs room): the task completes, whatever is evicted."""
        other = next(s for s in SESSIONS if s != session)
        other_worker = next(w for w in WORKERS if w != worker)
        orch = self.orchs[session]
        handle = orch.task_start(kind="worker", worker_id=worker, task="busy")
        spawned = op(
            self.orchs[other],
            "worker.spawn",
            worker={"worker_id": other_worker, "force_new": force_new},
        )
        rec = orch.task_await(handle.task_id, timeout=60)
        assert rec.status == "completed", rec.error  # never "stopped answering while serving"
        assert rec.response == f"[{self.wanted(session, worker)[0]}] busy"
        assert spawned.status == "completed", spawned.error
        # Which of the two acquired first is a race: learn what each got, without judging
        # reuse against spawn.
        self.forget_evicted()
        done = orch.task_list(view="events", type="TaskCompleted", task_id=rec.task_id)[0]
        got = [
            (session, worker, done.data["instance_id"], done.data["pid"]),
            (other, other_worker, spawned.result["instance_id"], spawned.result["pid"]),
        ]
        stopped = self._stopped(orch)
        for sid, wid, instance_id, pid in got:
            if instance_id not in stopped and instance_id not in self.live:
                self.live[instance_id] = (wid, *self.wanted(sid, wid), pid)
            self.used.setdefault(instance_id, set()).add(sid)

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.forget_evicted()
        if not self.live:
            return
        instance_id = data.draw(st.sampled_from(sorted(self.live)))
        pid = self.live.pop(instance_id)[3]
        os.kill(pid, signal.SIGKILL)
        for orch in self.orchs.values():
            orch.pool.reap_children()  # our own child: collect it so it is not a zombie
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=10)

    @rule(data=st.data())
    def diff(self, data: st.DataObject) -> None:
        """diff(p, q) applied to the state at p (processes, claims' outcomes, tasks) gives
        the state at q."""
        head = self.log.head()
        p = data.draw(st.integers(min_value=0, max_value=head))
        q = data.draw(st.integers(min_value=p, max_value=head))
        rows = self.orchs["s1"].task_list(view="diff", since=p, until=q)
        assert apply_diff(flatten(replay(self.log, until=p)), rows) == flatten(
            replay(self.log, until=q)
        )

    @invariant()
    def replay_equals_live(self) -> None:
        replayed = replay(self.log)
        for sid, orch in self.orchs.items():
            assert (
                replayed.sessions.get(sid, SessionState(session_id=sid)).model_dump()
                == orch.session.refresh().model_dump()
            )
        live_registry = self.orchs["s1"].pool.registry.refresh()
        assert replayed.registry.model_dump() == live_registry.model_dump()

    @invariant()
    def replay_view_equals_live_views(self) -> None:
        assert_replay_view_matches(self.orchs.values())

    def teardown(self) -> None:
        pool.ACQUIRED_GRACE = self._grace
        for orch in self.orchs.values():
            for entry in orch.pool.live_entries():
                orch.pool.stop(entry, {"session_id": orch.session_id})
            orch.close()
        self.log.close()
        self._tmp.cleanup()


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=6, stateful_step_count=18)
