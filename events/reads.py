"""Indexed reads: state that the live streams leave out to stay light, read from the log
through its index at the cost of what it holds (ADR-0007)."""

from __future__ import annotations

from events.catalogue import (
    CONFIG_STREAM,
    REGISTRY_STREAM,
    TERMINAL_TASK_EVENTS,
    ConfigRecorded,
    TaskStarted,
    session_stream,
)
from events.projections import (
    AnyRegistryEntry,
    Override,
    Owner,
    RegistryState,
    SessionState,
    TaskRecord,
    apply_registry,
    apply_session,
    apply_task,
    owner_of,
)
from events.store import EventLog, Filter

# The events that shape a task's record (the rest are decisions about it).
TASK_RECORD_TYPES = ("TaskStarted", "ModelAttemptFailed", *sorted(TERMINAL_TASK_EVENTS))
OVERRIDE_TYPES = ("WorkerModelSet", "WorkerModelReset", "SessionForked")


def read_task(log: EventLog, task_id: str) -> tuple[TaskRecord, Owner | None] | None:
    """Any task of the store by id, and its owner while it runs; None if never started."""
    task: TaskRecord | None = None
    owner = None
    for _, event in log.select(Filter(task_id=task_id, types=TASK_RECORD_TYPES)):
        task = apply_task(task, event)
        if isinstance(event, TaskStarted):
            owner = owner_of(event)
    if task is None:
        return None
    return task, owner if task.status == "running" else None


def session_tasks(log: EventLog, session_id: str) -> list[TaskRecord]:
    """Every task of one session, oldest first."""
    tasks: dict[str, TaskRecord] = {}
    where = Filter(stream=session_stream(session_id), types=TASK_RECORD_TYPES)
    for _, event in log.select(where):
        task = apply_task(tasks.get(str(event.task_id)), event)
        if task is not None:
            tasks[task.task_id] = task
    return list(tasks.values())


def registry_history(log: EventLog) -> tuple[RegistryState, dict[str, AnyRegistryEntry]]:
    """The registry folded from its first event: the live state and every stopped process
    (and model server)."""
    state, retired = RegistryState(), dict[str, AnyRegistryEntry]()
    for _, event in log.select(Filter(stream=REGISTRY_STREAM)):
        apply_registry(state, event, retired)
    return state, retired


def overrides_at(log: EventLog, session_id: str, position: int) -> dict[str, Override] | None:
    """A session's overrides as of a log position (None if it had no events by then): its
    override events folded, which are few however long the session is."""
    stream = session_stream(session_id)
    if not any(True for _ in log.select(Filter(stream=stream), until=position, limit=1)):
        return None
    state = SessionState(session_id=session_id)
    for _, event in log.select(Filter(stream=stream, types=OVERRIDE_TYPES), until=position):
        apply_session(state, event)
    return state.overrides


def last_config(log: EventLog) -> str | None:
    """The digest of the newest `ConfigRecorded`, if any."""
    for _, event in log.select(Filter(stream=CONFIG_STREAM), newest_first=True, limit=1):
        assert isinstance(event, ConfigRecorded)
        return event.config_digest
    return None


def recorded_configs(log: EventLog) -> dict[str, ConfigRecorded]:
    """Every recorded configuration by digest."""
    found = {}
    for _, event in log.select(Filter(stream=CONFIG_STREAM)):
        assert isinstance(event, ConfigRecorded)
        found[event.config_digest] = event
    return found
