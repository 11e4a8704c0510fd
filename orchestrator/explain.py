"""Explain and replay views: why a task got its model and its process, and state as of N.

Pure functions over event records, so the same answer comes from any copy of the log.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from events.catalogue import TERMINAL_TASK_EVENTS, types_of
from events.projections import (
    AnyRegistryEntry,
    LogState,
    Override,
    RegistryEntry,
    TaskRecord,
)
from events.store import EventRecord


class OverrideRow(BaseModel):
    """A session override as of some position."""

    session_id: str
    worker_id: str
    model_ref: str
    resolved_model: str
    model_policy: str
    reason: str


class ReplayView(BaseModel):
    """The registry, the session overrides and the tasks as of one log position."""

    position: int
    registry: list[AnyRegistryEntry]
    overrides: list[OverrideRow]
    tasks: list[TaskRecord]


class OverrideCause(BaseModel):
    """The event a session-level decision rested on: a `WorkerModelSet`, or the
    `SessionForked` that brought the override from another session."""

    position: int
    timestamp: datetime
    session_id: str
    model_ref: str
    resolved_model: str
    model_policy: str
    reason: str
    forked_from: str | None = None
    forked_at: int | None = None


class Rejection(BaseModel):
    """A registry candidate that was not reused for the task."""

    instance_id: str
    reason: str
    detail: str


class ProcessCause(BaseModel):
    """Which process served the task and how it was obtained."""

    action: str  # reused | spawned | in-process | none
    instance_id: str | None = None
    pid: int | None = None
    position: int | None = None


class ServerCause(BaseModel):
    """A managed model server the task used (ADR-0012): `started` for it (and how long it
    took to be ready), `reused`, `start_failed`, or `evicted` to make room for it."""

    action: str
    instance_id: str | None
    model: str | None = None
    pid: int | None = None
    port: int | None = None
    ready_seconds: float | None = None
    detail: str = ""
    position: int


class TurnModel(BaseModel):
    """One earlier turn of a conversation and the model that served it."""

    task_id: str
    model: str | None


class TaskExplanation(BaseModel):
    """The chain of events behind one task (the `explain` view for a task_id)."""

    task_id: str
    session_id: str | None
    worker_id: str | None
    status: str
    model: str | None
    source: str | None
    model_ref: str | None
    model_policy: str | None
    resolver_reason: str | None
    override: OverrideCause | None
    process: ProcessCause
    rejections: list[Rejection]
    model_servers: list[ServerCause] = []
    error: str | None
    summary: list[str]
    chain: list[EventRecord]
    # A continued conversation: the turns its history came from, the first first.
    conversation: list[TurnModel] = []


class WorkerExplanation(BaseModel):
    """A worker's effective model for a session and its process history."""

    worker_id: str
    session_id: str
    model: str | None
    model_ref: str
    model_policy: str
    reason: str
    override: OverrideCause | None
    processes: list[RegistryEntry]
    history: list[EventRecord]


def replay_view(state: LogState) -> ReplayView:
    """Flatten a replayed state into the `replay` view."""
    overrides = [
        override_row(sid, o)
        for sid, session in sorted(state.sessions.items())
        for o in session.overrides.values()
    ]
    tasks = sorted(state.tasks.values(), key=lambda t: t.started_at)
    registry = sorted(
        [
            *state.registry.entries.values(),
            *state.registry.servers.values(),
            *state.retired.values(),
        ],
        key=lambda e: e.started_at,
    )
    return ReplayView(position=state.position, registry=registry, overrides=overrides, tasks=tasks)


def override_row(session_id: str, o: Override) -> OverrideRow:
    """A session's override as the `replay` view shows it."""
    fields = {"worker_id", "model_ref", "resolved_model", "model_policy", "reason"}
    return OverrideRow(session_id=session_id, **o.model_dump(include=fields))


