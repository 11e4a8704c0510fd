"""Projections: state as folds over typed events, with no I/O.

Each fold takes the state it owns and an event (the pydantic class it was written as, read
back as that class) and returns the state; one mutator per event class, chosen by
`functools.singledispatch`, so an event no fold registers for changes nothing. Folds
update the state they are given in place rather than copying it: replaying a million
events must not copy a growing dict a million times (ADR-0001). They are deterministic and
touch nothing else, so the same fold serves live streams, snapshots and `replay`.

It stays one module over 400 lines because the state shapes and the folds that mutate them
are read together, and `apply` composes every fold over the whole log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from functools import singledispatch
from typing import Any, Literal

from pydantic import BaseModel, Field

from events.catalogue import (
    Event,
    MemoryDone,
    MemoryLinked,
    MemoryPut,
    ModelAttemptFailed,
    ModelCooledDown,
    ModelPolicy,
    ModelServerExited,
    ModelServerReady,
    ModelServerReused,
    ModelServerReuseRejected,
    ModelServerStarted,
    ModelServerStartFailed,
    ModelServerStartRequested,
    ModelServerStopped,
    SessionForked,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
    WorkerDraining,
    WorkerExited,
    WorkerModelReset,
    WorkerModelSet,
    WorkerReady,
    WorkerReused,
    WorkerReuseRejected,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerSpawnRequested,
    WorkerStopped,
)

TaskStatus = Literal["running", "completed", "failed", "cancelled"]
WorkerStatus = Literal["starting", "ready", "draining", "stopped", "exited"]


class TaskRecord(BaseModel):
    """A task as the caller sees it."""

    task_id: str
    kind: Literal["worker", "op"]
    op: str | None = None
    status: TaskStatus = "running"
    worker_id: str | None = None
    model: str | None = None
    response: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    session_id: str
    usage: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    tool_calls: list[dict[str, Any]] | None = None


class Override(BaseModel):
    """A session's model override for one worker."""

    worker_id: str
    model_ref: str
    resolved_model: str
    model_policy: ModelPolicy
    reason: str
    set_at: datetime
    set_by_task: str | None = None


class Owner(BaseModel):
    """The orchestrator process that runs a task (host, pid and its start time)."""

    host: str
    pid: int
    pid_started_at: float


RECENT_TASKS = 16


class SessionState(BaseModel):
    """What one session's next decision needs: its overrides, its running tasks and who
    runs them, and the last `RECENT_TASKS` finished ones (so a caller awaiting its own task
    needs no read). Older finished tasks live only in the log, read by task id through the
    index: opening a session costs the same after ten tasks or ten thousand."""

    session_id: str
    overrides: dict[str, Override] = Field(default_factory=dict)
    running: dict[str, TaskRecord] = Field(default_factory=dict)
    recent: dict[str, TaskRecord] = Field(default_factory=dict)
    owners: dict[str, Owner] = Field(default_factory=dict)

    def task(self, task_id: str) -> TaskRecord | None:
        """A running or recently finished task of this session."""
        return self.running.get(task_id) or self.recent.get(task_id)


class _ProcessEntry(BaseModel):
    """What the registry records of every process it runs, worker or model server: where it
    runs, what it serves, which sessions used it and which fingerprints it was refused for."""

    kind: str
    worker_id: str | None = None
    instance_id: str
    host: str
    pid: int
    pid_started_at: float
    url: str | None = None
    status: WorkerStatus = "starting"
    fingerprint: str
    model: str
    session_id: str
    started_at: datetime
    updated_at: datetime
    identity: dict[str, Any] = Field(default_factory=dict)
    idle_timeout: float | None = None
    sessions: list[str] = Field(default_factory=list)
    last_used_at: datetime | None = None
    rejected_for: list[str] = Field(default_factory=list)

    @property
    def live(self) -> bool:
        """Recorded as running (the process may still have died unseen)."""
        return self.status in ("starting", "ready", "draining")


