"""Reading a session without running one: what the views and the deciders read.

A `SessionReader` is the read side of a session: the log, the configuration, the session's
id and stream, the model catalogue, and the pure resolver calls on them (the model a
worker uses when a task names none, the process that decision asks for). It satisfies
`views.ViewContext` from a bare `EventLog`: it opens no backend, starts no process and
appends nothing. The `Session` (`orchestrator.session`) extends it with the writes and the
live backends.

A reader alone answers a worker's processes from the registry as recorded
(`RecordedProcesses`: this host's entries recorded as running, never probed, so one that
died unrecorded is still shown running), and refuses the views' writes (`NO_WRITES`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from events.catalogue import REGISTRY_STREAM
from events.projections import Override, Owner
from events.reads import overrides_at as read_overrides_at
from events.reads import session_tasks
from events.store import EventLog, Filter
from events.streams import registry_view, session_view
from orchestrator.api import InvalidTaskArgs
from orchestrator.backends import WorkerProcess, as_process
from orchestrator.backends.spec import WorkerSpec
from orchestrator.config import OrchestratorConfig, ProfileConfig, did_you_mean, load_config
from orchestrator.fingerprint import fingerprint, identity
from orchestrator.processes import host_id
from orchestrator.resolver import (
    CatalogueModel,
    ModelDecision,
    build_catalogue,
    check_worker,
    decide_model,
)
from orchestrator.reuse import recorded_live


def unknown_task(log: EventLog, session_id: str, task_id: str) -> InvalidTaskArgs:
    """The error for a task id the store does not know, with "Did you mean" among the
    session's tasks (the likely typo's neighbourhood)."""
    known = [t.task_id for t in session_tasks(log, session_id)]
    return InvalidTaskArgs(f'Unknown task "{task_id}".' + did_you_mean(task_id, known))


class ProcessReads(Protocol):
    """What a reader asks of the processes side: a worker's processes, as views show them."""

    def processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes (its in-process agent, those on this host)."""
        ...


class RecordedProcesses:
    """A worker's processes as the registry records them: this host's entries recorded as
    running. Nothing is probed and nothing recorded (a live orchestrator's pool records a
    process found gone first; a reader shows the log as it is)."""

    def __init__(self, log: EventLog, host: str) -> None:
        self.host = host
        self.registry = registry_view(log)

    def processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes on this host recorded as running (no agents: those live
        only inside the orchestrator process that made them)."""
        live = recorded_live(self.registry.refresh(), self.host, worker_id)
        return [as_process(e) for e in live]


class NoWrites:
    """A `views.ViewWriter` that writes nothing: a task whose owner is gone is shown as the
    log has it, and no process found gone is recorded."""

    def settle(self, session_id: str, task_id: str, owner: Owner | None) -> bool:
        """Never: ending a dead owner's task is a write."""
        return False

    def settle_workers(self) -> None:
        """Nothing: recording a process found gone is a write."""

    def settle_servers(self) -> None:
        """Nothing: recording a model server found gone is a write."""


NO_WRITES = NoWrites()


class SessionReader:
    """The read side of one session (see the module docstring). `config` is anything
    `load_config` takes (None: the discovered file, else the built-in default);
    `processes` None answers from the registry as recorded."""

    processes: ProcessReads

    def __init__(
        self,
        config: OrchestratorConfig | dict[str, Any] | str | Path | None,
        log: EventLog,
        session_id: str,
        processes: ProcessReads | None = None,
    ) -> None:
        self.config = load_config(config)
        self.log = log
        self.session_id = session_id
        self.host = host_id()
        self.processes = processes or RecordedProcesses(log, self.host)
        self.view = session_view(log, session_id)
        self._catalogues: dict[tuple[bool, ...], list[CatalogueModel]] = {}

    def catalogue(self) -> list[CatalogueModel]:
        """The model catalogue, with usability read from the environment now (built once
        per set of providers whose key is present; do not change the rows)."""
        keys = tuple(
            bool(p.api_key_env and os.environ.get(p.api_key_env))
            for p in self.config.providers.values()
        )
        found = self._catalogues.get(keys)
        if found is None:
            found = self._catalogues[keys] = build_catalogue(self.config, os.environ)
        return found

    # --- what deciders read (ops.OpContext, with the Session's `running`) --------------------

    def ids(self, task_id: str | None, worker_id: str | None) -> dict[str, Any]:
        """The ids every event about a task carries."""
        return {"session_id": self.session_id, "task_id": task_id, "worker_id": worker_id}

    def profile(self, worker_id: str) -> ProfileConfig:
        """The profile of a known worker id (raises `ResolutionError` with suggestions)."""
        return check_worker(worker_id, self.config)

    def override(self, worker_id: str) -> Override | None:
        """This session's override for a worker, as of the state this process knows. A
        decision reads it inside `Session.decide`, which catches up after a conflict; a
        read for its own sake goes through `session_decision`, which catches up first."""
        return self.view.state.overrides.get(worker_id)

    def in_registry(self, worker_id: str) -> bool:
        """Has the device registry ever recorded a process of the worker (one indexed row)?"""
        where = Filter(stream=REGISTRY_STREAM, worker_id=worker_id)
        return any(True for _ in self.log.select(where, limit=1))

    def overrides_at(self, session_id: str, position: int) -> dict[str, Override] | None:
        """A session's overrides as of a log position; None if it had no events by then."""
        return read_overrides_at(self.log, session_id, position)

    def head(self) -> int:
        """The newest log position."""
        return self.log.head()

    # --- what views read (views.ViewContext) -------------------------------------------------

    def owners(self) -> dict[str, Owner]:
        """This session's running tasks and the orchestrator process that owns each."""
        return dict(self.view.refresh().owners)

    def worker_processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes (its in-process agent, those on this host)."""
        return self.processes.processes(worker_id)

    def session_decision(self, worker_id: str) -> ModelDecision:
        """The model this session's worker uses when a task names none (read now)."""
        self.view.refresh()
        return decide_model(
            worker_id, None, self.override(worker_id), self.config, self.catalogue()
        )

    def worker_spec(self, worker_id: str, decision: ModelDecision) -> WorkerSpec:
        """The process a session-level decision asks for."""
        profile = self.profile(worker_id)
        ident = identity(
            worker_id,
            profile.backend,
            decision.resolved_model,
            decision.model_policy,
            profile,
            self.config,
        )
        return WorkerSpec(
            worker_id=worker_id,
            model=decision.resolved_model,
            model_policy=decision.model_policy,
            fingerprint=fingerprint(ident),
            identity=ident,
            system_prompt=profile.system_prompt,
            config=self.config,
        )
