"""Stateful property test: random set/reset/task/config-change sequences over two sessions.

After every task the model that served it (read from the echo reply) must equal an oracle
written independently of the resolver; after every step, replaying the log from scratch must
equal the live state, including state loaded from snapshots.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import events.streams
from events import EventLog, SessionState, replay
from orchestrator import Orchestrator
from orchestrator.config import ModelInfo, OrchestratorConfig
from orchestrator.history import apply_diff, flatten
from tests.conftest import postgres_schema
from tests.helpers import assert_replay_view_matches, config_with, reset_model, run, set_model

SESSIONS = ["s1", "s2"]
WORKERS = ["coder", "docs", "explorer", "vision"]
REFS = [
    "local/echo-large",
    "local/echo-small",
    "local/echo-vision",
    "local/echo-tiny",
    "auto",
    "auto:fast",
    "auto:vision",
    "auto:docs",
    "node:fast",
]
PROFILE_REFS = {
    "coder": "auto",
    "docs": "auto:docs",
    "explorer": "auto:fast",
    "vision": "auto:vision",
}


def make_config(small_model: str) -> OrchestratorConfig:
    cfg = config_with("agent", small_model=small_model)
    cfg.providers["local"].models["echo-tiny"] = ModelInfo(name="Tiny", cost_input=0.01)
    return cfg


def oracle_resolve(ref: str, small_model: str) -> str:
    """What a reference means, by hand, for this test's catalogue."""
    ref = ref.replace("node", "auto")
    return {
        "auto": "local/echo-large",
        "auto:fast": small_model,
        "auto:vision": "local/echo-vision",
        "auto:docs": "local/echo-large",
    }.get(ref, ref)