class RegistryEntry(_ProcessEntry):
    """One worker process in the device registry."""

    kind: Literal["worker"] = "worker"
    worker_id: str
    backend: Literal["server", "agent"] = "server"
    model_policy: ModelPolicy


class _PendingClaim(BaseModel):
    """A pending claim to start one process: who claimed it, when, and for what."""

    claim_id: str
    fingerprint: str
    host: str
    claimant_pid: int
    claimant_started_at: float
    claimed_at: datetime
    session_id: str


class Claim(_PendingClaim):
    """A pending claim to spawn one process for (worker, fingerprint, host)."""

    worker_id: str
    force_new: bool


class ModelServerEntry(_ProcessEntry):
    """One managed model server in the device registry (ADR-0012): `pid` is the server's
    own process, `model` the `provider/model` it loaded, `url` its derived base_url."""

    kind: Literal["model_server"] = "model_server"
    worker_id: None = None  # a registry row's column; model servers serve every worker
    url: str
    idle_timeout: float
    supervisor_pid: int
    supervisor_started_at: float
    port: int
    command: list[str] = Field(default_factory=list)
    memory_mb: int = 0
    log_path: str
    ready_seconds: float | None = None
    claim_id: str | None = None


class ServerClaim(_PendingClaim):
    """A pending claim to start the one server of (model, fingerprint, host)."""

    model: str
    start_timeout: float
    instance_id: str | None = None  # the server launched for it, once launched


AnyRegistryEntry = RegistryEntry | ModelServerEntry


class RegistryState(BaseModel):
    """The device registry: worker processes and in-flight spawn claims, and managed model
    servers with their start claims."""

    entries: dict[str, RegistryEntry] = Field(default_factory=dict)
    claims: dict[str, Claim] = Field(default_factory=dict)
    servers: dict[str, ModelServerEntry] = Field(default_factory=dict)
    server_claims: dict[str, ServerClaim] = Field(default_factory=dict)


class Note(BaseModel):
    """A memory note."""

    key: str
    value: str
    tags: list[str]
    session_id: str
    updated_at: datetime


class Link(BaseModel):
    """A typed link between two memory notes."""

    from_key: str
    to_key: str
    type: str


class Done(BaseModel):
    """A task summary recorded as done."""

    task_id: str
    summary: str
    session_id: str


class MemoryState(BaseModel):
    """The memory store: notes, links and done summaries."""

    notes: dict[str, Note] = Field(default_factory=dict)
    links: list[Link] = Field(default_factory=list)
    done: list[Done] = Field(default_factory=list)


def _set(target: BaseModel, **values: Any) -> None:
    """Assign fields of a state model the fold owns. Values come from validated events, so
    this skips pydantic's per-attribute `__setattr__`, the largest cost of a replay."""
    target.__dict__.update(values)


Mutator = Callable[[Any, Any], None]


class _ByClass(dict[type, Mutator | None]):
    """The mutator a `singledispatch` fold has for each event class, or None where it has
    none (its base function, which changes nothing): a plain dict, filled on first use of
    a class, so a fold looks its mutator up without a call (the dispatcher's own lookup
    cost as much as a whole fold). Every mutator is registered when this module is
    imported, so the table never goes stale."""

    def __init__(self, dispatcher: Any) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.nothing = dispatcher.dispatch(Event)

    def __missing__(self, cls: type) -> Mutator | None:
        found = self.dispatcher.dispatch(cls)
        mutator = self[cls] = None if found is self.nothing else found
        return mutator


# --- sessions -----------------------------------------------------------------------------------


def apply_session(state: SessionState, event: Event) -> SessionState:
    """Fold one session-stream event."""
    mutate = _session_mutator[event.__class__]
    if mutate is not None:
        mutate(event, state)
    return state


@singledispatch
def _on_session(event: Event, state: SessionState) -> None:
    """Session events no fold registers for (opened, resolved, queued) change nothing."""


