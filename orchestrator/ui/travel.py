"""Projections indexed by log position, for the inspector's timeline and time travel.

A session's state at any position is answered without a replay from the start:

- `SessionHistory` folds one session's own events (read through the index by session id,
  so its cost is the session's length, not the log's) and keeps, for each task, its record
  at every change, and the session's overrides at every change. The state as of a position
  is then one binary search per task and one for the overrides.
- `RegistryHistory` is the registry's `events.checkpoints.RegistryCheckpoints`: started from
  the newest checkpoint the writers saved, the registry as of a position is the nearest
  checkpoint at or before it plus the registry events between, read through the index.

Both are fed in log order, incrementally, as the log grows (the caller hands in events),
and neither writes to the store: the inspector's log is read-only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime

from events.catalogue import (
    Event,
    ModelAttemptFailed,
    SessionForked,
    TaskCancelled,
    TaskStarted,
    WorkerModelReset,
    WorkerModelSet,
    WorkerReused,
    WorkerReuseRejected,
    WorkerSpawned,
)
from events.checkpoints import Read, RegistryCheckpoints
from events.projections import (
    AnyRegistryEntry,
    Override,
    SessionState,
    TaskRecord,
    apply_session,
    apply_task,
)

# The markers a timeline shows, by event type: (kind, what the mark says).
MARKERS: dict[type[Event], str] = {
    WorkerModelSet: "set",
    WorkerModelReset: "reset",
    SessionForked: "fork",
    WorkerSpawned: "spawn",
    WorkerReused: "reuse",
    WorkerReuseRejected: "rejected",
    ModelAttemptFailed: "fallback",
    TaskCancelled: "cancel",
}


@dataclass(frozen=True)
class Marker:
    """One notable decision on a session's timeline."""

    kind: str
    position: int
    timestamp: datetime
    worker_id: str | None
    task_id: str | None
    label: str


def _label(event: Event) -> str:
    if isinstance(event, WorkerModelSet):
        return f"set {event.worker_id} to {event.model_ref} -> {event.resolved_model}"
    if isinstance(event, WorkerModelReset):
        return f"reset {event.worker_id}"
    if isinstance(event, SessionForked):
        return f"forked from {event.from_session_id} at {event.position}"
    if isinstance(event, WorkerSpawned):
        return f"spawned {event.instance_id} (pid {event.pid}, {event.model})"
    if isinstance(event, WorkerReused):
        return f"reused {event.instance_id}"
    if isinstance(event, WorkerReuseRejected):
        return f"not reused {event.instance_id}: {event.reason} {event.detail}".strip()
    if isinstance(event, ModelAttemptFailed):
        return f"{event.model} failed: {event.error}"
    if isinstance(event, TaskCancelled):
        return f"cancelled {event.task_id}"
    return event.type_name()


@dataclass
class SessionHistory:
    """One session's history: the slider's stops, markers, task and override versions."""

    session_id: str
    position: int = 0  # the newest log position folded
    stops: list[int] = field(default_factory=list)  # positions of this session's events
    markers: list[Marker] = field(default_factory=list)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)  # each task's record now
    task_starts: list[tuple[int, str]] = field(default_factory=list)  # (position, task id)
    _versions: dict[str, tuple[list[int], list[TaskRecord]]] = field(default_factory=dict)
    _override_at: list[int] = field(default_factory=list)
    _overrides: list[dict[str, Override]] = field(default_factory=list)
    _state: SessionState | None = None

    def feed(self, position: int, event: Event) -> None:
        """Fold one event of this session (session stream or registry), in log order."""
        self.position = position
        self.stops.append(position)
        kind = MARKERS.get(type(event))
        if kind is not None:
            self.markers.append(
                Marker(
                    kind,
                    position,
                    event.timestamp,
                    event.worker_id,
                    event.task_id,
                    _label(event),
                )
            )
        if event.stream_kind != "session":
            return
        if self._state is None:
            self._state = SessionState(session_id=self.session_id)
        if isinstance(event, WorkerModelSet | WorkerModelReset | SessionForked):
            apply_session(self._state, event)
            self._override_at.append(position)
            self._overrides.append(dict(self._state.overrides))
        task_id = event.task_id
        if task_id is None:
            return
        before = self.tasks.get(task_id)
        if before is not None and before.status != "running":
            return  # the first terminal event wins
        after = apply_task(before.model_copy(deep=True) if before else None, event)
        if after is None or after == before:
            return
        if isinstance(event, TaskStarted):
            self.task_starts.append((position, task_id))
        self.tasks[task_id] = after
        positions, records = self._versions.setdefault(task_id, ([], []))
        positions.append(position)
        records.append(after)

    def overrides_at(self, position: int) -> dict[str, Override]:
        """The session's overrides as of a position."""
        i = bisect.bisect_right(self._override_at, position)
        return self._overrides[i - 1] if i else {}

    def tasks_at(self, position: int) -> list[TaskRecord]:
        """Every task started by a position, each as its record stood there."""
        started = bisect.bisect_right(self.task_starts, (position, "\uffff"))
        found = []
        for _, task_id in self.task_starts[:started]:
            positions, records = self._versions[task_id]
            found.append(records[bisect.bisect_right(positions, position) - 1])
        return found


@dataclass
class Process:
    """A registry entry and how it started and stopped (the `processes` page's row)."""

    entry: AnyRegistryEntry
    started_by: str
    stopped_why: str | None = None


@dataclass
class RegistryHistory(RegistryCheckpoints):
    """The registry folded as the log grows, with checkpoints, and how each process started
    and stopped (shared with the views: `checkpoints.share`)."""

    def processes(self) -> list[Process]:
        """Every process the registry knows now (stopped ones too), oldest first."""
        entries = sorted(
            [*self.state.entries.values(), *self.retired.values()], key=lambda e: e.started_at
        )
        return [
            Process(e, self._started_by(e.instance_id), self._stopped_why(e.instance_id))
            for e in entries
        ]

    def _started_by(self, instance_id: str) -> str:
        if instance_id not in self.starts:
            return ""
        position, session_id, task_id = self.starts[instance_id]
        task = f" task {task_id}" if task_id else ""
        return f"spawned for session {session_id}{task} at position {position}"

    def _stopped_why(self, instance_id: str) -> str | None:
        if instance_id not in self.stops:
            return None
        position, reason, detail = self.stops[instance_id]
        return f"{reason}{f': {detail}' if detail else ''} (position {position})"

    def at(self, position: int, read: Read) -> list[AnyRegistryEntry]:
        """The registry's processes (running and stopped) as of a position: the nearest
        checkpoint, then `read(after, until)`'s registry events up to the position."""
        return list(self.rows_at(position, read).values())
