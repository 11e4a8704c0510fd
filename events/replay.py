"""Replay: the whole state as of any log position."""

from __future__ import annotations

from events.projections import LogState, apply
from events.store import EventLog


def replay(store: EventLog | str, until: int | None = None) -> LogState:
    """Fold the log from the start up to and including `until` (default: the end)."""
    log = store if isinstance(store, EventLog) else EventLog(store, create=False)
    try:
        state = LogState()
        for position, event in log.read_log(until=until):
            state = apply(state, position, event)
        return state
    finally:
        if log is not store:
            log.close()
