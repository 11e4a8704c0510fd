"""Checkpoints of the registry's history, so questions about processes cost what they
return, not the registry's length (ADR-0014).

The registry's live state leaves stopped processes out to stay light (ADR-0007); the
`registry`, `replay` and `diff` views need them, and the registry as of any position.
`RegistryCheckpoints` folds the registry stream once, in log order, keeping the live state
plus every retired process, and a checkpoint of both every `CHECKPOINT_EVERY` registry
events (or `CHECKPOINT_SPAN` positions). After that:

- the registry now (stopped processes too) is the fold caught up with the events appended
  since the last look;
- the registry as of a position is the nearest checkpoint plus at most `CHECKPOINT_EVERY`
  events read through the index.

`registry_checkpoints(log)` keeps one per open `EventLog` in memory, built on first use and
caught up incrementally; nothing is written to the store, so a read-only look (the
inspector) uses it too, and a change to the projections needs no migration.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from events.catalogue import REGISTRY_STREAM, Event, types_of
from events.projections import AnyRegistryEntry, RegistryState, apply_registry
from events.store import EventLog, Filter

CHECKPOINT_EVERY = 256
# Also a checkpoint at a registry event this many positions after the last one, so the
# events between two checkpoints lie within this many positions (the read after one is a
# short range of the log, however sparse the registry's events are).
CHECKPOINT_SPAN = 20_000
REGISTRY_TYPES = tuple(sorted(types_of("registry")))
_ENTRY: TypeAdapter[AnyRegistryEntry] = TypeAdapter(AnyRegistryEntry)  # a worker or model server

Read = Callable[[int, int], Iterable[tuple[int, Event]]]


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
    every: int = field(default_factory=lambda: CHECKPOINT_EVERY)
    _since_checkpoint: int = 0
    _checkpoints: list[_Checkpoint] = field(default_factory=list)
    _checkpoint_at: list[int] = field(default_factory=list)

    def feed(self, position: int, event: Event) -> bool:
        """Fold one registry event, in log order (one already folded is skipped, so two
        readers may feed the same history); checkpoint every `every` events. True if
        folded."""
        if position <= self.position and self._checkpoints:
            return False
        if not self._checkpoints:
            self._checkpoint(0)
        apply_registry(self.state, event, self.retired)
        self.position = position
        self._since_checkpoint += 1
        far = position - self._checkpoint_at[-1] >= CHECKPOINT_SPAN
        if self._since_checkpoint >= self.every or far:
            self._checkpoint(position)
            self._since_checkpoint = 0
        return True

    def catch_up(self, log: EventLog) -> None:
        """Fold the registry events appended since the last look."""
        # By type, not stream: the store then reads only the events after `position` (the
        # stream's index, paired with the position, would be walked from its start).
        for position, event in log.select(Filter(types=REGISTRY_TYPES), after=self.position):
            self.feed(position, event)

    def _checkpoint(self, position: int) -> None:
        retired = {k: v.model_dump(mode="json") for k, v in self.retired.items()}
        self._checkpoints.append(_Checkpoint(position, self.state.model_dump(mode="json"), retired))
        self._checkpoint_at.append(position)

    @property
    def checkpoints(self) -> int:
        """How many checkpoints are kept."""
        return len(self._checkpoints)

    def rows(self) -> dict[str, Any]:
        """Every process and model server folded so far (stopped ones too), by id."""
        return registry_rows(self.state, self.retired)

    def rows_at(self, position: int, read: Read) -> dict[str, Any]:
        """The registry's processes and model servers (running and stopped) as of a
        position, by id: the nearest checkpoint, then `read(after, until)`'s registry events
        up to the position (all within `CHECKPOINT_SPAN` positions of the checkpoint).
        Copies: the caller may keep them."""
        if position >= self.position:
            return {k: e.model_copy(deep=True) for k, e in self.rows().items()}
        i = bisect.bisect_right(self._checkpoint_at, position) - 1
        base = self._checkpoints[max(i, 0)]
        state = RegistryState.model_validate(base.state)
        retired = {k: _ENTRY.validate_python(v) for k, v in base.retired.items()}
        if base.position < position:
            until = min(position, base.position + CHECKPOINT_SPAN)
            for _, event in read(base.position, until):
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
    """This log's registry checkpoints, caught up with the log (built on first use)."""
    with _LOCK:
        found = _KEPT.get(log)
        if found is None:
            found = _KEPT[log] = RegistryCheckpoints()
        found.catch_up(log)
        return found


def registry_events(log: EventLog) -> Read:
    """The `read` that `RegistryCheckpoints.at` takes, over this log's index."""

    def read(after: int, until: int) -> Iterable[tuple[int, Event]]:
        return log.select(Filter(stream=REGISTRY_STREAM), after=after, until=until)

    return read
