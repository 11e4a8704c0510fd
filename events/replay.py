"""Replay: the whole state as of any log position."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from events.projections import LogState, apply_all
from events.store import EventLog


def replay(store: EventLog | str, until: int | None = None) -> LogState:
    """Fold the log from the start up to and including `until` (default: the end)."""
    log = store if isinstance(store, EventLog) else EventLog(store, create=False)
    try:
        with collector_paused():
            return apply_all(LogState(), log.read_log(until=until))
    finally:
        if log is not store:
            log.close()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while a fold builds a large state. Every record a
    replay keeps lives to the end, so the collector's passes over the growing heap found
    nothing and were a sixth of a replay's time (and growing with the log); the folds make
    no cycles, and reference counting still frees each decoded event as soon as it is
    folded. The collector is turned back on only if it was on (a nested or concurrent pause
    leaves it to the outermost)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
