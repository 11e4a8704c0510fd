"""Pages of the views whose whole answer is the size of the log, `replay` and `whatif`
(ADR-0014): asked for a session, a window of positions or a number of rows, they read what
the page holds through the event index instead of folding the log from the start.

- A `whatif` page is the decisions (`ModelResolved`) after `since` up to `until`, the first
  `limit` of them. Their tasks' events are read by task id, the overrides in force by the
  session of each (only the sessions on the page), and each distinct decision input is
  resolved once.
- A `replay` page is the state as of `until` of one session (`session_id`) or of the whole
  store: the registry from its checkpoints, the overrides (the session's own override
  events, or every session's from an override history kept per log), and the tasks started
  after `since`, the first `limit` of them in log order, read by task id.

Each page's rows equal the matching rows of the view that folds the log (a test compares
them on every store). `next_since` says where the next page starts.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from events.catalogue import Event, TaskStarted
from events.checkpoints import registry_checkpoints, registry_events
from events.projections import Override, SessionState, TaskRecord, apply_session, apply_task
from events.reads import OVERRIDE_TYPES, TASK_RECORD_TYPES
from events.store import EventLog, Filter
from orchestrator import views_at_scale
from orchestrator.api import MAX_POSITION, InvalidTaskArgs
from orchestrator.config import OrchestratorConfig
from orchestrator.explain import OverrideRow, ReplayView, override_row
from orchestrator.history import (
    DECISION_TYPES,
    Decided,
    DecisionTracker,
    Redecider,
    WhatIfRow,
    whatif_row,
)
from orchestrator.resolver import build_catalogue


def check_limit(limit: int | None) -> None:
    """A page's `limit`: a number of rows (None: no limit)."""
    if limit is not None and (
        not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_POSITION
    ):
        raise InvalidTaskArgs(
            f"Invalid task_list arguments: limit: a number of rows from 1 to {MAX_POSITION}, "
            f"got {str(limit)[:40]!r}."
        )


def _of_session(session_id: str | None, *types: str) -> Filter:
    """Events of some types, of one session (through its index) or of every session. One
    type is named twice: with a single type, SQLite's planner takes the type's index (every
    such event in the log) over the session's."""
    if session_id is None:
        return Filter(types=types)
    return Filter(session_id=session_id, types=types * 2 if len(types) == 1 else types)


# --- overrides over time ---------------------------------------------------------------------


@dataclass
class OverrideTimeline:
    """Sessions' overrides after each of their override events, so the overrides in force
    at any position are a binary search."""

    position: int = 0  # the newest position fed
    _states: dict[str, SessionState] = field(default_factory=dict)
    _at: dict[str, list[int]] = field(default_factory=dict)
    _overrides: dict[str, list[dict[str, Override]]] = field(default_factory=dict)

    def feed(self, position: int, event: Event) -> None:
        """Fold one override event (of `OVERRIDE_TYPES`), in log order."""
        sid = event.session_id
        state = self._states.get(sid)
        if state is None:
            state = self._states[sid] = SessionState(session_id=sid)
            self._at[sid], self._overrides[sid] = [], []
        apply_session(state, event)
        # Overrides are replaced, never changed in place: the copy may share them.
        self._at[sid].append(position)
        self._overrides[sid].append(dict(state.overrides))
        self.position = max(self.position, position)

    def at(self, session_id: str, position: int) -> dict[str, Override]:
        """A session's overrides after its events up to `position` (do not change them)."""
        i = bisect.bisect_right(self._at.get(session_id, []), position) - 1
        return self._overrides[session_id][i] if i >= 0 else {}

    def sessions(self) -> list[str]:
        """The sessions with override events, sorted."""
        return sorted(self._at)


def session_overrides(
    log: EventLog, session_ids: Iterable[str], until: int | None
) -> OverrideTimeline:
    """Some sessions' override events up to `until`, each read through its session's index
    (few, however long the session)."""
    timeline = OverrideTimeline()
    for sid in sorted(set(session_ids)):
        for position, event in log.select(_of_session(sid, *OVERRIDE_TYPES), until=until):
            timeline.feed(position, event)
    return timeline


_KEPT: weakref.WeakKeyDictionary[EventLog, OverrideTimeline] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def every_override_at(log: EventLog, position: int) -> list[OverrideRow]:
    """Every session's overrides as of a position, as the `replay` view lists them, from an
    override history kept per open log in memory (like the registry's checkpoints) and
    caught up with the override events appended since the last look: read by type, so the
    store walks only the events after the last one folded. Read under its lock, since
    another thread may be catching it up."""
    with _LOCK:
        found = _KEPT.get(log)
        if found is None:
            found = _KEPT[log] = OverrideTimeline()
        for at, event in log.select(Filter(types=OVERRIDE_TYPES), after=found.position):
            found.feed(at, event)
        return _override_rows(found, found.sessions(), position)


def _override_rows(
    timeline: OverrideTimeline, sessions: list[str], position: int
) -> list[OverrideRow]:
    return [override_row(sid, o) for sid in sessions for o in timeline.at(sid, position).values()]


# --- whatif ------------------------------------------------------------------------------------


def _decisions(
    log: EventLog, session_id: str | None, since: int, until: int | None, limit: int | None
) -> list[tuple[int, Event]]:
    """The page's recorded decisions (`ModelResolved`), in log order."""
    where = _of_session(session_id, "ModelResolved")
    return list(log.select(where, after=since, until=until, limit=limit))