@_on_session.register
def _(event: WorkerModelSet, state: SessionState) -> None:
    state.overrides[str(event.worker_id)] = Override(
        worker_id=str(event.worker_id),
        model_ref=event.model_ref,
        resolved_model=event.resolved_model,
        model_policy=event.model_policy,
        reason=event.reason,
        set_at=event.timestamp,
        set_by_task=event.task_id,
    )


@_on_session.register
def _(event: WorkerModelReset, state: SessionState) -> None:
    state.overrides.pop(str(event.worker_id), None)


@_on_session.register
def _(event: SessionForked, state: SessionState) -> None:
    state.overrides = {w: Override.model_validate(o) for w, o in event.overrides.items()}


@_on_session.register
def _(event: TaskStarted, state: SessionState) -> None:
    task_id = str(event.task_id)
    state.running[task_id] = new_task(event)
    owner = owner_of(event)
    if owner is not None:
        state.owners[task_id] = owner


def _task_changed(event: Event, state: SessionState) -> None:
    task_id = str(event.task_id)
    task = state.running.get(task_id)
    if task is None:
        return  # finished already (the first terminal event wins) or never started
    apply_task(task, event)
    if task.status != "running":
        del state.running[task_id]
        state.owners.pop(task_id, None)
        state.recent[task_id] = task
        if len(state.recent) > RECENT_TASKS:
            del state.recent[next(iter(state.recent))]


for _cls in (ModelAttemptFailed, TaskCompleted, TaskFailed, TaskCancelled):
    _on_session.register(_cls, _task_changed)

_session_mutator = _ByClass(_on_session)


# --- one task's record --------------------------------------------------------------------------


def owner_of(event: TaskStarted) -> Owner | None:
    """The orchestrator process a `TaskStarted` names as the task's owner, if it names one."""
    if event.pid is None:
        return None
    return Owner(
        host=str(event.host), pid=event.pid, pid_started_at=float(event.pid_started_at or 0)
    )


def new_task(event: TaskStarted) -> TaskRecord:
    """The record a `TaskStarted` begins."""
    return TaskRecord(
        task_id=str(event.task_id),
        kind=event.kind,
        op=event.op,
        worker_id=event.worker_id,
        started_at=event.timestamp,
        session_id=event.session_id,
    )


def apply_task(task: TaskRecord | None, event: Event) -> TaskRecord | None:
    """Fold one event into one task's record (None until its `TaskStarted`). Events that do
    not change a record (decisions about its model and process) leave it as it is, and the
    first terminal event wins: a late completion after a cancel changes nothing."""
    if isinstance(event, TaskStarted):
        return new_task(event)
    if task is not None and task.status == "running":
        mutate = _task_mutator[event.__class__]
        if mutate is not None:
            mutate(event, task)
    return task


@singledispatch
def _on_task(event: Event, task: TaskRecord) -> None:
    """Events about a task that do not change its record."""


@_on_task.register
def _(event: ModelAttemptFailed, task: TaskRecord) -> None:
    task.attempts.append({"model": event.model, "error": event.error})


@_on_task.register
def _(event: TaskCompleted, task: TaskRecord) -> None:
    _set(
        task,
        status="completed",
        model=event.model,
        response=event.response,
        result=event.result,
        usage=event.usage,
        tool_calls=event.tool_calls,
        finished_at=event.timestamp,
    )


@_on_task.register
def _(event: TaskFailed, task: TaskRecord) -> None:
    _set(task, status="failed", error=event.error, finished_at=event.timestamp)


@_on_task.register
def _(event: TaskCancelled, task: TaskRecord) -> None:
    _set(task, status="cancelled", finished_at=event.timestamp)


_task_mutator = _ByClass(_on_task)


# --- the registry -------------------------------------------------------------------------------


