"""One session of the event log: the decide side of the orchestrator.

A `Session` is a `SessionReader` (`orchestrator.reading`: the log, the configuration, the
session's id and stream, the catalogue and what deciders and views read) that also writes,
over the live backends. It is the only writer of the log in this process: `record(*events)`
sends each event to the stream its class declares (this session's, another session's, the
registry, memory, models, config), in one transaction, bringing `SessionOpened` and
`ConfigRecorded` itself. It is the context the op deciders and the views read, answers
`peek` (ending a task whose owning process is gone), and `SessionWriter` is the views'
writer over it. It starts no process and runs no task: that is the `TaskRunner`'s
(`orchestrator.runner`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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
from events.projections import ModelsState, Owner, RegistryState, TaskRecord, apply_models
from events.reads import last_config, read_task
from events.store import EventLog, StoreError, StoreMoved, StreamConflict
from events.streams import Appendable, StreamTail, StreamView, append_together
from orchestrator.api import check_task_id
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import OrchestratorError
from orchestrator.history import recorded_config
from orchestrator.processes import own_identity, process_state
from orchestrator.reading import ProcessReads, SessionReader, unknown_task
from orchestrator.resolver import CatalogueModel

_T = TypeVar("_T")
# Each retry means another writer's decision landed first; this many in a row means a storm.
MAX_REDECIDE = 200
_log = get_logger("orchestrator")


class Processes(ProcessReads, Protocol):
    """What a session reads of the processes side: the registry's live view (it appends
    registry facts to it), whether a worker's process runs, and what the views show."""

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


class Session(SessionReader):
    """One session's log, configuration and streams (see the module docstring)."""

    processes: Processes

    def __init__(
        self, config: OrchestratorConfig, log: EventLog, session_id: str, processes: Processes
    ) -> None:
        super().__init__(config, log, session_id, processes)
        self.memory = StreamTail(log, MEMORY_STREAM)  # written to, never folded here
        self.models = StreamView(log, MODELS_STREAM, ModelsState, apply_models)
        self._config_stream = StreamTail(log, CONFIG_STREAM)
        self._others: dict[str, StreamTail] = {}  # other sessions' streams written to
        self._opened_recorded = False
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

    def peek(self, task_id: str) -> TaskRecord:
        """A task's record now, whatever session started it; never blocks. A task left
        running by an orchestrator process that is gone is ended `failed` here, naming that
        process."""
        self.check_moved()
        check_task_id(task_id)
        state = self.view.state
        task = state.task(task_id)
        if task is None or task.status == "running":
            # Only a running or unknown task can have changed: a finished one never does.
            state = self.view.refresh()
            task = state.task(task_id)
        if task is None:
            return self._foreign_task(task_id)
        owner = state.owners.get(task_id)
        if task.status == "running" and self.settle(self.session_id, task_id, owner):
            return self.peek(task_id)
        return task.model_copy()

    def _foreign_task(self, task_id: str) -> TaskRecord:
        """A task of another session (or an old one of this session), read through the
        index; one left running by a dead orchestrator is ended first."""
        found = read_task(self.log, task_id)
        if found is None:
            raise unknown_task(self.log, self.session_id, task_id)
        task, owner = found
        if owner is not None and self.settle(task.session_id, task_id, owner):
            found = read_task(self.log, task_id)
            assert found is not None
            task = found[0]
        return task

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

    # --- what deciders read besides the reader's (ops.OpContext) ------------------------------

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running (on its backend)?"""
        return self.processes.running(worker_id)


class SessionWriter:
    """The views' writer (`views.ViewWriter`) of a live session: a task whose owning
    process is gone is ended through the session, and this host's worker processes and
    model servers found gone are recorded by their owners (the pool, the model servers)
    before a view shows them."""

    def __init__(
        self,
        session: Session,
        settle_host: Callable[[str], object],
        sweep_servers: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self._session = session
        self._settle_host = settle_host
        self._sweep_servers = sweep_servers

    def settle(self, session_id: str, task_id: str, owner: Owner | None) -> bool:
        """End a running task whose owning orchestrator process is gone; True if it did."""
        return self._session.settle(session_id, task_id, owner)

    def settle_workers(self) -> None:
        """Record this host's worker processes found gone (before a view shows them)."""
        self._settle_host(self._session.session_id)

    def settle_servers(self) -> None:
        """Record what became of this host's managed model servers."""
        self._sweep_servers({"session_id": self._session.session_id})
