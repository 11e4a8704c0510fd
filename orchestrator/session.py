"""One session of the event log: the decide side of the orchestrator.

A `Session` holds the log, the configuration, the session's id and the live views of the
streams it writes, with the caches that keep decisions cheap (the model catalogue, the
configuration's digest). It is the context the op deciders and the views read, and the
only writer of the log in this process: `record(*events)` sends each event to the stream
its class declares (this session's, another session's, the registry, memory, models,
config), in one transaction, bringing `SessionOpened` and `ConfigRecorded` itself.
It is also the `ViewContext` the views read. It starts no process and runs no task: that
is the `TaskRunner`'s (`orchestrator.runner`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from events.catalogue import (
    CONFIG_STREAM,
    MEMORY_STREAM,
    MODELS_STREAM,
    REGISTRY_STREAM,
    ConfigRecorded,
    Event,
    ModelResolved,
    SessionOpened,
    TaskFailed,
    stream_of,
)
from events.logs import get_logger
from events.projections import (
    ModelsState,
    Override,
    Owner,
    RegistryState,
    apply_models,
)
from events.reads import last_config
from events.reads import overrides_at as read_overrides_at
from events.store import EventLog, Filter, StoreError, StoreMoved, StreamConflict
from events.streams import Appendable, StreamTail, StreamView, append_together, session_view
from orchestrator.backends import WorkerProcess
from orchestrator.backends.spec import WorkerSpec
from orchestrator.config import OrchestratorConfig, ProfileConfig
from orchestrator.errors import OrchestratorError
from orchestrator.fingerprint import fingerprint, identity
from orchestrator.history import recorded_config
from orchestrator.processes import host_id, own_identity, process_state
from orchestrator.resolver import (
    CatalogueModel,
    ModelDecision,
    build_catalogue,
    check_worker,
    decide_model,
)

_T = TypeVar("_T")
# Each retry means another writer's decision landed first; this many in a row means a storm.
MAX_REDECIDE = 200
_log = get_logger("orchestrator")


class Processes(Protocol):
    """What a session reads of the processes side: the registry's live view (it appends
    registry facts to it) and whether a worker's process runs."""

    @property
    def registry(self) -> StreamView[RegistryState]:
        """The device registry's live view."""
        ...

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running?"""
        ...

    def abandon(self) -> None:
        """The store went away: stop what was started here."""
        ...

    def processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes (its in-process agent, those on this host), as the
        views show them."""
        ...