def override_cause(record: EventRecord | None, worker_id: str) -> OverrideCause | None:
    """The override a session's newest override event (of `OVERRIDE_TYPES`) left in force."""
    if record is None:
        return None
    data, forked = record.data, {}
    if record.type == "SessionForked":
        forked = {"forked_from": data["from_session_id"], "forked_at": data["position"]}
        data = data["overrides"].get(worker_id)
        if data is None:
            return None
    elif record.type != "WorkerModelSet":
        return None
    return OverrideCause(
        position=record.position,
        timestamp=record.timestamp,
        session_id=str(record.session_id),
        model_ref=data["model_ref"],
        resolved_model=data["resolved_model"],
        model_policy=data["model_policy"],
        reason=data["reason"],
        **forked,
    )


def explain_task(
    chain: list[EventRecord],
    override: EventRecord | None = None,
    turns: list[TurnModel] | None = None,
) -> TaskExplanation | None:
    """Explain a task from its own events (`chain`, in log order), when its model came
    from the session the override event in force when it was resolved, and the earlier
    turns of its conversation; None if no such task was started."""
    started = next((r for r in chain if r.type == "TaskStarted"), None)
    if started is None:
        return None
    resolved = next((r for r in chain if r.type == "ModelResolved"), None)
    end = next((r for r in chain if r.type in TERMINAL_TASK_EVENTS), None)
    cause = None
    if resolved is not None and resolved.data["source"] == "session":
        cause = override_cause(override, str(started.worker_id))
        if cause is not None and override is not None:
            chain = sorted([*chain, override], key=lambda r: r.position)
    rejections = [
        Rejection(
            instance_id=r.data["instance_id"],
            reason=r.data["reason"],
            detail=r.data.get("detail", ""),
        )
        for r in chain
        if r.type == "WorkerReuseRejected"
    ]
    process = _process_cause(chain, end)
    status = {
        "TaskCompleted": "completed",
        "TaskFailed": "failed",
        "TaskCancelled": "cancelled",
    }.get(end.type if end else "", "running")
    expl = TaskExplanation(
        task_id=str(started.task_id),
        session_id=started.session_id,
        worker_id=started.worker_id,
        status=status,
        model=end.data.get("model") if end else None,
        source=resolved.data["source"] if resolved else None,
        model_ref=resolved.data["model_ref"] if resolved else None,
        model_policy=resolved.data["model_policy"] if resolved else None,
        resolver_reason=resolved.data["reason"] if resolved else None,
        override=cause,
        process=process,
        rejections=rejections,
        model_servers=_server_causes(chain),
        error=end.data.get("error") if end else None,
        summary=[],
        chain=chain,
        conversation=turns or [],
    )
    expl.summary = _task_summary(expl, started)
    return expl


def _process_cause(chain: list[EventRecord], end: EventRecord | None) -> ProcessCause:
    for r in chain:
        if r.type == "WorkerReused":
            return ProcessCause(
                action="reused",
                instance_id=r.data["instance_id"],
                pid=end.data.get("pid") if end else None,
                position=r.position,
            )
        if r.type == "WorkerSpawned":
            return ProcessCause(
                action="spawned",
                instance_id=r.data["instance_id"],
                pid=r.data["pid"],
                position=r.position,
            )
    if end is not None and str(end.data.get("instance_id") or "").startswith("agent-"):
        return ProcessCause(
            action="in-process",
            instance_id=end.data["instance_id"],
            pid=end.data.get("pid"),
            position=end.position,
        )
    return ProcessCause(action="none")


def _server_causes(chain: list[EventRecord]) -> list[ServerCause]:
    """The model servers behind a task, from its own registry events."""
    causes: list[ServerCause] = []
    started: dict[str, ServerCause] = {}
    for r in chain:
        d = r.data
        if r.type == "ModelServerStarted":
            cause = ServerCause(
                action="started",
                instance_id=d["instance_id"],
                model=d["model"],
                pid=d["pid"],
                port=d["port"],
                position=r.position,
            )
            started[d["instance_id"]] = cause
            causes.append(cause)
        elif r.type == "ModelServerReady" and d["instance_id"] in started:
            started[d["instance_id"]].ready_seconds = d["ready_seconds"]
        elif r.type == "ModelServerReused":
            causes.append(
                ServerCause(action="reused", instance_id=d["instance_id"], position=r.position)
            )
        elif r.type == "ModelServerStartFailed":
            causes.append(
                ServerCause(
                    action="start_failed",
                    instance_id=d.get("instance_id"),
                    detail=str(d["error"]).splitlines()[0],
                    position=r.position,
                )
            )
        elif r.type == "ModelServerStopped" and d.get("reason") == "evicted":
            causes.append(
                ServerCause(
                    action="evicted",
                    instance_id=d["instance_id"],
                    detail=d.get("detail", ""),
                    position=r.position,
                )
            )
    return causes


