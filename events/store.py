"""The one event log, stored through the `eventsourcing` library's recorders.

Streams are named (`session:<id>`, `registry`, `memory`, `models`, `config`). Appending to a
stream at an expected version is the only write; a concurrent writer that got there first
makes it raise `StreamConflict`, which is how decisions across threads, processes and hosts
are serialised. Every appended event also gets a position in one total order (the
notification log), which is what `events`, `replay` and `explain` read.

Each event also gets a row in an index (`event_index`: position, stream, type, session,
worker, task) written in the same transaction, so a filtered read (one task, one worker,
one type) costs what it returns, not the log's length (ADR-0007).

It stays one module over 400 lines because `EventLog`, the recorders that write the index in
the same transaction, and the connection helpers (URL, schema lock, store marker) are one
unit: only `events.pg` shares a few of its index helpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import orjson
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.popo import POPOApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor
from eventsourcing.utils import Environment
from pydantic import BaseModel, ValidationError

from events.catalogue import Event, event_from_json
from events.logs import get_logger
from orchestrator.errors import OrchestratorError

_log = get_logger("orchestrator.events")
_log_target = logging.getLogger("orchestrator.events")


class StoreError(OrchestratorError, RuntimeError):
    """The store URL is bad or the store cannot be reached; the message says which."""


class StoreMoved(StoreError):
    """The SQLite file this log was opened on was deleted or replaced: nothing is written
    anywhere else (a write would land in a file nobody else can see)."""


class NoStore(StoreError):
    """Opened for reading (`create=False`) where there is no orchestrator store."""


class StreamConflict(OrchestratorError, RuntimeError):
    """Another writer appended to the stream first: reload and decide again."""


# What a store may raise below us; each becomes one `StoreError` line. psycopg's errors join
# once psycopg is loaded (only a PostgreSQL store loads it, and only it can raise them).
_BASE_FAILURES: tuple[type[BaseException], ...] = (PersistenceError, OSError, sqlite3.Error)


def _store_failures() -> tuple[type[BaseException], ...]:
    psycopg = sys.modules.get("psycopg")
    return _BASE_FAILURES if psycopg is None else (*_BASE_FAILURES, psycopg.Error)


MARKER_TABLE = "orchestrator_store"
APP_NAME = "orchestrator"  # the eventsourcing application: PostgreSQL names its tables by it
STORE_FORMAT = 1
OUR_STREAMS = ("session:", "registry", "memory", "models", "config")
INDEX_TABLE = "event_index"
# (stream, type, session_id, worker_id, task_id) of one event: its index row, less position
IndexRow = tuple[str, str, str | None, str | None, str | None]
DEFAULT_TIMEOUT = 30
POLL_EVERY = 0.3  # seconds between looks at a store that cannot push (events --follow)


@contextmanager
def _guarded(url: str, doing: str) -> Iterator[None]:
    try:
        yield
    except IntegrityError:
        raise
    except _store_failures() as exc:
        raise StoreError(f"store {_redact(url)}: {doing} failed: {_first_line(exc)}") from None


class EventRecord(BaseModel):
    """One event as it sits in the log (the `events` view)."""

    position: int
    type: str
    timestamp: datetime
    session_id: str | None
    worker_id: str | None
    task_id: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class StreamEvent:
    """An event read back from one stream: its version there and the event."""

    version: int
    event: Event


def default_store_url() -> str:
    """`ORCHESTRATOR_STORE`, else the per-user SQLite file every orchestrator process shares
    (its directory is made when a store is first created there, not here)."""
    env = os.environ.get("ORCHESTRATOR_STORE")
    if env:
        return env
    return f"sqlite:///{state_path() / 'events.db'}"  # an absolute path: four slashes


def state_path() -> Path:
    """Where the user's state directory for this project is (it may not exist yet)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "orchestrator"


def state_dir() -> Path:
    """The user's state directory for this project, created user-only."""
    path = state_path()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _encode(event: Event) -> bytes:
    return event.model_dump_json().encode()