def _task_events(
    log: EventLog, task_ids: Sequence[str], types: tuple[str, ...], until: int | None = None
) -> Iterator[tuple[int, Event]]:
    """Some tasks' events of some types, by id through the index, a page of ids at a time
    (each page in log order)."""
    step = views_at_scale.TASK_IDS_PER_READ
    for i in range(0, len(task_ids), step):
        where = Filter(task_ids=tuple(task_ids[i : i + step]), types=types)
        yield from log.select(where, until=until)


def whatif(
    log: EventLog,
    config: OrchestratorConfig,
    environ: Mapping[str, str],
    session_id: str | None = None,
    since: int = 0,
    until: int | None = None,
    limit: int | None = None,
) -> list[WhatIfRow]:
    """The `whatif` rows of the decisions after `since` up to `until` (of one session, or
    all), the first `limit` of them: `history.whatif`'s rows for those decisions."""
    page = _decisions(log, session_id, since, until, limit)
    if not page:
        return []
    wanted = {position for position, _ in page}
    tracker = DecisionTracker(session_id)
    found: dict[int, Decided] = {}
    task_ids = list(dict.fromkeys(str(event.task_id) for _, event in page))
    # Every event of these tasks that a decision needs, wherever it is in the log: the
    # `TaskStarted` before, the `TaskCompleted` after (its served model).
    for position, event in _task_events(log, task_ids, DECISION_TYPES):
        decided = tracker.feed(position, event)
        if decided is not None and position in wanted:
            found[position] = decided
    for position, event in page:
        if position not in found:  # no task id to read its task's events by: it alone
            alone = DecisionTracker(session_id).feed(position, event)
            assert alone is not None
            found[position] = alone
    overrides = session_overrides(log, (d.session_id for d in found.values()), page[-1][0])
    redecide = Redecider(config, build_catalogue(config, environ))
    rows = []
    for position, _ in page:
        d = found[position]
        override = overrides.at(d.session_id, position - 1).get(d.worker_id)
        rows.append(whatif_row(d, *redecide(d, override)))
    return rows


# --- replay ------------------------------------------------------------------------------------


def _position_at(log: EventLog, until: int | None) -> int:
    """The newest position at or before `until` (a replay's position; 0: none)."""
    if until is None:
        return log.head()
    for position, _ in log.select(Filter(), until=until, limit=1, newest_first=True):
        return position
    return 0


def _started(
    log: EventLog, session_id: str | None, since: int, until: int, limit: int | None
) -> list[tuple[int, str]]:
    """(position, task id) of the `TaskStarted` of the page's tasks, in log order."""
    where = _of_session(session_id, "TaskStarted")
    found = log.select(where, after=since, until=until, limit=limit)
    return [(position, str(event.task_id)) for position, event in found]


def _tasks_at(log: EventLog, task_ids: list[str], until: int) -> list[TaskRecord]:
    """Some tasks' records as of `until`, folded as the whole log's fold does: a task's
    record is its newest `TaskStarted`'s, changed only by its own session's events."""
    tasks: dict[str, tuple[TaskRecord, str]] = {}
    for _, event in _task_events(log, task_ids, TASK_RECORD_TYPES, until):
        task_id = str(event.task_id)
        if isinstance(event, TaskStarted):
            record = apply_task(None, event)
            assert record is not None
            tasks[task_id] = (record, event.session_id)
        elif task_id in tasks and tasks[task_id][1] == event.session_id:
            apply_task(tasks[task_id][0], event)
    return [record for record, _ in tasks.values()]


def replay(
    log: EventLog,
    until: int | None = None,
    session_id: str | None = None,
    since: int = 0,
    limit: int | None = None,
) -> ReplayView:
    """The state as of `until` (default: now): the registry; the overrides of `session_id`
    (or of every session); and the tasks (of `session_id`, or all) started after `since`,
    the first `limit` in log order. The `replay` view's row with only those overrides and
    tasks."""
    position = _position_at(log, until)
    rows = registry_checkpoints(log).rows_at(position, registry_events(log))
    if session_id is None:
        overrides = every_override_at(log, position)
    else:
        overrides = _override_rows(
            session_overrides(log, [session_id], position), [session_id], position
        )
    started = _started(log, session_id, since, position, limit)
    task_ids = list(dict.fromkeys(task_id for _, task_id in started))
    # Oldest first, as the view; a stable sort keeps log order among equal times.
    tasks = sorted(_tasks_at(log, task_ids, position), key=lambda t: t.started_at)
    return ReplayView(
        position=position,
        registry=sorted(rows.values(), key=lambda e: e.started_at),
        overrides=overrides,
        tasks=tasks,
    )


# --- where the next page starts ------------------------------------------------------------


def next_since(log: EventLog, view: str, filters: Mapping[str, Any], rows: list[Any]) -> int | None:
    """The `since` of the page after this one of a paged view (`events`, `whatif`,
    `replay` with `limit`), or None when this page is not full (so it was the last)."""
    limit = filters.get("limit")
    if view not in ("events", "whatif", "replay") or not isinstance(limit, int):
        return None
    since, until = int(filters.get("since") or 0), filters.get("until")
    if view == "events":
        return int(rows[-1].position) if len(rows) == limit else None
    session_id = filters.get("session_id")
    if view == "whatif" and len(rows) == limit:
        # The last row's decision: its task's m-th decision after `since` (m: its rows here).
        last = rows[-1].task_id
        nth = sum(1 for r in rows if r.task_id == last)
        found = [
            p
            for p, e in log.select(Filter(task_id=last), after=since, until=until)
            if e.type_name() == "ModelResolved" and session_id in (None, e.session_id)
        ]
        return found[nth - 1] if len(found) >= nth else None
    if view == "replay":
        started = _started(log, session_id, since, _position_at(log, until), limit)
        return started[-1][0] if len(started) == limit else None
    return None