def _server_lines(causes: list[ServerCause]) -> list[str]:
    lines = []
    for c in causes:
        if c.action == "started":
            ready = "" if c.ready_seconds is None else f", ready in {c.ready_seconds:.2f} s"
            lines.append(
                f"model server {c.instance_id} of {c.model} (pid {c.pid}, port {c.port}) was "
                f"started for this task at position {c.position}{ready}"
            )
        elif c.action == "reused":
            lines.append(f"served through running model server {c.instance_id} (reused)")
        elif c.action == "start_failed":
            lines.append(f"model server start failed at position {c.position}: {c.detail}")
        elif c.action == "evicted":
            lines.append(f"evicted model server {c.instance_id} to make room ({c.detail})")
    return lines


def _task_summary(e: TaskExplanation, started: EventRecord) -> list[str]:
    lines = [
        f"task {e.task_id} of session {e.session_id} on worker {e.worker_id}: {e.status}"
        f" (started at position {started.position})"
    ]
    if e.source == "task":
        lines.append(f"model {e.model_ref} was given with the task itself")
    elif e.source == "session" and e.override is not None and e.override.forked_from:
        o = e.override
        lines.append(
            f"session override forked at position {o.position} from session {o.forked_from}"
            f" as of position {o.forked_at}, with policy {o.model_policy}: {o.model_ref} -> "
            f"{o.resolved_model}"
        )
    elif e.source == "session" and e.override is not None:
        o = e.override
        lines.append(
            f"session override set at position {o.position} by session {o.session_id}"
            f" with policy {o.model_policy}: {o.model_ref} -> {o.resolved_model}"
        )
    elif e.source == "profile":
        lines.append(f"no override: the profile's configured model {e.model_ref}")
    if e.resolver_reason:
        lines.append(f"resolver: {e.resolver_reason}")
    if e.conversation:
        served = ", ".join(f"{t.task_id} ({t.model})" for t in e.conversation)
        lines.append(
            f"turn {len(e.conversation) + 1} of a conversation; its history came from {served}"
        )
    for trimmed in (r for r in e.chain if r.type == "ConversationTrimmed"):
        d = trimmed.data
        lines.append(
            f"history trimmed for {d['model']} (context {d['context']} tokens) at position "
            f"{trimmed.position}: dropped the oldest {d['dropped_turns']} turn(s), kept "
            f"{d['kept_turns']}"
        )
    for failed in (r for r in e.chain if r.type == "ModelAttemptFailed"):
        kind = "retryable, next model" if failed.data["retryable"] else "not retryable"
        lines.append(
            f"attempt with {failed.data['model']} failed at position {failed.position} "
            f"({kind}): {failed.data['error']}"
        )
    for queued in (r for r in e.chain if r.type == "TaskQueued"):
        lines.append(
            f"queued at position {queued.position}: all {queued.data['slots']} concurrency "
            f"slots were busy ({queued.data['ahead']} task(s) ahead)"
        )
    for rej in e.rejections:
        lines.append(f"not reused: {rej.instance_id} ({rej.reason}: {rej.detail})")
    p = e.process
    if p.action == "reused":
        lines.append(f"reused process {p.instance_id} (pid {p.pid}) at position {p.position}")
    elif p.action == "spawned":
        lines.append(f"spawned process {p.instance_id} (pid {p.pid}) at position {p.position}")
    elif p.action == "in-process":
        lines.append(f"served in-process by agent worker {p.instance_id}")
    lines += _server_lines(e.model_servers)
    if e.model:
        lines.append(f"served by model {e.model}")
    if e.error:
        lines.append(f"failed: {e.error}")
    return lines


# The registry events of a worker's process history (`explain worker`).
HISTORY_TYPES = tuple(sorted(types_of("registry") - {"WorkerDraining"}))