def _decode(topic: str, state: bytes, where: int | str) -> Event:
    """Decode one stored event; `where` is its position (an int) or the text naming it,
    made into words only when the event cannot be read (a replay builds no string per
    event)."""
    try:
        return event_from_json(topic, state)
    except KeyError:
        raise StoreError(
            f"the event at {_where(where)} has type {topic!r}, which this version does not "
            "know (was it written by a newer orchestrator?)"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise StoreError(
            f"the event at {_where(where)} ({topic}) does not match this version's schema: "
            f"{field}: {first['msg']} (was it written by a newer orchestrator?)"
        ) from None


def _where(where: int | str) -> str:
    return f"position {where}" if isinstance(where, int) else where


_IDS = frozenset({"session_id", "worker_id", "task_id", "timestamp"})


def record_from(position: int, event: Event) -> EventRecord:
    """Build the public record (the `events` view's row) of a stored event."""
    return EventRecord(
        position=position,
        type=event.type_name(),
        timestamp=event.timestamp,
        session_id=event.session_id,
        worker_id=event.worker_id,
        task_id=event.task_id,
        data=event.model_dump(mode="json", exclude=set(_IDS)),
    )


class EventLog:
    """An opened store: streams with optimistic concurrency, one ordered log, snapshots."""

    def __init__(self, url: str | None = None, create: bool = True) -> None:
        """Open the store at `url` (default: `default_store_url()`). With `create=False`
        (reading: the CLI's inspection commands, a read-only inspector) a URL where there is
        no orchestrator store raises `NoStore` and nothing is made there: no file, table or
        schema. Nor is anything made or written where a store is: a store made before the
        event index existed, not indexed yet, is refused until a writer opens it."""
        default = url is None and not os.environ.get("ORCHESTRATOR_STORE")
        if default and create:
            state_dir()  # the per-user directory is ours to make; a URL's directory is not
        self.url = url or default_store_url()
        if default and not create and not state_path().is_dir():
            raise NoStore(f"no orchestrator store at {self.url}")  # none written here yet
        self.kind, env = _environment(self.url)
        env["CREATE_TABLE"] = "y" if create else "n"  # the library's DDL is a writer's
        self._env = env
        self._leases: dict[str, Any] = {}  # host -> psycopg connection holding its lease
        self._listener: Any = None  # the psycopg connection LISTENing, once needed
        try:
            if not create:
                _require_store(self.url, env)  # which also refuses a foreign store
            elif self.kind == "sqlite":
                _create_private_file(self.url, Path(env["SQLITE_DBNAME"]))
                # Read-only, so also before the lock: a foreign file is refused before
                # anything, even the lock file, is made beside it. A concurrent opener's
                # half-made store passes (SQLite makes the events and index tables in one
                # transaction); on PostgreSQL, where it would not, the check is locked only.
                _check_marker(self.url, env)
            with _schema_lock(env, create):
                _check_marker(self.url, env)
                self._factory = InfrastructureFactory.construct(Environment(APP_NAME, env))
                self._recorder: ApplicationRecorder = (
                    _IndexedPOPORecorder()
                    if self.kind == "memory"
                    else self._factory.application_recorder()
                )
                self._snapshots: AggregateRecorder = self._factory.aggregate_recorder("snapshots")
                self._index = _index_of(self._recorder)
                if create:
                    _write_marker(env)  # DDL too: under the same lock
                    self._index.backfill()  # a store written before the index existed
                elif not self._index.caught_up(_tables(env)):
                    raise StoreError(
                        f"store {_redact(self.url)} was written before the event index existed "
                        "and is not indexed yet; open it once with a command that writes "
                        "(run, set-model, reset-model, fork), which indexes it, then read again"
                    )
            self._recorder.max_notification_id()  # fail now, not at the first real read
            self._file_id = self._current_file_id()
        except BaseException as exc:
            factory = getattr(self, "_factory", None)
            if factory is not None:
                factory.close()  # nobody gets this log to close
            if isinstance(exc, _store_failures()):
                raise StoreError(
                    f"cannot open store {_redact(self.url)}: {_first_line(exc)}"
                ) from exc
            raise

    def _current_file_id(self) -> tuple[int, int] | None:
        """(device, inode) of the SQLite file (None for other stores, or when it is gone)."""
        if self.kind != "sqlite":
            return None
        try:
            found = os.stat(self._env["SQLITE_DBNAME"])
        except FileNotFoundError:
            return None
        return (found.st_dev, found.st_ino)

    def check_in_place(self) -> None:
        """Raise `StoreMoved` when the SQLite file opened is no longer the one at its path."""
        if self.kind == "sqlite" and self._current_file_id() != self._file_id:
            raise StoreMoved(
                f"store {_redact(self.url)}: the file was deleted or replaced while this "
                "orchestrator had it open; nothing was written. Reopen the store."
            )

    # --- writing ---------------------------------------------------------------------------

    def append(self, stream: str, events: Sequence[Event], expected_version: int) -> list[int]:
        """Append events after `expected_version` of `stream`; returns their log positions.

        Raises `StreamConflict` when another writer has already used those versions.
        """
        return self.append_batches([(stream, events, expected_version)])

    def append_batches(self, batches: Sequence[tuple[str, Sequence[Event], int]]) -> list[int]:
        """Append to several streams in one transaction: all land, or `StreamConflict`."""
        stored = [
            StoredEvent(
                originator_id=stream,
                originator_version=expected_version + i + 1,
                topic=event.type_name(),
                state=_encode(event),
            )
            for stream, events, expected_version in batches
            for i, event in enumerate(events)
        ]
        index: list[IndexRow] = [
            (stream, event.type_name(), event.session_id, event.worker_id, event.task_id)
            for stream, events, _ in batches
            for event in events
        ]
        self.check_in_place()  # one stat: a write never lands in a file nobody can see
        try:
            with _guarded(self.url, "writing"):
                positions = self._recorder.insert_events(stored, index=index)
        except IntegrityError as exc:
            streams = ", ".join(b[0] for b in batches)
            raise StreamConflict(f"another writer appended to {streams} first") from exc
        result = list(positions or [])
        if _log_target.isEnabledFor(logging.INFO):  # rendering costs more than the append
            appended = [(stream, e) for stream, events, _ in batches for e in events]
            for position, (stream, event) in zip(result, appended, strict=False):
                _log.info(event.type_name(), position=position, stream=stream, **_log_fields(event))
        return result

    # --- reading ---------------------------------------------------------------------------

    def read_stream(self, stream: str, after: int = 0) -> list[StreamEvent]:
        """Events of one stream with versions greater than `after`, oldest first."""
        with _guarded(self.url, "reading"):
            rows = self._recorder.select_events(stream, gt=after or None)
        return [
            StreamEvent(v, _decode(s.topic, s.state, f"{stream} version {v}"))
            for s in rows
            for v in (s.originator_version,)
        ]

    def stream_version(self, stream: str) -> int:
        """The newest version of a stream (0 when it has no events)."""
        with _guarded(self.url, "reading"):
            rows = self._recorder.select_events(stream, desc=True, limit=1)
        return rows[0].originator_version if rows else 0

    def read_log(
        self,
        after: int = 0,
        until: int | None = None,
        types: Sequence[str] = (),
        page: int = 1000,
    ) -> Iterator[tuple[int, Event]]:
        """(position, event) of every event after `after` up to `until`, in log order."""
        return self.select(Filter(types=tuple(types)), after, until, page=page)

    def records(
        self, after: int = 0, until: int | None = None, types: Sequence[str] = ()
    ) -> list[EventRecord]:
        """The public `EventRecord`s of `read_log`."""
        return [record_from(p, e) for p, e in self.read_log(after, until, types)]

    def select(
        self,
        where: Filter | None = None,
        after: int = 0,
        until: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        page: int = 500,
    ) -> Iterator[tuple[int, Event]]:
        """(position, event) of the events that match `where`, through the index: the store
        does the filtering and rows stream in pages, so the cost is what matches."""
        where = where or Filter()
        left = limit
        while left is None or left > 0:
            size = page if left is None else min(page, left)
            with _guarded(self.url, "reading"):
                batch = self._index.select(where, after, until, size, newest_first)
            try:
                for position, topic, state in batch:
                    yield position, event_from_json(topic, state)
            except (KeyError, ValidationError):
                _decode(topic, state, position)  # raises, naming the event
                raise
            if len(batch) < size:
                return
            if left is not None:
                left -= len(batch)
            if newest_first:
                until = batch[-1][0] - 1
            else:
                after = batch[-1][0]

    def head(self) -> int:
        """The position of the newest event (0 for an empty log)."""
        with _guarded(self.url, "reading"):
            return self._recorder.max_notification_id() or 0

    @property
    def notify_channel(self) -> str | None:
        """The PostgreSQL channel every append to this store NOTIFYs (one per schema), for
        a follower to LISTEN on; None for stores that cannot push (SQLite, memory)."""
        if self.kind != "postgresql":
            return None
        return str(self._recorder.channel_name)  # type: ignore[attr-defined]

    def wait_for_events(self, after: int, timeout: float) -> bool:
        """Block until an event lands after position `after`, or `timeout` seconds pass;
        True if one did. PostgreSQL pushes (LISTEN on `notify_channel`, which only this
        store's appends notify); SQLite files and the memory store are polled."""
        if self.head() > after:
            return True
        if self.kind != "postgresql":
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                time.sleep(min(POLL_EVERY, max(0.0, deadline - time.monotonic())))
                if self.head() > after:
                    return True
            return False
        with _guarded(self.url, "listening"):
            if self._listener is None:
                from psycopg import sql

                self._listener = _connect(self._env)
                channel = sql.Identifier(str(self.notify_channel))
                self._listener.execute(sql.SQL("LISTEN {}").format(channel))
                if self.head() > after:  # landed before we listened
                    return True
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                break
        return self.head() > after

    # --- snapshots -------------------------------------------------------------------------

    def load_snapshot(
        self, stream: str, at_most: int | None = None
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest snapshot of a stream's state (with `at_most`: the newest at or before
        that version): (version, state). One read of the snapshot table's key."""
        with _guarded(self.url, "reading"):
            rows = self._snapshots.select_events(stream, lte=at_most, desc=True, limit=1)
        if not rows:
            return None
        return rows[0].originator_version, json.loads(rows[0].state)

    def save_snapshot(self, stream: str, version: int, state: dict[str, Any]) -> bool:
        """Store a stream's folded state at `version` (idempotent across writers). True
        when the store has it now (a read-only log keeps nothing, and says so)."""
        self.check_in_place()
        try:
            with _guarded(self.url, "writing a snapshot"):
                self._snapshots.insert_events(
                    [StoredEvent(stream, version, "snapshot", json.dumps(state).encode())]
                )
        except IntegrityError:
            pass  # another process saved the same snapshot: same fold, same state
        return True

    def private_dir(self, name: str) -> Path:
        """A user-only directory that belongs to this store: beside a SQLite file
        (`events.db.workers/`), else under the state directory, named after the store."""
        if self.kind == "sqlite":
            db = Path(self._env["SQLITE_DBNAME"])
            path = db.with_name(f"{db.name}.{name}")
        else:
            digest = hashlib.sha256(_redact(self.url).encode()).hexdigest()[:12]
            (state_dir() / name).mkdir(mode=0o700, exist_ok=True)
            path = state_dir() / name / f"{self.kind}-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    # --- host leases ------------------------------------------------------------------------

    def hold_host_lease(self, host: str) -> None:
        """Declare `host` alive for as long as this log is open. On PostgreSQL that is a
        shared session-level advisory lock on the host's key, released by the server when
        the connection dies with its process; nothing is appended to the log. Other stores
        are on one machine, where a process's own pid says whether it lives."""
        if self._env.get("PERSISTENCE_MODULE") != "eventsourcing.postgres" or host in self._leases:
            return
        with _guarded(self.url, "taking the host lease"):
            conn = _connect(self._env)
            try:
                conn.execute("SELECT pg_advisory_lock_shared(%s)", (_host_key(host),))
            except BaseException:
                conn.close()
                raise
        self._leases[host] = conn

    def host_alive(self, host: str) -> bool:
        """Does any orchestrator process of `host` still hold its lease? (True where the
        store cannot tell: every writer of a SQLite file is on this machine.)"""
        if self._env.get("PERSISTENCE_MODULE") != "eventsourcing.postgres":
            return True
        with _connect(self._env) as conn:
            key = _host_key(host)
            free = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if free and free[0]:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                return False
            return True

    def close(self) -> None:
        """Release connections (and with them this process's host leases)."""
        for conn in self._leases.values():
            conn.close()
        self._leases.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._factory.close()


@dataclass(frozen=True)
class Filter:
    """What an indexed read selects; every given field must match (None: any)."""

    session_id: str | None = None
    worker_id: str | None = None
    task_id: str | None = None
    stream: str | None = None
    types: tuple[str, ...] = ()
    # Any of these tasks: a conversation's turns in one read. A few hundred ids per select
    # at most, to stay under every driver's limit on parameters.
    task_ids: tuple[str, ...] = ()

    def matches(self, row: IndexRow) -> bool:
        """Does an index row pass this filter? (The memory store's way; SQL elsewhere.)"""
        stream, topic, session_id, worker_id, task_id = row
        return (
            self.session_id in (None, session_id)
            and self.worker_id in (None, worker_id)
            and self.task_id in (None, task_id)
            and (not self.task_ids or task_id in self.task_ids)
            and self.stream in (None, stream)
            and (not self.types or topic in self.types)
        )


Selected = list[tuple[int, str, bytes]]


class _Index:
    """The event index of one store: written with the events, read by `EventLog.select`."""

    def select(
        self, where: Filter, after: int, until: int | None, limit: int, newest_first: bool
    ) -> Selected:
        raise NotImplementedError

    def backfill(self) -> None:
        """Index events written before the index existed (a no-op once caught up)."""

    def caught_up(self, tables: set[str] | None) -> bool:
        """Does the index have every event? (`tables`: the store's, to look in.)"""
        return True


class _SQLIndex(_Index):
    """The index table of SQLite and PostgreSQL; `mark` is the driver's placeholder."""

    def __init__(self, recorder: ApplicationRecorder, prefix: str, mark: str) -> None:
        self.recorder = recorder
        self.prefix = prefix
        self.mark = mark
        self.rowid = "rowid" if mark == "?" else "notification_id"
        self.events = str(recorder.events_table_name)  # type: ignore[attr-defined]
        # Plain tuples for a read: building a named row per event was a sixth of a replay.
        self.tuple_rows: Any = None
        if mark == "%s":
            from psycopg.rows import tuple_row

            self.tuple_rows = tuple_row

    def _transaction(self, commit: bool) -> Any:
        return self.recorder.datastore.transaction(commit=commit)  # type: ignore[attr-defined]

    def select(
        self, where: Filter, after: int, until: int | None, limit: int, newest_first: bool
    ) -> Selected:
        m, events = self.mark, f"{self.prefix}{self.events}"
        ids = {
            column: getattr(where, column)
            for column in ("session_id", "worker_id", "task_id", "stream")
            if getattr(where, column) is not None
        }
        if ids or where.task_ids:
            # Through the index. `+i.position` keeps SQLite off the position index for the
            # range: the id or stream index, paired with the position, gives both the filter
            # and the order.
            position, topic, order_by = "+i.position", "i.topic", "i.position"
            source = f"{self.prefix}{INDEX_TABLE} i JOIN {events} e ON e.{self.rowid} = i.position"
            columns = f"e.{self.rowid} AS position, e.topic AS topic, e.state AS state"
        else:  # no id or stream filter: the events table alone, in position order
            position = order_by = self.rowid
            topic, source = "topic", events
            columns = f"{self.rowid} AS position, topic, state"
        clauses = [f"{position} > {m}"]
        params: list[Any] = [after]
        if until is not None:
            clauses.append(f"{position} <= {m}")
            params.append(until)
        for column, value in ids.items():
            clauses.append(f"i.{column} = {m}")
            params.append(value)
        if where.task_ids:  # one index probe per id, then ordered by position
            clauses.append(f"i.task_id IN ({', '.join(m for _ in where.task_ids)})")
            params.extend(where.task_ids)
            # Two IN lists look alike to SQLite's planner, which may take the type index
            # (every task's events of that type): `|| ''` keeps it on the task ids.
            topic = "(i.topic || '')"
        if where.types:
            clauses.append(f"{topic} IN ({', '.join(m for _ in where.types)})")
            params.extend(where.types)
        order = "DESC" if newest_first else "ASC"
        sql = (
            f"SELECT {columns} FROM {source} WHERE {' AND '.join(clauses)} "
            f"ORDER BY {order_by} {order} LIMIT {m}"
        )
        with self._transaction(commit=False) as c:
            # The driver's own cursor (SQLite's is wrapped) returns plain tuples: this
            # cursor's rows only, the library's reads keep their named rows.
            getattr(c, "sqlite_cursor", c).row_factory = self.tuple_rows
            c.execute(sql, [*params, limit])
            rows: Selected = c.fetchall()
            return rows

    def _heads(self) -> tuple[int, int]:
        """The newest position indexed and the newest event's, in one snapshot."""
        with self._transaction(commit=False) as c:
            c.execute(
                f"SELECT (SELECT max({self.rowid}) FROM {self.prefix}{self.events}) AS events, "
                f"(SELECT max(position) FROM {self.prefix}{INDEX_TABLE}) AS indexed"
            )
            row = c.fetchone()
        return row["indexed"] or 0, row["events"] or 0

    def caught_up(self, tables: set[str] | None) -> bool:
        if tables is not None and INDEX_TABLE not in tables:
            return False
        indexed, head = self._heads()
        return indexed >= head  # rows land with their events, so only an old store lags

    def backfill(self) -> None:
        start, head = self._heads()
        while start < head:
            batch = self.recorder.select_notifications(start, 1000, inclusive_of_start=False)
            if not batch:
                return
            with self._transaction(commit=True) as c:
                c.executemany(
                    _insert_index_sql(self.prefix, self.mark, ignore=True),
                    [(n.id, *_row_of(n)) for n in batch],
                )
            start = batch[-1].id


def _insert_index_sql(prefix: str, mark: str, ignore: bool = False) -> str:
    marks = ", ".join(mark for _ in range(6))
    sql = f"INSERT INTO {prefix}{INDEX_TABLE} VALUES ({marks})"
    if ignore:
        sql += " ON CONFLICT (position) DO NOTHING"
    return sql


def _index_ddl(prefix: str, position_type: str) -> list[str]:
    table = f"{prefix}{INDEX_TABLE}"
    ddl = [
        f"CREATE TABLE IF NOT EXISTS {table} (position {position_type} PRIMARY KEY, "
        "stream TEXT NOT NULL, topic TEXT NOT NULL, session_id TEXT, worker_id TEXT, "
        "task_id TEXT)"
    ]
    for column in ("session_id", "worker_id", "task_id", "stream", "topic"):
        ddl.append(
            f"CREATE INDEX IF NOT EXISTS {INDEX_TABLE}_{column} ON {table} ({column}, position)"
        )
    return ddl


def _index_rows(
    stored: Sequence[StoredEvent], positions: Sequence[int] | None, kwargs: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """The index rows of events being inserted: given by `EventLog.append_batches`, else
    (a writer that is not us, an old test) read from the events themselves."""
    rows: list[IndexRow] = kwargs.get("index") or [_row_of(s) for s in stored]
    return [(p, *row) for p, row in zip(positions or [], rows, strict=True)]


def _row_of(s: StoredEvent) -> IndexRow:
    data = orjson.loads(s.state)
    ids = (data.get("session_id"), data.get("worker_id"), data.get("task_id"))
    return (str(s.originator_id), s.topic, *ids)


class IndexedSQLiteRecorder(SQLiteApplicationRecorder):
    """SQLite's recorder, writing each event's index row in the events' transaction."""

    def construct_create_table_statements(self) -> list[str]:
        """The events table, then the index table and its indexes."""
        return [*super().construct_create_table_statements(), *_index_ddl("", "INTEGER")]

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        positions = super()._insert_events(c, stored_events, **kwargs)
        rows = _index_rows(stored_events, positions, kwargs)
        c.executemany(_insert_index_sql("", "?"), rows)
        return positions


class _IndexedPOPORecorder(POPOApplicationRecorder):
    """The memory store's recorder, keeping its index rows in a list beside the events."""

    def __init__(self) -> None:
        super().__init__()
        self.index_rows: list[IndexRow] = []

    def select_events(
        self,
        originator_id: Any,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        """A stream's events by version, costing what it returns: versions are contiguous
        from 1, so the range is known (the library's version walks the whole stream, which
        made every op slower the longer its session)."""
        with self._database_lock:
            index = self._stored_events_index[str(originator_id)]
            low, high = (gt or 0) + 1, min(len(index), lte if lte is not None else len(index))
            versions = range(high, low - 1, -1) if desc else range(low, high + 1)
            if limit is not None:
                versions = versions[:limit]
            return [self._stored_events[index[v]] for v in versions]

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        with self._database_lock:  # reentrant: the events and their rows land together
            positions = super().insert_events(stored_events, **kwargs)
            self.index_rows.extend(r[1:] for r in _index_rows(stored_events, positions, kwargs))
        return positions


class _MemoryIndex(_Index):
    def __init__(self, recorder: _IndexedPOPORecorder) -> None:
        self.recorder = recorder

    def select(
        self, where: Filter, after: int, until: int | None, limit: int, newest_first: bool
    ) -> Selected:
        r = self.recorder
        with r._database_lock:
            last = len(r.index_rows) if until is None else min(until, len(r.index_rows))
            span = range(last, after, -1) if newest_first else range(after + 1, last + 1)
            found: Selected = []
            for position in span:
                if where.matches(r.index_rows[position - 1]):
                    s = r._stored_events[position - 1]
                    found.append((position, s.topic, s.state))
                    if len(found) == limit:
                        break
            return found


def _index_of(recorder: ApplicationRecorder) -> _Index:
    if isinstance(recorder, _IndexedPOPORecorder):
        return _MemoryIndex(recorder)
    if isinstance(recorder, IndexedSQLiteRecorder):
        return _SQLIndex(recorder, "", "?")
    prefix = getattr(recorder, "index_prefix", None)  # events.pg.IndexedPostgresRecorder
    if prefix is not None:
        return _SQLIndex(recorder, prefix, "%s")
    raise TypeError(f"no event index for {type(recorder).__name__}")


def _log_fields(event: Event) -> dict[str, Any]:
    data = event.model_dump(mode="json", exclude={"timestamp"})
    # Prompts and replies can be long; the log line is for following along, the store has all.
    for key in ("response", "args", "result"):
        if key in data and data[key] is not None:
            data[key] = "..."
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def _environment(url: str) -> tuple[str, dict[str, str]]:
    if url == "memory":
        return "memory", {"PERSISTENCE_MODULE": "eventsourcing.popo"}
    if url.startswith("sqlite:///"):
        # As SQLAlchemy reads them: sqlite:///relative.db is relative to the working
        # directory, sqlite:////abs.db (four slashes) is absolute.
        rest, _, query = url[len("sqlite:///") :].partition("?")
        timeout = _timeout(url, parse_qs(query))
        path = Path(unquote(rest))
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.parent.is_dir():
            raise StoreError(
                f"cannot open store {url}: directory {path.parent} does not exist (create it first)"
            )
        return "sqlite", {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(path),
            "SQLITE_LOCK_TIMEOUT": str(timeout),
            "ORIGINATOR_ID_TYPE": "text",
            "CREATE_TABLE": "y",
            "APPLICATION_RECORDER_TOPIC": "events.store:IndexedSQLiteRecorder",
        }
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", _postgres_env(url)
    raise StoreError(
        f"bad store URL {url!r}: expected memory, sqlite:///relative.db, sqlite:////abs.db "
        "or postgresql://user@host:port/db"
    )


def _create_private_file(url: str, path: Path) -> None:
    """Make a new SQLite file user-only; an existing one is left unopened: closing any
    descriptor of the file drops every POSIX lock this process holds on it, SQLite's too,
    and another process then takes the store for unused and removes its WAL under our
    connections (their writes, and others', are lost)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot open store {url}: {exc.strerror}") from exc


# Any fixed 64-bit number: all orchestrator processes take the same advisory lock.
_DDL_LOCK_KEY = 0x6F72636865737472


@contextmanager
def _schema_lock(env: dict[str, str], create: bool = True) -> Iterator[None]:
    """Let one opener at a time create the tables and the marker. On PostgreSQL an
    advisory lock (concurrent first-use DDL otherwise fails with "tuple concurrently
    updated"); on SQLite an exclusive lock on `<file>-lock` beside the database (a WAL
    transaction that read the schema before another opener committed its DDL cannot write,
    and fails at once with "database is locked" instead of waiting). Memory needs nothing.
    A reader (`create` False) makes nothing: on PostgreSQL it waits for a creator under the
    lock (whose DDL is not one transaction) but creates no schema; SQLite, whose tables come
    in one transaction, it does not lock, so no lock file is made beside the database."""
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite" and not create:
        yield
        return
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        with _file_lock(Path(env["SQLITE_DBNAME"] + "-lock")):
            yield
        return
    if env["PERSISTENCE_MODULE"] != "eventsourcing.postgres":
        yield
        return
    from psycopg import sql

    with _connect(env) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_DDL_LOCK_KEY,))
        try:
            if create and "POSTGRES_SCHEMA" in env:
                schema = sql.Identifier(env["POSTGRES_SCHEMA"])
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_DDL_LOCK_KEY,))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created user-only), waiting for other holders."""
    import fcntl

    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _timeout(url: str, query: dict[str, list[str]]) -> int:
    """`?timeout=N` of a store URL: seconds a call may wait for a lock (1-600, default 30)."""
    raw = query.get("timeout", [str(DEFAULT_TIMEOUT)])[0]
    if not raw.isdigit() or not 1 <= int(raw) <= 600:
        raise StoreError(f"bad store URL {_redact(url)!r}: timeout must be 1-600 seconds")
    return int(raw)


def _tables(env: dict[str, str], read_only: bool = False) -> set[str] | None:
    """The tables already in the store (None for the memory store). `read_only`: a SQLite
    file is opened read-only, so a missing one is an error rather than made."""
    module = env["PERSISTENCE_MODULE"]
    if module == "eventsourcing.sqlite":
        db = env["SQLITE_DBNAME"]
        if read_only:
            db = f"{Path(db).as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(db, timeout=5, uri=read_only)) as conn:
            found = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {r[0] for r in found}
    if module == "eventsourcing.postgres":
        with _connect(env) as conn:
            rows = conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (env.get("POSTGRES_SCHEMA", "public"),),
            ).fetchall()
            return {r[0] for r in rows}
    return None


def _require_store(url: str, env: dict[str, str]) -> None:
    """Raise `NoStore` unless an orchestrator store is at `url`, looking without making
    anything: a SQLite file is not created (nor opened for writing), a PostgreSQL schema
    is only queried. A foreign store is refused as when creating."""
    if env["PERSISTENCE_MODULE"] == "eventsourcing.popo":
        return  # a memory store is this process's own: there is nothing to make elsewhere
    if (
        env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"
        and not Path(env["SQLITE_DBNAME"]).is_file()
    ):
        raise NoStore(f"no orchestrator store at {_redact(url)}")
    tables = _tables(env, read_only=True)
    if not tables:
        raise NoStore(f"no orchestrator store at {_redact(url)}")
    _check_marker(url, env, tables)
    if not {_events_table(env), _events_table(env, "snapshots")} <= tables:
        # Being made: a writer makes the events (and index), snapshot and marker tables in
        # transactions of their own, and a SQLite reader takes no lock to wait for them.
        raise NoStore(f"no orchestrator store at {_redact(url)}")


def _check_marker(url: str, env: dict[str, str], tables: set[str] | None = None) -> None:
    """Refuse a store someone else made, rather than read it as empty (ADR-0006).
    `tables`: the store's tables, when the caller has just read them."""
    tables = _tables(env) if tables is None else tables
    if not tables or MARKER_TABLE in tables:
        return
    if _events_table(env) in tables and _only_our_streams(env):
        return  # made before the marker existed: adopted, and marked after opening
    raise StoreError(
        f"cannot open store {_redact(url)}: it is not an orchestrator store (it has tables "
        f"{', '.join(sorted(tables)[:5])} but no {MARKER_TABLE}); refusing to read or change it"
    )


def _events_table(env: dict[str, str], kind: str = "events") -> str:
    """The events (or snapshots) table's name: SQLite's recorder keeps the library's
    default, PostgreSQL's is named after the application."""
    sqlite = env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"
    return f"stored_{kind}" if sqlite else f"{APP_NAME}_{kind}"


def _only_our_streams(env: dict[str, str]) -> bool:
    sql_ = "SELECT DISTINCT originator_id FROM {}" + _events_table(env) + " LIMIT 1000"
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        with contextlib.closing(sqlite3.connect(env["SQLITE_DBNAME"], timeout=5)) as conn:
            ids = [r[0] for r in conn.execute(sql_.format(""))]
    else:
        schema = env.get("POSTGRES_SCHEMA", "public")
        with _connect(env) as conn:
            ids = [r[0] for r in conn.execute(sql_.format(f'"{schema}".'))]
    return all(str(i).startswith(OUR_STREAMS) for i in ids)


def _write_marker(env: dict[str, str]) -> None:
    ddl = "CREATE TABLE IF NOT EXISTS {}orchestrator_store (format INTEGER NOT NULL)"
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        with contextlib.closing(sqlite3.connect(env["SQLITE_DBNAME"], timeout=30)) as conn:
            if (
                conn.execute(
                    f"SELECT count(*) FROM sqlite_master WHERE name = '{MARKER_TABLE}'"
                ).fetchone()[0]
                == 0
            ):
                conn.execute(ddl.format(""))
                conn.execute(f"INSERT INTO {MARKER_TABLE} VALUES ({STORE_FORMAT})")
                conn.commit()
    elif env["PERSISTENCE_MODULE"] == "eventsourcing.postgres":
        schema = env.get("POSTGRES_SCHEMA", "public")
        with _connect(env) as conn:
            conn.execute(ddl.format(f'"{schema}".'))


def _connect(env: dict[str, str]) -> Any:
    import psycopg

    return psycopg.connect(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=int(env["POSTGRES_PORT"]),
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"] or None,
        connect_timeout=int(env["POSTGRES_CONNECT_TIMEOUT"]),
        autocommit=True,
    )


def _host_key(host: str) -> int:
    """The advisory-lock key of a host's lease (a signed 64-bit digest of its name)."""
    digest = hashlib.sha256(b"orchestrator-host:" + host.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _postgres_env(url: str) -> dict[str, str]:
    parsed = urlparse(url)
    dbname = parsed.path.lstrip("/")
    if not dbname or not parsed.hostname:
        raise StoreError(f"bad store URL {_redact(url)!r}: expected postgresql://user@host:port/db")
    query = parse_qs(parsed.query)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": dbname,
        "POSTGRES_HOST": parsed.hostname,
        "POSTGRES_PORT": str(parsed.port or 5432),
        "POSTGRES_USER": unquote(parsed.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parsed.password or ""),
        "POSTGRES_CONNECT_TIMEOUT": "5",
        "POSTGRES_POOL_SIZE": "5",
        "POSTGRES_MAX_OVERFLOW": "10",
        "POSTGRES_LOCK_TIMEOUT": str(_timeout(url, query)),
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": str(_timeout(url, query)),
        "ORIGINATOR_ID_TYPE": "text",
        "CREATE_TABLE": "y",
        "APPLICATION_RECORDER_TOPIC": "events.pg:IndexedPostgresRecorder",
    }
    if "schema" in query:
        env["POSTGRES_SCHEMA"] = query["schema"][0]
    return env