def apply_registry(
    state: RegistryState, event: Event, retired: dict[str, AnyRegistryEntry] | None = None
) -> RegistryState:
    """Fold one registry-stream event. A stopped process leaves `state` (nothing brings it
    back, and the registry must not grow with every process ever run); it moves to
    `retired` when the caller keeps one (the `registry` and `replay` views do). A model
    server found exited leaves too: a dead server is never started again, a new one is."""
    mutate = _registry_mutator[event.__class__]
    if mutate is not None:
        mutate(event, state)
    instance_id = getattr(event, "instance_id", None)
    if not isinstance(instance_id, str):
        return state
    entry = state.entries.get(instance_id)
    if entry is not None and entry.status == "stopped":
        del state.entries[entry.instance_id]
        if retired is not None:
            retired[entry.instance_id] = entry
    server = state.servers.get(instance_id)
    if server is not None and not server.live:
        del state.servers[instance_id]
        if retired is not None:
            retired[instance_id] = server
    return state


@singledispatch
def _on_registry(event: Event, state: RegistryState) -> None:
    """Registry events no fold registers for change nothing."""


def _claimed(event: WorkerSpawnRequested | ModelServerStartRequested) -> dict[str, Any]:
    """The fields every pending claim takes from the event that made it."""
    return {
        "claim_id": event.claim_id,
        "fingerprint": event.fingerprint,
        "host": event.host,
        "claimant_pid": event.claimant_pid,
        "claimant_started_at": event.claimant_started_at,
        "claimed_at": event.timestamp,
        "session_id": event.session_id,
    }


def _launched(event: WorkerSpawned | ModelServerStarted) -> dict[str, Any]:
    """The fields every registry entry takes from the event that launched its process."""
    return {
        "instance_id": event.instance_id,
        "host": event.host,
        "pid": event.pid,
        "pid_started_at": event.pid_started_at,
        "url": event.url,
        "fingerprint": event.fingerprint,
        "model": event.model,
        "session_id": event.session_id,
        "started_at": event.timestamp,
        "updated_at": event.timestamp,
        "identity": event.identity,
        "idle_timeout": event.idle_timeout,
        "sessions": [event.session_id],
        "last_used_at": event.timestamp,
    }


def _used(entry: _ProcessEntry | None, event: WorkerReused | ModelServerReused) -> None:
    """A process was taken for a task: note the session and when."""
    if entry is None:
        return
    sessions = entry.sessions
    # A session reuses the same process task after task: its id is then the last one,
    # found without scanning every session that ever used the process.
    if not (sessions and sessions[-1] == event.session_id) and event.session_id not in sessions:
        sessions.append(event.session_id)
    _set(entry, last_used_at=event.timestamp, updated_at=event.timestamp)


def _refused(entry: _ProcessEntry | None, wanted: str) -> None:
    """Remember a fingerprint a process was not reused for, so a long-lived mismatch is
    recorded once, not on every task."""
    if entry is not None and wanted and wanted not in entry.rejected_for:
        entry.rejected_for.append(wanted)


def _move(entry: _ProcessEntry, status: WorkerStatus, at: datetime) -> None:
    """Move a process to `status` where `_NEXT_STATUS` allows it; it was seen at `at`."""
    if status in _NEXT_STATUS[entry.status]:
        _set(entry, status=status)
    _set(entry, updated_at=at)


@_on_registry.register
def _(event: WorkerSpawnRequested, state: RegistryState) -> None:
    state.claims[event.claim_id] = Claim(
        **_claimed(event), worker_id=str(event.worker_id), force_new=event.force_new
    )


@_on_registry.register
def _(event: WorkerSpawnFailed, state: RegistryState) -> None:
    state.claims.pop(event.claim_id, None)


@_on_registry.register
def _(event: WorkerSpawned, state: RegistryState) -> None:
    if event.claim_id:
        state.claims.pop(event.claim_id, None)
    state.entries[event.instance_id] = RegistryEntry(
        **_launched(event),
        worker_id=str(event.worker_id),
        backend=event.backend,
        model_policy=event.model_policy,
    )


