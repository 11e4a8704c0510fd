"""Live state of one stream: newest snapshot plus the events after it, caught up on demand.

Loading a stream reads one snapshot and at most `SNAPSHOT_EVERY` events, however long the
log is; catching up reads only the events appended since the last look. A view may ride
along with its snapshots (`on_snapshot`): the registry's (`registry_view`) brings its
history's checkpoint up to date and saves it when due (`events.checkpoints`), so every
writer leaves the log with them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from events.catalogue import MEMORY_STREAM, REGISTRY_STREAM, Event, session_stream
from events.checkpoints import registry_checkpoints
from events.projections import (
    MemoryState,
    RegistryState,
    SessionState,
    apply_memory,
    apply_registry,
    apply_session,
)
from events.store import EventLog, StreamConflict

S = TypeVar("S", bound=BaseModel)

SNAPSHOT_EVERY = 100


class StreamView(Generic[S]):
    """A stream's folded state, kept current by `refresh()`."""

    def __init__(
        self,
        log: EventLog,
        stream: str,
        initial: Callable[[], S],
        fold: Callable[[S, Event], S],
        on_snapshot: Callable[[EventLog], object] | None = None,
    ) -> None:
        self.log = log
        self.stream = stream
        self._initial = initial
        self._fold = fold
        self._on_snapshot = on_snapshot  # called after each snapshot this view saves
        self._lock = threading.RLock()
        self.version = 0
        self.known = False  # has the stream been read past its snapshot yet?
        self._snapshot_version = 0
        self.state = initial()
        snapshot = log.load_snapshot(stream)
        if snapshot is not None:
            self.version, data = snapshot
            self._snapshot_version = self.version
            self.state = type(self.state).model_validate(data)

    @property
    def lock(self) -> threading.RLock:
        """Held while deciding and appending, so threads of one process take turns."""
        return self._lock

    def refresh(self) -> S:
        """Fold events appended since the last look (by anyone) and return the state."""
        with self._lock:
            for event in self.log.read_stream(self.stream, after=self.version):
                self.state = self._fold(self.state, event.event)
                self.version = event.version
            self.known = True
            if self.version - self._snapshot_version >= SNAPSHOT_EVERY:
                self.log.save_snapshot(
                    self.stream, self.version, self.state.model_dump(mode="json")
                )
                self._snapshot_version = self.version
                if self._on_snapshot is not None:
                    self._on_snapshot(self.log)
            return self.state

    def append(self, events: list[Event]) -> None:
        """Append facts that rest on no decision, retrying past other writers until they land.

        Decisions instead append at the version they were made on and decide again on
        `StreamConflict`.
        """
        append_together((self, events))

    def fold_appended(self, events: list[Event]) -> None:
        """Fold events this process just appended at `version + 1...` (no read needed: they
        are the same typed events a read would give)."""
        for event in events:
            self.state = self._fold(self.state, event)
            self.version += 1


class StreamTail:
    """A stream written to without its state: just the version to append after. The
    memory stream's writers use it, so a note costs the same with 40 or 40,000 notes."""

    def __init__(self, log: EventLog, stream: str) -> None:
        self.log = log
        self.stream = stream
        self.lock = threading.RLock()
        self.version = 0
        self.known = False  # has the stream been read since this tail was made?

    def refresh(self) -> None:
        """Learn the stream's newest version (one indexed read, no events decoded)."""
        with self.lock:
            self.version = self.log.stream_version(self.stream)
            self.known = True

    def fold_appended(self, events: list[Event]) -> None:
        """Count events this process just appended."""
        self.version += len(events)


Appendable = StreamView[Any] | StreamTail


def append_together(
    *batches: tuple[Appendable, list[Event]],
    decided_on: tuple[Appendable, int] | None = None,
) -> list[int]:
    """Append facts to one or more streams in one transaction, retrying on conflicts;
    returns their log positions.

    `decided_on` is (stream, version): the batch was decided on that stream's state at that
    version. When any writer (another thread or process) has moved it since, `StreamConflict`
    is raised (after catching up) instead of a retry, so the caller decides again on the new
    state. Facts on other streams still retry.
    """
    batches = tuple(b for b in batches if b[1])
    if not batches:
        return []
    views = sorted({id(v): v for v, _ in batches}.values(), key=lambda v: v.stream)
    with contextlib.ExitStack() as held:
        for view in views:  # a fixed order, so two writers never wait on each other
            held.enter_context(view.lock)
        # Optimistic: append after the versions this process knows (a stream it has never
        # read is read first); only another writer's append, seen as a conflict, costs a read.
        stale = [view for view in views if not view.known]
        log = batches[0][0].log
        while True:
            for view in stale:
                view.refresh()
            if decided_on is not None and decided_on[0].version != decided_on[1]:
                raise StreamConflict(f"{decided_on[0].stream} moved since the decision")
            try:
                positions = log.append_batches(
                    [(v.stream, events, v.version) for v, events in batches]
                )
            except StreamConflict:
                stale = views
                continue
            for view, events in batches:
                view.fold_appended(events)
            return positions


def memory_view(log: EventLog) -> StreamView[MemoryState]:
    """The memory store's notes, links and done summaries (folded on demand: only the
    `memory` view needs them)."""
    return StreamView(log, MEMORY_STREAM, MemoryState, apply_memory)


def registry_view(log: EventLog) -> StreamView[RegistryState]:
    """The live state of the device registry. Its history rides along with its snapshots:
    caught up from the newest saved checkpoint, saving one when due, so no reader folds it
    from the start."""
    return StreamView(log, REGISTRY_STREAM, RegistryState, apply_registry, registry_checkpoints)


def session_view(log: EventLog, session_id: str) -> StreamView[SessionState]:
    """The live state of one session's stream."""
    return StreamView(
        log, session_stream(session_id), lambda: SessionState(session_id=session_id), apply_session
    )