class ModelSelection(RuleBasedStateMachine):
    """The model serving each task follows precedence, policy and session scope."""

    store_kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._saved_every = events.streams.SNAPSHOT_EVERY
        events.streams.SNAPSHOT_EVERY = 5  # exercise snapshot loading in short runs
        self._tmp = tempfile.TemporaryDirectory()
        self._schema = contextlib.ExitStack()
        if self.store_kind == "postgresql":
            url = self._schema.enter_context(postgres_schema())
        elif self.store_kind == "sqlite":
            url = f"sqlite:///{Path(self._tmp.name) / 'e.db'}"
        else:
            url = "memory"
        self.url = url
        self.log = EventLog(url)
        self.small_model = "local/echo-small"
        self.overrides: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.orchs = self._open_all()

    def _open_all(self) -> dict[str, Orchestrator]:
        cfg = make_config(self.small_model)
        return {s: Orchestrator.open(config=cfg, store=self.log, session_id=s) for s in SESSIONS}

    def expected(self, session: str, worker: str, task_model: str | None) -> str:
        if task_model:
            return oracle_resolve(task_model, self.small_model)
        if (session, worker) in self.overrides:
            ref, policy, pinned = self.overrides[(session, worker)]
            return pinned if policy == "sticky" else oracle_resolve(ref, self.small_model)
        return oracle_resolve(PROFILE_REFS[worker], self.small_model)

    @rule(
        session=st.sampled_from(SESSIONS),
        worker=st.sampled_from(WORKERS),
        ref=st.sampled_from(REFS),
        policy=st.sampled_from(["sticky", "dynamic"]),
    )
    def set(self, session: str, worker: str, ref: str, policy: str) -> None:
        rec = set_model(self.orchs[session], worker, ref, model_policy=policy)
        pinned = oracle_resolve(ref, self.small_model)
        assert rec.status == "completed", rec.error
        assert rec.result["model"] == pinned
        self.overrides[(session, worker)] = (ref, policy, pinned)

    @rule(
        session=st.sampled_from(SESSIONS),
        worker=st.sampled_from(WORKERS),
        ref=st.sampled_from(REFS),
        reset=st.booleans(),
    )
    def other_process(self, session: str, worker: str, ref: str, reset: bool) -> None:
        """A second orchestrator process on the same session sets or resets a worker's
        model; this process's next task must follow it (it has not read the session since).
        On the memory store, which no other process can open, a second orchestrator."""
        if self.store_kind == "memory":
            other = Orchestrator.open(
                config=make_config(self.small_model), store=self.log, session_id=session
            )
            try:
                rec = reset_model(other, worker) if reset else set_model(other, worker, ref)
                assert rec.status == "completed", rec.error
            finally:
                other.close()
        else:
            code = (
                "import sys\n"
                "from orchestrator import Orchestrator\n"
                "from tests.helpers import reset_model, set_model\n"
                "from tests.test_model_state_machine import make_config\n"
                "url, session, worker, ref, reset, small = sys.argv[1:]\n"
                "cfg = make_config(small)\n"
                "with Orchestrator.open(config=cfg, store=url, session_id=session) as o:\n"
                "    rec = reset_model(o, worker) if reset == '1' else set_model(o, worker, ref)\n"
                "    assert rec.status == 'completed', rec.error\n"
            )
            args = [self.url, session, worker, ref, "1" if reset else "0", self.small_model]
            done = subprocess.run(
                [sys.executable, "-c", code, *args],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=Path(__file__).parent.parent,
                check=False,
            )
            assert done.returncode == 0, done.stderr
        if reset:
            self.overrides.pop((session, worker), None)
        else:
            self.overrides[(session, worker)] = (
                ref,
                "sticky",
                oracle_resolve(ref, self.small_model),
            )

    @rule(
        session=st.sampled_from(SESSIONS),
        worker=st.sampled_from(WORKERS),
        policy=st.sampled_from(["sticky", "dynamic"]),
    )
    def set_fast(self, session: str, worker: str, policy: str) -> None:
        """The tag whose meaning changes with config: where sticky and dynamic part ways."""
        self.set(session, worker, "auto:fast", policy)

    @rule(session=st.sampled_from(SESSIONS), worker=st.sampled_from(WORKERS))
    def reset(self, session: str, worker: str) -> None:
        rec = reset_model(self.orchs[session], worker)
        assert rec.status == "completed", rec.error
        self.overrides.pop((session, worker), None)
        assert rec.result["model"] == self.expected(session, worker, None)

    @rule(
        session=st.sampled_from(SESSIONS),
        worker=st.sampled_from(WORKERS),
        task_model=st.none() | st.sampled_from(REFS),
        text=st.text(min_size=1, max_size=8),
    )
    def task(self, session: str, worker: str, task_model: str | None, text: str) -> None:
        kwargs = {"model": task_model} if task_model else {}
        rec = run(self.orchs[session], worker, text, **kwargs)
        want = self.expected(session, worker, task_model)
        assert rec.status == "completed", rec.error
        assert rec.response == f"[{want}] {text}"
        assert rec.model == want

    @rule(source=st.sampled_from(SESSIONS), by=st.sampled_from(SESSIONS), data=st.data())
    def fork(self, source: str, by: str, data: st.DataObject) -> None:
        """A fork at p starts with exactly the overrides replay gives the source at p."""
        position = data.draw(st.integers(min_value=0, max_value=self.log.head()))
        orch = self.orchs[by]
        handle = orch.task_start(
            kind="op", op="session.fork", session={"fromSessionId": source, "position": position}
        )
        rec = orch.task_await(handle.task_id, timeout=30)
        at_p = replay(self.log, until=position).sessions.get(source)
        if at_p is None:
            assert rec.status == "failed" and "no events" in str(rec.error)
            return
        assert rec.status == "completed", rec.error
        assert rec.result is not None
        want = {
            w: {
                "model_ref": o.model_ref,
                "resolved_model": o.resolved_model,
                "model_policy": o.model_policy,
            }
            for w, o in at_p.overrides.items()
        }
        assert rec.result["overrides"] == want
        forked = Orchestrator.open(
            config=make_config(self.small_model),
            store=self.log,
            session_id=rec.result["session_id"],
        )
        try:
            assert forked.session.refresh().overrides == at_p.overrides
        finally:
            forked.close()

    @rule(data=st.data())
    def diff(self, data: st.DataObject) -> None:
        """diff(p, q) applied to the state at p gives the state at q."""
        head = self.log.head()
        p = data.draw(st.integers(min_value=0, max_value=head))
        q = data.draw(st.integers(min_value=p, max_value=head))
        rows = self.orchs["s1"].task_list(view="diff", since=p, until=q)
        before = flatten(replay(self.log, until=p))
        assert apply_diff(before, rows) == flatten(replay(self.log, until=q))

    @rule(small=st.sampled_from(["local/echo-small", "local/echo-tiny"]))
    def change_config_and_resume(self, small: str) -> None:
        for orch in self.orchs.values():
            orch.close()
        self.small_model = small
        self.orchs = self._open_all()

    @invariant()
    def replay_equals_live(self) -> None:
        replayed = replay(self.log)
        for sid, orch in self.orchs.items():
            live = orch.session.refresh()
            assert (
                replayed.sessions.get(sid, SessionState(session_id=sid)).model_dump()
                == live.model_dump()
            )
        fresh = Orchestrator.open(
            config=make_config(self.small_model), store=self.log, session_id="observer"
        )
        try:
            assert fresh.pool.registry.refresh().model_dump() == replayed.registry.model_dump()
        finally:
            fresh.close()

    @invariant()
    def replay_view_equals_live_views(self) -> None:
        assert_replay_view_matches(self.orchs.values())

    def teardown(self) -> None:
        for orch in self.orchs.values():
            orch.close()
        self.log.close()
        self._schema.close()
        self._tmp.cleanup()
        events.streams.SNAPSHOT_EVERY = self._saved_every


class ModelSelectionOnSQLite(ModelSelection):
    store_kind = "sqlite"


class ModelSelectionOnPostgres(ModelSelection):
    store_kind = "postgresql"


TestModelSelection = ModelSelection.TestCase
TestModelSelection.settings = settings(max_examples=25, stateful_step_count=25)
TestModelSelectionOnSQLite = ModelSelectionOnSQLite.TestCase
TestModelSelectionOnSQLite.settings = settings(max_examples=8, stateful_step_count=20)
TestModelSelectionOnPostgres = ModelSelectionOnPostgres.TestCase
TestModelSelectionOnPostgres.settings = settings(max_examples=5, stateful_step_count=15)