@_on_registry.register
def _(event: WorkerReuseRejected, state: RegistryState) -> None:
    if event.reason != "force_new":  # a forced spawn says nothing about the process
        _refused(state.entries.get(event.instance_id), event.requested_fingerprint)


@_on_registry.register
def _(event: WorkerReused, state: RegistryState) -> None:
    _used(state.entries.get(event.instance_id), event)


def _status(status: WorkerStatus) -> Any:
    def move(
        event: WorkerReady | WorkerDraining | WorkerStopped | WorkerExited, state: RegistryState
    ) -> None:
        entry = state.entries.get(event.instance_id)
        if entry is not None:
            _move(entry, status, event.timestamp)

    return move


_on_registry.register(WorkerReady, _status("ready"))
_on_registry.register(WorkerDraining, _status("draining"))
_on_registry.register(WorkerStopped, _status("stopped"))
_on_registry.register(WorkerExited, _status("exited"))

# --- model servers ------------------------------------------------------------------------------


@_on_registry.register
def _(event: ModelServerStartRequested, state: RegistryState) -> None:
    state.server_claims[event.claim_id] = ServerClaim(
        **_claimed(event), model=event.model, start_timeout=event.start_timeout
    )


@_on_registry.register
def _(event: ModelServerStarted, state: RegistryState) -> None:
    claim = state.server_claims.get(event.claim_id)
    if claim is not None:
        _set(claim, instance_id=event.instance_id)
    state.servers[event.instance_id] = ModelServerEntry(
        **_launched(event),
        supervisor_pid=event.supervisor_pid,
        supervisor_started_at=event.supervisor_started_at,
        port=event.port,
        command=event.command,
        memory_mb=event.memory_mb,
        log_path=event.log_path,
        claim_id=event.claim_id,
    )


@_on_registry.register
def _(event: ModelServerReady, state: RegistryState) -> None:
    state.server_claims.pop(event.claim_id, None)
    server = state.servers.get(event.instance_id)
    if server is not None and "ready" in _NEXT_STATUS[server.status]:
        _set(server, status="ready", ready_seconds=event.ready_seconds, updated_at=event.timestamp)


@_on_registry.register
def _(event: ModelServerStartFailed, state: RegistryState) -> None:
    state.server_claims.pop(event.claim_id, None)
    server = state.servers.get(event.instance_id or "")
    if server is not None and server.status == "starting":
        _set(server, status="stopped" if event.stopped else "exited", updated_at=event.timestamp)


@_on_registry.register
def _(event: ModelServerReused, state: RegistryState) -> None:
    _used(state.servers.get(event.instance_id), event)


@_on_registry.register
def _(event: ModelServerReuseRejected, state: RegistryState) -> None:
    _refused(state.servers.get(event.instance_id), event.requested_fingerprint)


def _server_status(status: WorkerStatus) -> Any:
    def move(event: ModelServerStopped | ModelServerExited, state: RegistryState) -> None:
        server = state.servers.get(event.instance_id)
        if server is None:
            return
        _move(server, status, event.timestamp)
        if server.claim_id is not None:  # it died while starting: its claim ends with it
            claim = state.server_claims.get(server.claim_id)
            if claim is not None and claim.instance_id == server.instance_id:
                del state.server_claims[server.claim_id]

    return move


_on_registry.register(ModelServerStopped, _server_status("stopped"))
_on_registry.register(ModelServerExited, _server_status("exited"))
_registry_mutator = _ByClass(_on_registry)

# Which status may follow which. A process recorded exited that is later found alive and
# stopped (`stop --all`) ends stopped; nothing brings a stopped one back.
_NEXT_STATUS: dict[WorkerStatus, frozenset[WorkerStatus]] = {
    "starting": frozenset({"ready", "draining", "stopped", "exited"}),
    "ready": frozenset({"draining", "stopped", "exited"}),
    "draining": frozenset({"stopped", "exited"}),
    "exited": frozenset({"stopped"}),
    "stopped": frozenset(),
}


