"""Projections: state as folds over events, with no I/O.

Each fold takes the state it owns, an event's type and (upcast) data, and returns the state.
Folds update the state they are given in place rather than copying it: replaying a million
events must not copy a growing dict a million times (ADR-0001). They are deterministic and
touch nothing else, so the same fold serves live streams, snapshots and `replay`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from events.catalogue import ModelPolicy, types_of

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


RECENT_TASKS = 64


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


class RegistryEntry(BaseModel):
    """One worker process in the device registry."""

    worker_id: str
    instance_id: str
    backend: Literal["server", "agent"] = "server"
    host: str
    pid: int
    pid_started_at: float
    url: str | None = None
    status: WorkerStatus = "starting"
    fingerprint: str
    model: str
    model_policy: ModelPolicy
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


class Claim(BaseModel):
    """A pending claim to spawn one process for (worker, fingerprint, host)."""

    claim_id: str
    worker_id: str
    fingerprint: str
    host: str
    claimant_pid: int
    claimant_started_at: float
    claimed_at: datetime
    force_new: bool
    session_id: str


class RegistryState(BaseModel):
    """The device registry: worker processes and in-flight spawn claims."""

    entries: dict[str, RegistryEntry] = Field(default_factory=dict)
    claims: dict[str, Claim] = Field(default_factory=dict)


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


def apply_session(state: SessionState, type_: str, data: dict[str, Any]) -> SessionState:
    """Fold one session-stream event."""
    worker_id = data.get("worker_id")
    task_id = data.get("task_id")
    if type_ == "WorkerModelSet" and worker_id:
        state.overrides[worker_id] = Override(
            worker_id=worker_id,
            model_ref=data["model_ref"],
            resolved_model=data["resolved_model"],
            model_policy=data["model_policy"],
            reason=data["reason"],
            set_at=_ts(data),
            set_by_task=task_id,
        )
    elif type_ == "WorkerModelReset" and worker_id:
        state.overrides.pop(worker_id, None)
    elif type_ == "SessionForked":
        state.overrides = {w: Override.model_validate(o) for w, o in data["overrides"].items()}
    elif type_ == "TaskStarted" and task_id:
        state.running[task_id] = apply_task(None, type_, data)  # type: ignore[assignment]
        if data.get("pid") is not None:
            state.owners[task_id] = Owner(
                host=data["host"], pid=data["pid"], pid_started_at=data["pid_started_at"]
            )
    elif task_id in state.running:
        task = apply_task(state.running[task_id], type_, data)
        if task is not None and task.status != "running":
            del state.running[task_id]
            state.owners.pop(task_id, None)
            state.recent[task_id] = task
            if len(state.recent) > RECENT_TASKS:
                del state.recent[next(iter(state.recent))]
    return state


def apply_task(task: TaskRecord | None, type_: str, data: dict[str, Any]) -> TaskRecord | None:
    """Fold one event into one task's record (None until its `TaskStarted`). Events that do
    not change a record (decisions about its model and process) leave it as it is."""
    if type_ == "TaskStarted":
        return TaskRecord(
            task_id=data["task_id"],
            kind=data["kind"],
            op=data.get("op"),
            worker_id=data.get("worker_id"),
            started_at=_ts(data),
            session_id=data["session_id"],
        )
    if task is None or task.status != "running":
        return task  # the first terminal event wins; a late completion after cancel is moot
    if type_ == "ModelAttemptFailed":
        task.attempts.append({"model": data["model"], "error": data["error"]})
        return task
    if type_ == "TaskCompleted":
        task.status = "completed"
        task.model = data.get("model")
        task.response = data.get("response")
        task.result = data.get("result")
        task.usage = data.get("usage")
        task.tool_calls = data.get("tool_calls")
    elif type_ == "TaskFailed":
        task.status = "failed"
        task.error = data["error"]
    elif type_ == "TaskCancelled":
        task.status = "cancelled"
    else:
        return task
    task.finished_at = _ts(data)
    return task


def _ts(data: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(data["timestamp"])


def apply_registry(
    state: RegistryState,
    type_: str,
    data: dict[str, Any],
    retired: dict[str, RegistryEntry] | None = None,
) -> RegistryState:
    """Fold one registry-stream event. A stopped process leaves `state` (nothing brings it
    back, and the registry must not grow with every process ever run); it moves to
    `retired` when the caller keeps one (the `registry` and `replay` views do)."""
    ts = _ts(data)
    if type_ == "WorkerSpawnRequested":
        state.claims[data["claim_id"]] = Claim(
            claim_id=data["claim_id"],
            worker_id=data["worker_id"],
            fingerprint=data["fingerprint"],
            host=data["host"],
            claimant_pid=data["claimant_pid"],
            claimant_started_at=data["claimant_started_at"],
            claimed_at=ts,
            force_new=data.get("force_new", False),
            session_id=data["session_id"],
        )
    elif type_ == "WorkerSpawnFailed":
        state.claims.pop(data["claim_id"], None)
    elif type_ == "WorkerSpawned":
        if data.get("claim_id"):
            state.claims.pop(data["claim_id"], None)
        state.entries[data["instance_id"]] = RegistryEntry(
            worker_id=data["worker_id"],
            instance_id=data["instance_id"],
            backend=data["backend"],
            host=data["host"],
            pid=data["pid"],
            pid_started_at=data["pid_started_at"],
            url=data.get("url"),
            fingerprint=data["fingerprint"],
            model=data["model"],
            model_policy=data["model_policy"],
            session_id=data["session_id"],
            started_at=ts,
            updated_at=ts,
            identity=data.get("identity") or {},
            idle_timeout=data.get("idle_timeout"),
            sessions=[data["session_id"]],
            last_used_at=ts,
        )
    elif type_ == "WorkerReuseRejected" and data.get("instance_id") in state.entries:
        # Remembered so a long-lived mismatch is recorded once, not on every task.
        entry = state.entries[data["instance_id"]]
        wanted = data.get("requested_fingerprint")
        if wanted and wanted not in entry.rejected_for and data.get("reason") != "force_new":
            entry.rejected_for.append(wanted)
    elif type_ in _REGISTRY_STATUS and data.get("instance_id") in state.entries:
        entry = state.entries[data["instance_id"]]
        status = _REGISTRY_STATUS[type_]
        if type_ == "WorkerReused":
            entry.last_used_at = ts
            if data["session_id"] not in entry.sessions:
                entry.sessions.append(data["session_id"])
        if status is not None and status in _NEXT_STATUS[entry.status]:
            entry.status = status
        entry.updated_at = ts
        if entry.status == "stopped":
            del state.entries[entry.instance_id]
            if retired is not None:
                retired[entry.instance_id] = entry
    return state


_REGISTRY_STATUS: dict[str, WorkerStatus | None] = {
    "WorkerReady": "ready",
    "WorkerReused": None,
    "WorkerDraining": "draining",
    "WorkerStopped": "stopped",
    "WorkerExited": "exited",
}
# Which status may follow which. A process recorded exited that is later found alive and
# stopped (`stop --all`) ends stopped; nothing brings a stopped one back.
_NEXT_STATUS: dict[WorkerStatus, frozenset[WorkerStatus]] = {
    "starting": frozenset({"ready", "draining", "stopped", "exited"}),
    "ready": frozenset({"draining", "stopped", "exited"}),
    "draining": frozenset({"stopped", "exited"}),
    "exited": frozenset({"stopped"}),
    "stopped": frozenset(),
}


def apply_memory(state: MemoryState, type_: str, data: dict[str, Any]) -> MemoryState:
    """Fold one memory-stream event."""
    if type_ == "MemoryPut":
        state.notes[data["key"]] = Note(
            key=data["key"],
            value=data["value"],
            tags=data.get("tags", []),
            session_id=data["session_id"],
            updated_at=_ts(data),
        )
    elif type_ == "MemoryLinked":
        state.links.append(
            Link(from_key=data["from_key"], to_key=data["to_key"], type=data["link_type"])
        )
    elif type_ == "MemoryDone":
        state.done.append(
            Done(
                task_id=data["done_task_id"], summary=data["summary"], session_id=data["session_id"]
            )
        )
    return state


SESSION_TYPES = types_of("session")
MEMORY_TYPES = types_of("memory")


class ModelsState(BaseModel):
    """Cooldowns: models that tags and fallbacks skip until a time."""

    cooled: dict[str, datetime] = Field(default_factory=dict)


def apply_models(state: ModelsState, type_: str, data: dict[str, Any]) -> ModelsState:
    """Fold one models-stream event."""
    if type_ == "ModelCooledDown":
        state.cooled[data["model"]] = datetime.fromisoformat(data["until"])
    return state


MODELS_TYPES = types_of("models")
REGISTRY_TYPES = types_of("registry")


class LogState(BaseModel):
    """The whole log folded: what `events.replay` returns. `sessions` and `registry` are
    exactly the live states; `tasks` (every task) and `retired` (stopped processes) are
    what they leave out to stay light, kept here for the `replay` view."""

    position: int = 0
    registry: RegistryState = Field(default_factory=RegistryState)
    retired: dict[str, RegistryEntry] = Field(default_factory=dict)
    sessions: dict[str, SessionState] = Field(default_factory=dict)
    tasks: dict[str, TaskRecord] = Field(default_factory=dict)
    memory: MemoryState = Field(default_factory=MemoryState)
    models: ModelsState = Field(default_factory=ModelsState)


def apply(state: LogState, position: int, type_: str, data: dict[str, Any]) -> LogState:
    """Fold one event of the global log into the whole state."""
    if type_ in SESSION_TYPES:
        sid = data["session_id"]
        session = state.sessions.get(sid) or SessionState(session_id=sid)
        state.sessions[sid] = apply_session(session, type_, data)
        task_id = data.get("task_id")
        if task_id is not None:
            task = apply_task(state.tasks.get(task_id), type_, data)
            if task is not None:
                state.tasks[task_id] = task
    elif type_ in MEMORY_TYPES:
        apply_memory(state.memory, type_, data)
    elif type_ in MODELS_TYPES:
        apply_models(state.models, type_, data)
    elif type_ in REGISTRY_TYPES:
        apply_registry(state.registry, type_, data, state.retired)
    state.position = position
    return state
