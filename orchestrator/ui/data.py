"""Everything the inspector reads, and the only module of it that touches the core.

The store is opened so that it cannot be written: `ReadOnlyLog` refuses appends and skips
snapshot saves and host leases, and views are answered by `views.run` on a
`reading.SessionReader` (one per session asked about: no backend, no process, no writer)
with `reading.NO_WRITES`, which never settles a task nor records anything. So serving
every page leaves the log exactly as it was.

What would cost a scan of the log on every request is kept in memory instead and brought
up to date as the log grows, by one follower thread: a summary of every session (the
sessions page), token and cost buckets (the usage page), the registry with checkpoints
(processes, time travel), and, for the sessions looked at, their histories (timeline, time
travel; see `travel`).

It stays one module over 400 lines because it is the inspector's one boundary with the core:
every read of the store in one file is what makes the read-only promise checkable.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from events import checkpoints
from events.catalogue import (
    EVENT_TYPES,
    Event,
    SessionForked,
    SessionOpened,
    TaskCompleted,
    TaskStarted,
    WorkerModelSet,
    session_stream,
)
from events.projections import AnyRegistryEntry, Override, TaskRecord
from events.reads import read_task
from events.store import EventLog, EventRecord, Filter, StoreError, record_from
from orchestrator import history, view_pages, views
from orchestrator.api import InvalidTaskArgs, check_session_id
from orchestrator.config import OrchestratorConfig, load_config
from orchestrator.history import DiffRow, Flat, WhatIfRow
from orchestrator.processes import host_id, process_state
from orchestrator.reading import NO_WRITES, SessionReader
from orchestrator.ui.travel import Marker, Process, RegistryHistory, SessionHistory

READ_PAGE = 5000  # events folded per hold of the lock while catching up
KEPT_SESSIONS = 32  # session histories and view readers kept in memory
# A number in a query: ASCII digits only (`str.isdigit` also takes superscripts, which `int`
# refuses), and not so long that `int` refuses to read it. Anything else is passed on as
# text, for the view to refuse naming the filter.
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,30}")


def whole_number(text: str) -> int | None:
    """A query value as a whole number, or None when it is not one."""
    return int(text) if _WHOLE_NUMBER.fullmatch(text) else None


# Read by type, so a read after a position is a range of the log, not a walk of the stream.
SUMMARY_TYPES = tuple(
    t.type_name()
    for t in (SessionOpened, TaskStarted, TaskCompleted, WorkerModelSet, SessionForked)
)


class ReadOnlyLog(EventLog):
    """The store, opened for reading: an append raises, snapshots and leases are skipped."""

    def __init__(self, url: str | None = None) -> None:
        super().__init__(url, create=False)  # reading never creates: `NoStore` if absent

    def append_batches(self, batches: Sequence[tuple[str, Sequence[Event], int]]) -> list[int]:
        """Refused: the inspector appends nothing."""
        raise StoreError("the inspector is read-only: it appends nothing to the log")

    def save_snapshot(self, stream: str, version: int, state: dict[str, Any]) -> bool:
        """Skipped: looking leaves the store as it was (snapshots too)."""
        return False

    def hold_host_lease(self, host: str) -> None:
        """Skipped: the inspector runs no task, so it must not make this host look alive."""


@dataclass
class SessionSummary:
    """One row of the sessions page."""

    session_id: str
    started: datetime
    first_position: int
    last: datetime
    tasks: int = 0
    models: dict[str, int] = field(default_factory=dict)
    cost_usd: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0


# (worker, model) -> minute (epoch seconds // 60) -> [tasks, input, output, cost]
UsageBuckets = dict[tuple[str, str], dict[int, list[float]]]


@dataclass
class TravelState:
    """A session as of one position: what the time-travel panel shows."""

    session_id: str
    position: int
    index: int  # which stop of the slider
    overrides: dict[str, Override]
    tasks: list[TaskRecord]
    processes: list[AnyRegistryEntry]


class Inspector:
    """The inspector's reads of one store; safe to call from many threads."""

    def __init__(self, url: str | None, config: Any = None) -> None:
        self.log = ReadOnlyLog(url)
        self.url = self.log.url
        self.config: OrchestratorConfig = load_config(config)
        self.lock = threading.RLock()
        self.host = host_id()
        self.summaries: dict[str, SessionSummary] = {}
        self.usage: UsageBuckets = {}
        # From the newest checkpoint the writers saved (ADR-0014), not the registry's start.
        self.registry = RegistryHistory.from_store(self.log)
        checkpoints.share(self.log, self.registry)  # the views' registry reads use it too
        self._summary_position = 0
        self._registry_seen = self.registry.position  # the log read for registry events up to here
        self._histories: OrderedDict[str, SessionHistory] = OrderedDict()
        self._readers: OrderedDict[str, SessionReader] = OrderedDict()
        self.head = self.log.head()
        self._head_changed = threading.Condition()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    # --- the follower: one thread waits on the store for everyone ---------------------------

    def start(self) -> None:
        """Start following the log (first read of the summaries, then new events)."""
        self._follower = threading.Thread(target=self._follow, name="inspector", daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                while self.catch_up():  # the first read of a big log, a page at a time
                    if self._stop.is_set():
                        return
                head = self.log.head()
                if head != self.head:
                    with self._head_changed:
                        self.head = head
                        self._head_changed.notify_all()
                self.log.wait_for_events(head, timeout=1.0)
            except StoreError:
                self._stop.wait(1.0)  # a store that went away for a moment: look again

    def wait_for_head(self, after: int, timeout: float) -> int:
        """Block until the log's head passes `after` (or `timeout`); the head then."""
        with self._head_changed:
            self._head_changed.wait_for(lambda: self.head > after, timeout)
            return self.head

    @property
    def reading(self) -> str | None:
        """While the first read of a big log is under way: how far it has come."""
        if self._summary_position >= self.head:
            return None
        return f"reading the log: {self._summary_position:,} of {self.head:,} positions"

    def catch_up(self) -> bool:
        """Fold up to one page of new events into the summaries and the registry; True when
        more are waiting."""
        with self.lock:
            more = False
            read = 0
            for position, event in self.log.select(
                Filter(types=SUMMARY_TYPES), after=self._summary_position, limit=READ_PAGE
            ):
                self._summarise(position, event)
                self._summary_position = position
                read += 1
            if read == READ_PAGE:
                more = True
            else:
                self._summary_position = max(self._summary_position, self.head)
            return self._registry_catch_up(READ_PAGE) or more

    def _registry_catch_up(self, limit: int | None = None) -> bool:
        head = self.head
        read = 0
        for position, event in self.log.select(
            Filter(types=checkpoints.REGISTRY_TYPES), after=self._registry_seen, limit=limit
        ):
            self.registry.feed(position, event)
            self._registry_seen = position
            read += 1
        if read != limit:
            self._registry_seen = max(self._registry_seen, head)
        return read == limit

    def close(self) -> None:
        """Stop following and release the store."""
        self._stop.set()
        with self._head_changed:
            self._head_changed.notify_all()
        if self._follower is not None:
            self._follower.join(timeout=5)
        with self.lock:
            self._readers.clear()
            self.log.close()

    def _summarise(self, position: int, event: Event) -> None:
        sid = event.session_id
        row = self.summaries.get(sid)
        if row is None:
            row = self.summaries[sid] = SessionSummary(
                sid, event.timestamp, position, event.timestamp
            )
        row.last = max(row.last, event.timestamp)
        if isinstance(event, TaskStarted):
            row.tasks += 1
        elif isinstance(event, TaskCompleted) and event.model:
            row.models[event.model] = row.models.get(event.model, 0) + 1
            used = event.usage or {}
            tokens_in, tokens_out = (
                int(used.get("input_tokens") or 0),
                int(used.get("output_tokens") or 0),
            )
            cost = used.get("cost_usd")
            row.input_tokens += tokens_in
            row.output_tokens += tokens_out
            if cost is not None:
                row.cost_usd = (row.cost_usd or 0.0) + float(cost)
            key = (str(event.worker_id), event.model)
            minute = int(event.timestamp.timestamp()) // 60
            bucket = self.usage.setdefault(key, {}).setdefault(minute, [0, 0, 0, 0.0])
            bucket[0] += 1
            bucket[1] += tokens_in
            bucket[2] += tokens_out
            bucket[3] += float(cost or 0.0)

    # --- views, exactly as task_list answers them -------------------------------------------

    def reader(self, session_id: str) -> SessionReader:
        """The view context of a session (kept for the next request)."""
        with self.lock:
            found = self._readers.get(session_id)
            if found is None:
                check_session_id(session_id)
                found = SessionReader(self.config, self.log, session_id)
                self._readers[session_id] = found
                if len(self._readers) > KEPT_SESSIONS:
                    self._readers.popitem(last=False)
            self._readers.move_to_end(session_id)
            return found

    def view(self, name: str, filters: Mapping[str, Any], session_id: str = "cli") -> list[Any]:
        """`task_list(name, **filters)` as `session_id`'s orchestrator answers it, writing
        nothing."""
        with self.lock:
            return views.run(name, self.reader(session_id), NO_WRITES, **filters)

    @staticmethod
    def view_filters(name: str, raw: Mapping[str, str]) -> dict[str, Any]:
        """Query-string values as a view's filters: whole numbers for its number filters,
        an empty value for None; `session_id` names the session and is a filter only of
        the views that take it. Unknown views and filters pass through for `task_list` to
        refuse with its own message."""
        handler = views.VIEWS.get(name)
        params = inspect.signature(handler).parameters if handler else {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "session_id" and handler and key not in params:
                continue  # it chose the session the view is answered for
            hint = str(params[key].annotation) if key in params else ""
            if value == "" and "None" in hint:
                out[key] = None
            elif hint.startswith("int") and whole_number(value) is not None:
                out[key] = whole_number(value)
            else:
                out[key] = value
        return out

    # --- pages ------------------------------------------------------------------------------

    def history(self, session_id: str) -> SessionHistory:
        """A session's history, caught up with the log (its own events, through the index)."""
        with self.lock:
            found = self._histories.get(session_id)
            if found is None:
                found = self._histories[session_id] = SessionHistory(session_id)
                if len(self._histories) > KEPT_SESSIONS:
                    self._histories.popitem(last=False)
            self._histories.move_to_end(session_id)
            for position, event in self.log.select(
                Filter(session_id=session_id), after=found.position
            ):
                found.feed(position, event)
            return found

    def registry_now(self) -> RegistryHistory:
        """The registry, caught up with the log."""
        with self.lock:
            self._registry_catch_up()
            return self.registry

    def travel(self, session_id: str, index: int) -> TravelState:
        """The session as of its `index`-th position (clamped to its positions)."""
        with self.lock:
            past = self.history(session_id)
            if not past.stops:
                raise InvalidTaskArgs(f'Unknown session "{session_id}".' + self.known(session_id))
            index = max(0, min(index, len(past.stops) - 1))
            position = past.stops[index]
            registry = self.registry_now()
            used = {session_id}
            processes = [
                e
                for e in registry.at(position, checkpoints.registry_events(self.log))
                if used & {e.session_id, *e.sessions}
            ]
            return TravelState(
                session_id,
                position,
                index,
                past.overrides_at(position),
                past.tasks_at(position),
                processes,
            )

    def travel_diff(self, session_id: str, since: int, until: int) -> list[DiffRow]:
        """The `diff` view's rows between two stops of a session, for its overrides, tasks
        and the processes it used (from the checkpoints, not a replay)."""
        before, after = self.travel(session_id, since), self.travel(session_id, until)
        return history.diff_states(_flat(before), _flat(after))

    def task(self, task_id: str) -> tuple[TaskRecord, Any, list[Any]]:
        """A task's record, its `explain` chain and, for a worker task, the conversation
        its request carried and its reply (any session's)."""
        with self.lock:
            explained = self.view("explain", {"task_id": task_id})[0]
            found = read_task(self.log, task_id)  # explain found it: it was started
            assert found is not None
            record = found[0]
            turns = (
                self.view("conversation", {"task_id": task_id}) if record.kind == "worker" else []
            )
            return record, explained, turns

    def known(self, session_id: str) -> str:
        """ "Did you mean" among the sessions seen so far."""
        from orchestrator.config import did_you_mean

        return did_you_mean(session_id, list(self.summaries))

    def processes(self) -> list[tuple[Process, str]]:
        """Every process with its liveness as seen now (checked, never recorded)."""
        rows = []
        hosts: dict[str, str] = {}  # one look per host (on PostgreSQL, a connection each)
        for proc in self.registry_now().processes():
            e = proc.entry
            if not e.live:
                seen = ""
            elif getattr(e, "backend", None) == "agent":
                seen = "in its orchestrator"
            elif e.host == self.host:
                seen = process_state(e.pid, e.pid_started_at)
            else:
                if e.host not in hosts:
                    hosts[e.host] = "host alive" if self.log.host_alive(e.host) else "host gone"
                seen = hosts[e.host]
            rows.append((proc, seen))
        return rows

    def events(self, filters: Mapping[str, Any]) -> list[EventRecord]:
        """A page of the `events` view."""
        return self.view("events", filters)

    def whatif(
        self,
        config: OrchestratorConfig,
        session_id: str | None,
        since: int = 0,
        limit: int | None = None,
    ) -> list[WhatIfRow]:
        """The `whatif` view's rows: a page of them with `limit` (decisions after `since`);
        else every one, and for one session its own events are read (through the index)
        rather than the whole log, which gives the same rows."""
        if limit is not None:
            filters = {"config": config, "session_id": session_id, "since": since, "limit": limit}
            return self.view("whatif", filters)
        if session_id is None:
            return self.view("whatif", {"config": config})
        with self.lock:
            only = _SessionLog(self.log, session_id)
            return history.whatif(only, config, os.environ, session_id)  # type: ignore[arg-type]

    def next_since(self, name: str, filters: Mapping[str, Any], rows: list[Any]) -> int | None:
        """Where the next page of a paged view starts (`since`), None after the last."""
        with self.lock:
            return view_pages.next_since(self.log, name, filters, rows)

    def event_types(self) -> list[str]:
        """Every event type name (for the events page's filter)."""
        return sorted(EVENT_TYPES)

    def records(self, where: Filter, after: int, until: int) -> list[EventRecord]:
        """Event records after a position up to another (the live stream)."""
        with self.lock:
            return [record_from(*e) for e in self.log.select(where, after=after, until=until)]


class _SessionLog:
    """One session's events, read through the index, as `history.whatif` reads a log (a
    what-if of one session needs nothing from other streams)."""

    def __init__(self, log: EventLog, session_id: str) -> None:
        self._log, self._session = log, session_id

    def read_log(self, *args: Any, **kwargs: Any) -> Iterator[tuple[int, Event]]:
        return self._log.select(Filter(stream=session_stream(self._session)))


def _flat(state: TravelState) -> Flat:
    flat: Flat = {}
    for worker_id, override in state.overrides.items():
        flat[("override", f"{state.session_id}/{worker_id}")] = override.model_dump(mode="json")
    for entry in state.processes:
        flat[("registry", entry.instance_id)] = entry.model_dump(mode="json")
    for task in state.tasks:
        flat[("task", task.task_id)] = task.model_dump(mode="json")
    return flat


def markers_by_kind(markers: Sequence[Marker]) -> dict[str, int]:
    """How many markers of each kind (the timeline's legend)."""
    counts: dict[str, int] = {}
    for m in markers:
        counts[m.kind] = counts.get(m.kind, 0) + 1
    return counts