# --- memory and models --------------------------------------------------------------------------


def apply_memory(state: MemoryState, event: Event) -> MemoryState:
    """Fold one memory-stream event."""
    if isinstance(event, MemoryPut):
        state.notes[event.key] = Note(
            key=event.key,
            value=event.value,
            tags=event.tags,
            session_id=event.session_id,
            updated_at=event.timestamp,
        )
    elif isinstance(event, MemoryLinked):
        state.links.append(Link(from_key=event.from_key, to_key=event.to_key, type=event.link_type))
    elif isinstance(event, MemoryDone):
        state.done.append(
            Done(task_id=event.done_task_id, summary=event.summary, session_id=event.session_id)
        )
    return state


class ModelsState(BaseModel):
    """Cooldowns: models that tags and fallbacks skip until a time."""

    cooled: dict[str, datetime] = Field(default_factory=dict)


def apply_models(state: ModelsState, event: Event) -> ModelsState:
    """Fold one models-stream event."""
    if isinstance(event, ModelCooledDown):
        state.cooled[event.model] = event.until
    return state


# --- the whole log ------------------------------------------------------------------------------


class LogState(BaseModel):
    """The whole log folded: what `events.replay` returns. `sessions` and `registry` are
    exactly the live states; `tasks` (every task) and `retired` (stopped processes) are
    what they leave out to stay light, kept here for the `replay` view."""

    position: int = 0
    registry: RegistryState = Field(default_factory=RegistryState)
    retired: dict[str, AnyRegistryEntry] = Field(default_factory=dict)
    sessions: dict[str, SessionState] = Field(default_factory=dict)
    tasks: dict[str, TaskRecord] = Field(default_factory=dict)
    memory: MemoryState = Field(default_factory=MemoryState)
    models: ModelsState = Field(default_factory=ModelsState)


def apply(state: LogState, position: int, event: Event) -> LogState:
    """Fold one event of the global log into the whole state (each stream's own fold)."""
    _LOG_FOLDS[event.__class__](state, event)
    state.__dict__["position"] = position
    return state


def apply_all(state: LogState, events: Iterable[tuple[int, Event]]) -> LogState:
    """`apply` each (position, event) in turn: the same fold, without a call per event."""
    folds = _LOG_FOLDS
    position = state.position
    for position, event in events:  # noqa: B007 (the last one is the state's position)
        folds[event.__class__](state, event)
    state.__dict__["position"] = position
    return state


_LogFold = Callable[[LogState, Any], object]


class _LogFolds(dict[type, _LogFold]):
    """How `apply` folds each event class, decided on its first event (`_log_fold`)."""

    def __missing__(self, cls: type[Event]) -> _LogFold:
        fold = self[cls] = _log_fold(cls)
        return fold


_LOG_FOLDS = _LogFolds()


def _log_fold(cls: type[Event]) -> _LogFold:
    """How `apply` folds one event class, decided once per class rather than per event:
    its stream's fold, and the session's mutator for it (if any)."""
    kind = cls.stream_kind
    if kind == "session":
        return _session_fold(cls)
    if kind == "registry":
        return lambda state, event: apply_registry(state.registry, event, state.retired)
    if kind == "memory":
        return lambda state, event: apply_memory(state.memory, event)
    if kind == "models":
        return lambda state, event: apply_models(state.models, event)
    return lambda state, event: None


def _session_fold(cls: type[Event]) -> _LogFold:
    mutate = _session_mutator[cls]
    started = issubclass(cls, TaskStarted)

    def fold(state: LogState, event: Any) -> None:
        sid = event.session_id
        session = state.sessions.get(sid)
        if session is None:
            session = state.sessions[sid] = SessionState(session_id=sid)
        if mutate is not None:
            mutate(event, session)
        if started:
            # One record, shared: the session's fold finishes it, so `tasks` sees that too.
            task_id = str(event.task_id)
            state.tasks[task_id] = session.running[task_id]

    return fold
