"""The event catalogue: every decision the orchestrator makes, as a versioned pydantic model.

Events are facts. They are never edited; state is a fold over them (see `events.projections`).
Each type records `session_id` and, where they apply, `worker_id` and `task_id`. A change to
an event's shape bumps its `version` and adds an upcaster, so old logs stay readable.

It stays one module over 400 lines because the catalogue is read whole: every event type,
its stream and its upcasters, with the registry that maps stored type names to classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

ModelPolicy = Literal["sticky", "dynamic"]
ModelSource = Literal["task", "session", "profile"]
RejectReason = Literal[
    "model_mismatch",
    "policy_mismatch",
    "profile_mismatch",
    "provider_mismatch",
    "process_gone",
    "pid_recycled",
    "health_failed",
    "force_new",
    "draining",
    "other_host",
]
StreamKind = Literal["session", "registry", "memory", "models", "config"]
# The shared streams are named by their kind; a session's stream by its id (`session_stream`).
REGISTRY_STREAM = "registry"
MEMORY_STREAM = "memory"
MODELS_STREAM = "models"
CONFIG_STREAM = "config"


def session_stream(session_id: str) -> str:
    """The name of one session's stream."""
    return f"session:{session_id}"


StopReason = Literal["requested", "respawn", "idle", "evicted", "orchestrator closed", "unhealthy"]


def utcnow() -> datetime:
    """The one clock every event is stamped with."""
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every event. `version` is the schema version of the event type."""

    # defer_build: a class is built when first used, so a command pays only for the events
    # it touches (building all of them at import was ~35 ms of every CLI start).
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    version: int = 1
    session_id: str
    worker_id: str | None = None
    task_id: str | None = None
    timestamp: datetime = Field(default_factory=utcnow)

    # Which stream the event belongs to: declared once, by the family it derives from.
    stream_kind: ClassVar[StreamKind]
    # Does the event end a task? (The first such event of a task wins.)
    ends_task: ClassVar[bool] = False

    @classmethod
    def type_name(cls) -> str:
        """The event's stable type name, used as the stored topic."""
        return cls.__name__


class SessionEvent(Event):
    """Lives on the stream `session:<session_id>`: overrides and tasks."""

    stream_kind: ClassVar[StreamKind] = "session"


class RegistryEvent(Event):
    """Lives on the stream `registry`: worker processes and spawn claims."""

    stream_kind: ClassVar[StreamKind] = "registry"


class MemoryEvent(Event):
    """Lives on the stream `memory`: the notes store."""

    stream_kind: ClassVar[StreamKind] = "memory"


class ModelsEvent(Event):
    """Lives on the stream `models`: cooldowns shared by every session."""

    stream_kind: ClassVar[StreamKind] = "models"


class ConfigEvent(Event):
    """Lives on the stream `config`: the configurations decisions were made under."""

    stream_kind: ClassVar[StreamKind] = "config"


# --- session stream: model overrides -------------------------------------------------------


class SessionOpened(SessionEvent):
    """An orchestrator opened (or resumed) a session."""

    resumed: bool
    host: str
    pid: int


class WorkerModelSet(SessionEvent):
    """A session pinned (sticky) or tagged (dynamic) a worker's model."""

    version: int = 2
    model_ref: str
    resolved_model: str
    model_policy: ModelPolicy
    reason: str


class SessionForked(SessionEvent):
    """The session began as a fork of another one: its overrides as of a log position.
    The source session is not touched."""

    from_session_id: str
    position: int
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)


class WorkerModelReset(SessionEvent):
    """A session dropped its override: the profile's configured model applies again."""

    previous_model_ref: str | None = None


# --- session stream: tasks -----------------------------------------------------------------


class TaskStarted(SessionEvent):
    """A task was accepted. `args` is the validated request, without secrets. The owner
    (host, pid, start time) is the orchestrator process doing the work: when it is gone,
    whoever reads the task next ends it failed."""

    kind: Literal["worker", "op"]
    op: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    host: str | None = None
    pid: int | None = None
    pid_started_at: float | None = None
    # A worker task that continues a conversation: the task ids of its earlier turns, the
    # first turn first and `args.continue_from` last, so its history is one indexed read.
    conversation: list[str] = Field(default_factory=list)


class TaskQueued(SessionEvent):
    """A worker task waits for one of the orchestrator's `max_concurrency` slots."""

    slots: int
    ahead: int


class ModelResolved(SessionEvent):
    """Which model will serve a worker task, and which rule chose it."""

    model_ref: str
    resolved_model: str
    model_policy: ModelPolicy
    source: ModelSource
    reason: str
    fingerprint: str | None = None
    config_digest: str | None = None