class Session:
    """One session's log, configuration and streams (see the module docstring)."""

    def __init__(
        self, config: OrchestratorConfig, log: EventLog, session_id: str, processes: Processes
    ) -> None:
        self.config = config
        self.log = log
        self.session_id = session_id
        self.host = host_id()
        self.processes = processes
        self.view = session_view(log, session_id)
        self.memory = StreamTail(log, MEMORY_STREAM)  # written to, never folded here
        self.models = StreamView(log, MODELS_STREAM, ModelsState, apply_models)
        self._config_stream = StreamTail(log, CONFIG_STREAM)
        self._others: dict[str, StreamTail] = {}  # other sessions' streams written to
        self._opened_recorded = False
        self._catalogues: dict[tuple[bool, ...], list[CatalogueModel]] = {}
        self._configs: dict[tuple[str, ...], tuple[str, dict[str, Any]]] = {}
        self._recorded_digest: str | None = None  # the newest ConfigRecorded, once read
        self.moved: StoreMoved | None = None  # the store file went away under us

    # --- writing ----------------------------------------------------------------------------

    def record(self, *events: Event, decided: int | None = None) -> list[int]:
        """Append facts in one transaction, each to the stream its class declares, retrying
        past other writers. The first write to this session's stream also records
        `SessionOpened`, so merely looking (views, CLI inspection) leaves the log unchanged;
        a decision made under a configuration the log has not recorded last brings its
        `ConfigRecorded`.

        `decided`: the batch is a decision on this session's state at that stream version,
        so any other append to the session since raises `StreamConflict` (see `decide`)
        instead of being retried past."""
        batch = [*events, *self._config_events(events)]
        mine = self.view.stream
        with self.view.lock:
            opened = None
            if not self._opened_recorded and any(stream_of(e) == mine for e in batch):
                self.view.refresh()
                opened = SessionOpened(
                    session_id=self.session_id,
                    resumed=self.view.version > 0,
                    host=self.host,
                    pid=os.getpid(),
                )
                batch.insert(0, opened)
                self._opened_recorded = True
            try:
                positions = append_together(
                    *self._routed(batch),
                    decided_on=None if decided is None else (self.view, decided),
                )
            except StreamConflict:
                if opened is not None:
                    self._opened_recorded = False  # it did not land: the next write brings it
                raise
            except StoreMoved as exc:
                self._store_moved(exc)
                raise
        self._recorded_digest = next(
            (e.config_digest for e in reversed(batch) if isinstance(e, ConfigRecorded)),
            self._recorded_digest,
        )
        return positions

    def _routed(self, batch: Sequence[Event]) -> list[tuple[Appendable, list[Event]]]:
        """The batch split by stream, in the order the streams first appear."""
        groups: dict[str, list[Event]] = {}
        for event in batch:
            groups.setdefault(stream_of(event), []).append(event)
        return [(self._stream(name), group) for name, group in groups.items()]

    def _stream(self, name: str) -> Appendable:
        fixed: dict[str, Appendable] = {
            self.view.stream: self.view,
            REGISTRY_STREAM: self.processes.registry,
            MEMORY_STREAM: self.memory,
            MODELS_STREAM: self.models,
            CONFIG_STREAM: self._config_stream,
        }
        found = fixed.get(name)
        if found is None:
            found = self._others.get(name)
            if found is None:
                found = self._others[name] = StreamTail(self.log, name)
        return found

    def _store_moved(self, exc: StoreMoved) -> None:
        """The store file was deleted or replaced: stop the processes started here (their
        registry is unreachable) and refuse every later call with the same one line."""
        if self.moved is None:
            self.moved = exc
            _log.error("store moved", error=str(exc))
            self.processes.abandon()

    def check_moved(self) -> None:
        """Raise `StoreMoved` again if the store went away."""
        if self.moved is not None:
            raise StoreMoved(str(self.moved))

    def decide(self, attempt: Callable[[int], _T]) -> _T:
        """Run `attempt(version)` (decide on the session as of `version`, then
        `record(..., decided=version)`) until no other writer, thread or process, has moved
        the session between the read and the append: a decision is recorded against the
        state it was decided on, never a stale one. No lock is held while deciding."""
        for attempt_no in range(MAX_REDECIDE):
            # Optimistic, like every append: decide on the state this process knows; another
            # writer's append shows up as a conflict, and only then costs a read.
            if attempt_no or not self.view.known:
                self.view.refresh()
            version = self.view.version
            try:
                return attempt(version)
            except StreamConflict:
                continue
        raise StoreError(
            f"session {self.session_id} kept changing under {MAX_REDECIDE} decisions in a "
            "row; try again"
        )

    def settle(self, session_id: str, task_id: str, owner: Owner | None) -> bool:
        """End a running task whose owning orchestrator process is gone; True if it did."""
        if owner is None or self._owner_alive(owner):
            return False
        error = (
            f"The orchestrator process that ran this task (pid {owner.pid} on host "
            f"{owner.host}) is gone; the task was ended failed by pid {os.getpid()}. "
            "Start it again."
        )
        self.record(TaskFailed(session_id=session_id, task_id=task_id, error=error))
        return True

    def _owner_alive(self, owner: Owner) -> bool:
        if (owner.pid, owner.pid_started_at) == own_identity() and owner.host == self.host:
            return True
        if owner.host == self.host:
            return process_state(owner.pid, owner.pid_started_at) == "alive"
        return self.log.host_alive(owner.host)

    # --- the configuration ------------------------------------------------------------------

    def config_digest(self, catalogue: list[CatalogueModel]) -> str:
        """The digest of this configuration as a decision with `catalogue` sees it."""
        return self._config_record(catalogue)[0]

    def _config_record(self, catalogue: list[CatalogueModel]) -> tuple[str, dict[str, Any]]:
        usable = tuple(sorted({row.provider for row in catalogue if row.usable}))
        found = self._configs.get(usable)
        if found is None:
            found = self._configs[usable] = recorded_config(self.config, catalogue)
        return found

    def _config_events(self, batch: Sequence[Event]) -> list[Event]:
        """`ConfigRecorded` for the configuration of the decisions in `batch`, unless it is
        the one the log recorded last (read from the store once per orchestrator)."""
        digest = next(
            (e.config_digest for e in batch if isinstance(e, ModelResolved) and e.config_digest),
            None,
        )
        if digest is None or digest == self._recorded_digest:
            return []
        if self._recorded_digest is None:
            self._recorded_digest = last_config(self.log)
            if digest == self._recorded_digest:
                return []
        payload = next((p for d, p in self._configs.values() if d == digest), None)
        if payload is None:  # a digest made elsewhere: this configuration, as seen now?
            now, payload = self._config_record(self.catalogue())
            if now != digest:
                raise OrchestratorError(
                    f"A decision names configuration {digest}, which this session never saw."
                )
        return [ConfigRecorded(session_id=self.session_id, config_digest=digest, **payload)]

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

    # --- what deciders read (ops.OpContext) --------------------------------------------------

    def ids(self, task_id: str | None, worker_id: str | None) -> dict[str, Any]:
        """The ids every event about a task carries."""
        return {"session_id": self.session_id, "task_id": task_id, "worker_id": worker_id}

    def profile(self, worker_id: str) -> ProfileConfig:
        """The profile of a known worker id (raises `ResolutionError` with suggestions)."""
        return check_worker(worker_id, self.config)

    def override(self, worker_id: str) -> Override | None:
        """This session's override for a worker, as of the state this process knows. A
        decision reads it inside `decide`, which catches up after a conflict; a read for
        its own sake goes through `session_decision`, which catches up first."""
        return self.view.state.overrides.get(worker_id)

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running (on its backend)?"""
        return self.processes.running(worker_id)

    def owners(self) -> dict[str, Owner]:
        """This session's running tasks and the orchestrator process that owns each."""
        return dict(self.view.refresh().owners)

    def worker_processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes (its in-process agent, those on this host)."""
        return self.processes.processes(worker_id)

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
