"""Checkpoints of the registry's history, so questions about processes cost what they
return, not the registry's length (ADR-0014).

The registry's live state leaves stopped processes out to stay light (ADR-0007); the
`registry`, `replay` and `diff` views need them, and the registry as of any position.
`RegistryCheckpoints` folds the registry stream in log order, keeping the live state, every
retired process, and how each process started and stopped, with a checkpoint of all that
every `CHECKPOINT_EVERY` registry events (or `CHECKPOINT_SPAN` positions; both scaled up
with the number of processes, so a checkpoint's cost is spread over as many events as it
has rows).

Checkpoints persist: each one is saved in the store's snapshot table under `saved_name()`
(a name no stream has, versioned by `FORMAT` and the digest of the saved shape, so a
checkpoint of another shape is never read), at its log position. Writers save them as the
log grows (`StreamView` calls `registry_checkpoints` whenever it saves the registry's own
snapshot), and so does any process that folds the registry on a store it may write. So:

- `registry_checkpoints(log)` starts from the newest saved checkpoint and folds only the
  registry events after it, in any new process, read-only ones (the inspector) included;
- the registry as of a position is the nearest checkpoint at or before it (kept in memory
  since this process started, else read from the store) plus the registry events between;
  a position older than every checkpoint (a log written before they were saved) is folded
  from the start once, lazily, and kept in memory;
- a process whose log keeps its checkpoints holds only the newest in memory; a read-only
  one keeps those it made since it started.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from pydantic import BaseModel, TypeAdapter, ValidationError

from events.catalogue import (
    Event,
    WorkerDraining,
    WorkerExited,
    WorkerSpawned,
    WorkerStopped,
    types_of,
)
from events.projections import AnyRegistryEntry, RegistryState, apply_registry
from events.store import EventLog, Filter

CHECKPOINT_EVERY = 256
# Also a checkpoint at a registry event this many positions after the last one, so the
# events between two checkpoints lie within this many positions (the read after one is a
# short range of the log, however sparse the registry's events are).
CHECKPOINT_SPAN = 20_000
# The saved checkpoints' version: bump it when the fold (`apply_registry`, `_note`) gives
# other rows for the same events (a test pins the fold's digest per FORMAT, so a change to
# the fold without a bump fails). A change of the saved shape changes the name by itself.
FORMAT = 1
REGISTRY_TYPES = tuple(sorted(types_of("registry")))
_ENTRY: TypeAdapter[AnyRegistryEntry] = TypeAdapter(AnyRegistryEntry)  # a worker or model server

Read = Callable[[int, int], Iterable[tuple[int, Event]]]
# instance id -> (position, session id, task id) of its spawn; (position, reason, detail)
# of its stop
Starts = dict[str, tuple[int, str, str | None]]
Stops = dict[str, tuple[int, str, str]]


class SavedCheckpoint(BaseModel):
    """A registry checkpoint as the snapshot table holds it (at version `position`)."""

    position: int
    state: RegistryState
    retired: dict[str, AnyRegistryEntry]
    starts: Starts
    stops: Stops


@functools.cache
def saved_name() -> str:
    """The snapshot-table name of this version's registry checkpoints: no stream has it,
    and another `FORMAT` or saved shape has another."""
    shape = json.dumps(SavedCheckpoint.model_json_schema(), sort_keys=True)
    digest = hashlib.sha256(f"{FORMAT}\n{shape}".encode()).hexdigest()[:16]
    return f"checkpoint:registry:{FORMAT}:{digest}"


def load_saved(log: EventLog, at_most: int | None = None) -> SavedCheckpoint | None:
    """The newest saved checkpoint (at or before position `at_most`), or None. One that
    does not decode or validate, or claims a position the log has not reached, is not
    trusted."""
    try:
        found = log.load_snapshot(saved_name(), at_most)
    except ValueError:  # not UTF-8 or not JSON: a damaged row (a store failure is StoreError)
        return None
    if found is None:
        return None
    try:
        saved = SavedCheckpoint.model_validate(found[1])
    except ValidationError:
        return None
    if saved.position != found[0] or saved.position > log.head():
        return None
    return saved


@dataclass
class _Checkpoint:
    position: int
    state: dict[str, Any]
    retired: dict[str, Any]


def registry_rows(state: RegistryState, retired: dict[str, AnyRegistryEntry]) -> dict[str, Any]:
    """Every process and model server of a registry state and its retired ones, by id."""
    return {**state.entries, **state.servers, **retired}


@dataclass
class RegistryCheckpoints:
    """The registry folded as the log grows (stopped processes kept), with checkpoints."""

    position: int = 0  # the newest log position folded
    state: RegistryState = field(default_factory=RegistryState)
    retired: dict[str, AnyRegistryEntry] = field(default_factory=dict)
    starts: Starts = field(default_factory=dict)
    stops: Stops = field(default_factory=dict)
    every: int = field(default_factory=lambda: CHECKPOINT_EVERY)
    _since_checkpoint: int = 0
    _grown: int = 1  # the largest `_scale()` so far
    _checkpoints: list[_Checkpoint] = field(default_factory=list)
    _checkpoint_at: list[int] = field(default_factory=list)
    # The log checkpoints are saved to and older ones read from (weak: it keys `_KEPT`).
    _log: weakref.ref[EventLog] | None = field(default=None, repr=False, compare=False)
    _saves: bool = True  # False once the log has declined a save (read-only)
    _older: RegistryCheckpoints | None = field(default=None, repr=False, compare=False)
    _older_to: int = 0  # the position the older fold has read to
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def from_store(cls, log: EventLog) -> Self:
        """Start from the newest checkpoint saved in `log`, if any, and save new ones
        there (when it keeps them)."""
        found = cls()
        found._log = weakref.ref(log)
        saved = load_saved(log)
        if saved is not None:
            found.position, found.state = saved.position, saved.state
            found.retired, found.starts, found.stops = saved.retired, saved.starts, saved.stops
            found._checkpoint(saved.position, save=False)
        return found

    def feed(self, position: int, event: Event) -> bool:
        """Fold one registry event, in log order (one already folded is skipped, so two
        readers may feed the same history); checkpoint when due. True if folded."""
        with self._lock:
            if position <= self.position and self._checkpoints:
                return False
            if not self._checkpoints:
                self._checkpoint(0, save=False)
            apply_registry(self.state, event, self.retired)
            self._note(position, event)
            self.position = position
            self._since_checkpoint += 1
            scale = self._scale()
            far = position - self._checkpoint_at[-1] >= CHECKPOINT_SPAN * scale
            if self._since_checkpoint >= self.every * scale or far:
                self._checkpoint(position)
            return True

    def _note(self, position: int, event: Event) -> None:
        """Remember how a process started and stopped (the inspector's processes page)."""
        if isinstance(event, WorkerSpawned):
            self.starts[event.instance_id] = (position, event.session_id, event.task_id)
        elif isinstance(event, WorkerStopped | WorkerDraining | WorkerExited):
            reason = getattr(event, "reason", "exited")
            self.stops[event.instance_id] = (position, reason, event.detail)

    def _scale(self) -> int:
        """How many times `every` events (and `CHECKPOINT_SPAN` positions) a checkpoint
        waits: one per `every` rows, never less than it was (so the reach of an older
        checkpoint, `rows_at`'s bound, holds)."""
        rows = len(self.state.entries) + len(self.state.servers) + len(self.retired)
        self._grown = max(self._grown, rows // max(1, self.every), 1)
        return self._grown

    def catch_up(self, log: EventLog) -> None:
        """Fold the registry events appended since the last look."""
        # By type, not stream: the store then reads only the events after `position` (the
        # stream's index, paired with the position, would be walked from its start).
        for position, event in log.select(Filter(types=REGISTRY_TYPES), after=self.position):
            self.feed(position, event)

    def _checkpoint(self, position: int, save: bool = True) -> None:
        retired = {k: v.model_dump(mode="json") for k, v in self.retired.items()}
        point = _Checkpoint(position, self.state.model_dump(mode="json"), retired)
        self._since_checkpoint = 0
        log = self._log() if self._log is not None and save and self._saves else None
        if log is not None:
            saved = {
                "position": position,
                "state": point.state,
                "retired": point.retired,
                "starts": self.starts,
                "stops": self.stops,
            }
            if log.save_snapshot(saved_name(), position, saved):
                # The store has this one and every older one: only the newest stays here.
                self._checkpoints.clear()
                self._checkpoint_at.clear()
            else:
                self._saves = False
        self._checkpoints.append(point)
        self._checkpoint_at.append(position)

    @property
    def checkpoints(self) -> int:
        """How many checkpoints are kept in memory."""
        return len(self._checkpoints)

    def rows(self) -> dict[str, Any]:
        """Every process and model server folded so far (stopped ones too), by id."""
        return registry_rows(self.state, self.retired)

    def rows_at(self, position: int, read: Read) -> dict[str, Any]:
        """The registry's processes and model servers (running and stopped) as of a
        position, by id: the nearest checkpoint at or before it, then `read(after, until)`'s
        registry events up to the position. Copies: the caller may keep them."""
        with self._lock:
            if position >= self.position:
                return {k: e.model_copy(deep=True) for k, e in self.rows().items()}
            i = bisect.bisect_right(self._checkpoint_at, position) - 1
            if i >= 0:
                base = self._checkpoints[i]
                state = RegistryState.model_validate(base.state)
                retired = {k: _ENTRY.validate_python(v) for k, v in base.retired.items()}
                # The registry events after an in-memory checkpoint lie within its reach.
                until = min(position, base.position + CHECKPOINT_SPAN * self._scale())
                return _fold(state, retired, base.position, until, read)
            log = self._log() if self._log is not None else None
        saved = load_saved(log, position) if log is not None else None
        if saved is not None:
            return _fold(saved.state, saved.retired, saved.position, position, read)
        return self._older_rows(log, position, read)

    def _older_rows(self, log: EventLog | None, position: int, read: Read) -> dict[str, Any]:
        """Rows as of a position older than every checkpoint, kept or saved (a log written
        before checkpoints were saved): folded from the start into checkpoints kept in
        memory, once, as far as asked."""
        with self._lock:
            if self._older is None:
                self._older = RegistryCheckpoints(every=self.every)
            if log is not None and position > self._older_to:
                where = Filter(types=REGISTRY_TYPES)
                for at, event in log.select(where, after=self._older_to, until=position):
                    self._older.feed(at, event)
                self._older_to = position
            return self._older.rows_at(position, read)


def _fold(
    state: RegistryState, retired: dict[str, AnyRegistryEntry], after: int, until: int, read: Read
) -> dict[str, Any]:
    """A checkpoint's rows brought forward by the registry events in (after, until]."""
    if after < until:
        for _, event in read(after, until):
            apply_registry(state, event, retired)
    return registry_rows(state, retired)


_KEPT: weakref.WeakKeyDictionary[EventLog, RegistryCheckpoints] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def share(log: EventLog, history: RegistryCheckpoints) -> None:
    """Use `history` (kept current by its owner, e.g. the inspector's follower) as this
    log's registry checkpoints."""
    with _LOCK:
        _KEPT[log] = history


def registry_checkpoints(log: EventLog) -> RegistryCheckpoints:
    """This log's registry checkpoints, caught up with the log: on first use, from the
    newest checkpoint saved in the store (else from the start), saving new ones there as
    they fall due."""
    with _LOCK:
        found = _KEPT.get(log)
    if found is None:
        # The store is read outside the process-wide lock, so another log of this process
        # (another session's orchestrator) never waits on this one's I/O; two threads
        # meeting here keep the first made, and `feed` skips what is folded already.
        made = RegistryCheckpoints.from_store(log)
        with _LOCK:
            found = _KEPT.setdefault(log, made)
    found.catch_up(log)
    return found


def registry_events(log: EventLog) -> Read:
    """The `read` that `RegistryCheckpoints.rows_at` takes: the registry's events in a range
    of positions, read by type, so the store walks that range of the log only (a read by
    the registry's stream walks the stream's index from its start: 13 ms at 1M events)."""

    def read(after: int, until: int) -> Iterable[tuple[int, Event]]:
        return log.select(Filter(types=REGISTRY_TYPES), after=after, until=until)

    return read