class TaskCompleted(SessionEvent):
    """A task finished. Worker tasks carry the model and process that served them."""

    ends_task: ClassVar[bool] = True

    model: str | None = None
    response: str | None = None
    result: dict[str, Any] | None = None
    instance_id: str | None = None
    pid: int | None = None
    reused: bool | None = None
    usage: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ConversationTrimmed(SessionEvent):
    """A continued task's history was longer than the serving model's `context`: its oldest
    turns after the system prompt were left out of the request to `model` (an assistant
    message is never parted from its tool results)."""

    model: str
    context: int
    estimated_tokens: int
    dropped_turns: int
    kept_turns: int


class ModelAttemptFailed(SessionEvent):
    """One model failed to serve a worker task; `retryable` failures move on to the next
    fallback model, others end the task."""

    model: str
    error: str
    retryable: bool


class ModelCooledDown(ModelsEvent):
    """A model failed retryably too often: tags and fallbacks skip it until `until`."""

    model: str
    until: datetime
    reason: str


class TaskFailed(SessionEvent):
    """A well-formed task could not be done; `error` says what to do about it."""

    ends_task: ClassVar[bool] = True

    error: str


class TaskCancelled(SessionEvent):
    """The caller cancelled a running task."""

    ends_task: ClassVar[bool] = True


# --- config stream -----------------------------------------------------------------------------


class ConfigRecorded(ConfigEvent):
    """The configuration decisions are made under from here on (secrets never included):
    appended when an orchestrator first writes with a digest unlike the last recorded."""

    config_digest: str
    config: dict[str, Any]
    # Which providers had their key when it was recorded: tags resolve among those only.
    usable_providers: list[str] = Field(default_factory=list)


# --- memory stream ----------------------------------------------------------------------------


class MemoryPut(MemoryEvent):
    """A note was written to the memory store."""

    key: str
    value: str
    tags: list[str] = Field(default_factory=list)


class MemoryLinked(MemoryEvent):
    """Two notes were linked."""

    from_key: str
    to_key: str
    link_type: str


class MemoryDone(MemoryEvent):
    """A task was summarised as done in the memory store."""

    done_task_id: str
    summary: str


# --- registry stream: worker processes ---------------------------------------------------------


class WorkerSpawnRequested(RegistryEvent):
    """A claim to spawn one process for (worker, fingerprint, host); others wait for it."""

    claim_id: str
    fingerprint: str
    model: str
    model_policy: ModelPolicy
    host: str
    claimant_pid: int
    claimant_started_at: float
    force_new: bool = False


class WorkerSpawned(RegistryEvent):
    """A worker process was started (not yet known to answer)."""

    claim_id: str | None = None
    instance_id: str
    backend: Literal["server", "agent"]
    host: str
    pid: int
    pid_started_at: float
    url: str | None = None
    fingerprint: str
    model: str
    model_policy: ModelPolicy
    identity: dict[str, Any] = Field(default_factory=dict)
    idle_timeout: float | None = None


class WorkerReady(RegistryEvent):
    """The worker process printed READY and answers on its url."""

    instance_id: str


class WorkerSpawnFailed(RegistryEvent):
    """A spawn claim ended without a working process."""

    claim_id: str
    error: str


# The field blocks worker processes and model servers share (the two families of
# processes the registry runs). Each concrete event lists its own type and docstring; the
# fields keep the order they were stored in.


class _Reused(RegistryEvent):
    """A running process was taken for a request."""

    instance_id: str
    fingerprint: str


class _ReuseRejected(RegistryEvent):
    """A running process was not reused, and why."""

    instance_id: str
    reason: RejectReason
    detail: str = ""
    fingerprint: str = ""
    requested_fingerprint: str = ""


class _Stopping(RegistryEvent):
    """A process is stopped on purpose, and why."""

    instance_id: str
    reason: StopReason = "requested"
    detail: str = ""


class _Exited(RegistryEvent):
    """A process was found dead."""

    instance_id: str
    detail: str = ""


class WorkerReused(_Reused):
    """An existing worker process was taken for a request."""


class WorkerReuseRejected(_ReuseRejected):
    """A registry candidate was not reused, and why."""


class WorkerDraining(_Stopping):
    """A process takes no new tasks, finishes those it runs, then stops."""

    reason: StopReason = "respawn"


class WorkerStopped(_Stopping):
    """A worker process stopped on purpose (asked to, idle, evicted, drained) and is gone."""

    version: int = 2


class WorkerExited(_Exited):
    """A worker process was found dead (or not the one recorded)."""


# --- registry stream: managed model servers (ADR-0012) -----------------------------------------


class ModelServerStartRequested(RegistryEvent):
    """A claim to start the one server of (model, fingerprint, host); others wait for it.
    A claim outlives `start_timeout` plus a margin only when its claimant is gone."""

    claim_id: str
    fingerprint: str
    model: str
    host: str
    claimant_pid: int
    claimant_started_at: float
    start_timeout: float


class ModelServerStarted(RegistryEvent):
    """A model server's process was launched for a claim (status `starting` until ready).
    `pid` is the server's own process; its supervisor stops it when its starter dies
    before it is ready, or when it sits idle past `idle_timeout`."""

    claim_id: str
    instance_id: str
    model: str
    host: str
    pid: int
    pid_started_at: float
    supervisor_pid: int
    supervisor_started_at: float
    port: int
    url: str
    fingerprint: str
    identity: dict[str, Any] = Field(default_factory=dict)
    command: list[str] = Field(default_factory=list)
    memory_mb: int = 0
    log_path: str
    idle_timeout: float


class ModelServerReady(RegistryEvent):
    """The server answered its `ready_path` with 200; its claim ends here."""

    claim_id: str
    instance_id: str
    ready_seconds: float


class ModelServerStartFailed(RegistryEvent):
    """A start claim ended without a ready server (crashed, not ready in time, claimant
    gone). `instance_id` names the server that was launched, if one was; `stopped` says
    it was stopped on purpose rather than found dead."""

    claim_id: str
    error: str
    instance_id: str | None = None
    exit_status: int | None = None
    stopped: bool = False


class ModelServerReused(_Reused):
    """A running model server was taken for a request."""


class ModelServerReuseRejected(_ReuseRejected):
    """A running server of the requested model was not reused, and why (recorded once per
    requested fingerprint)."""


class ModelServerStopped(_Stopping):
    """A model server was stopped on purpose (asked to, idle, evicted) and is gone."""


class ModelServerExited(_Exited):
    """A model server was found dead (or its pid taken by another process)."""

    exit_status: int | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type_name(): cls
    for cls in (
        SessionOpened,
        SessionForked,
        ConfigRecorded,
        WorkerModelSet,
        WorkerModelReset,
        TaskStarted,
        TaskQueued,
        ModelResolved,
        ConversationTrimmed,
        TaskCompleted,
        ModelAttemptFailed,
        ModelCooledDown,
        TaskFailed,
        TaskCancelled,
        MemoryPut,
        MemoryLinked,
        MemoryDone,
        WorkerSpawnRequested,
        WorkerSpawned,
        WorkerReady,
        WorkerSpawnFailed,
        WorkerReused,
        WorkerReuseRejected,
        WorkerDraining,
        WorkerStopped,
        WorkerExited,
        ModelServerStartRequested,
        ModelServerStarted,
        ModelServerReady,
        ModelServerStartFailed,
        ModelServerReused,
        ModelServerReuseRejected,
        ModelServerStopped,
        ModelServerExited,
    )
}


def stream_of(event: Event) -> str:
    """The stream an event is appended to: its class declares the kind, a session event's
    `session_id` names which session."""
    kind = event.stream_kind
    return session_stream(event.session_id) if kind == "session" else kind


def types_of(stream_kind: StreamKind) -> frozenset[str]:
    """The type names of every event that lives on streams of one kind."""
    return frozenset(n for n, cls in EVENT_TYPES.items() if cls.stream_kind == stream_kind)


TERMINAL_TASK_EVENTS = frozenset(n for n, cls in EVENT_TYPES.items() if cls.ends_task)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _model_set_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v1 had no policy or reason: every v1 override was a pinned model.
    return {
        **data,
        "version": 2,
        "model_policy": data.get("model_policy", "sticky"),
        "reason": data.get("reason", "explicit model (recorded before reasons were kept)"),
    }


def _stopped_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v1 reasons were free text ("respawn with local/echo-vision"); v2 keeps the reason to
    # the fixed set and moves the rest to `detail`.
    reason = str(data.get("reason", "requested"))
    head, _, rest = reason.partition(" with ")
    known = get_args(StopReason)
    if reason in known:
        return {**data, "version": 2}
    if head in known:
        return {**data, "version": 2, "reason": head, "detail": f"with {rest}"}
    return {**data, "version": 2, "reason": "requested", "detail": reason}


UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("WorkerModelSet", 1): _model_set_v1_to_v2,
    ("WorkerStopped", 1): _stopped_v1_to_v2,
}


def upcast(type_name: str, data: dict[str, Any]) -> dict[str, Any]:
    """Bring a stored event's data up to its type's current version."""
    version = int(data.get("version", 1))
    while (type_name, version) in UPCASTERS:
        data = UPCASTERS[(type_name, version)](data)
        version = int(data["version"])
    return data


_UPCAST_TYPES = frozenset(name for name, _ in UPCASTERS)


def event_from_json(type_name: str, raw: bytes) -> Event:
    """A stored event read back as the class it was written as. Types that never changed
    shape are validated straight from the JSON (pydantic's parser, no dict in between);
    the others are upcast first. Raises KeyError for a type this version does not know."""
    cls = EVENT_TYPES[type_name]
    if type_name in _UPCAST_TYPES:
        return cls.model_validate(upcast(type_name, json.loads(raw)))
    return cls.model_validate_json(raw)
