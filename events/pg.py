"""The PostgreSQL recorder: loaded only for a PostgreSQL store, so no other command pays
for importing psycopg."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg.sql import SQL

from events.store import _index_ddl, _index_rows, _insert_index_sql


class IndexedPostgresRecorder(PostgresApplicationRecorder):
    """PostgreSQL's recorder, writing each event's index row in the events' transaction,
    and notifying a channel of its own schema's store on every insert."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.index_prefix = f'"{datastore.schema}".' if datastore.schema else ""
        for statement in _index_ddl(self.index_prefix, "BIGINT"):
            self.sql_create_statements.append(SQL(statement))  # type: ignore[arg-type]

    @property
    def channel_name(self) -> str:
        """The LISTEN/NOTIFY channel of this store. The library names it after the table
        alone, so every schema's store of a database shared one channel and a follower of
        one woke for appends to all; this one is per schema and table (a digest: channel
        names are identifiers, at most 63 bytes)."""
        where = f"{self.datastore.schema}.{self.events_table_name}".encode()
        return f"orchestrator_{hashlib.sha256(where).hexdigest()[:16]}"

    @channel_name.setter
    def channel_name(self, _: str) -> None:
        """Ignore the library's table-wide name (its constructor assigns one)."""

    def _fetch_ids_after_insert_events(
        self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        positions = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        rows = _index_rows(stored_events, positions, kwargs)
        curs.executemany(_insert_index_sql(self.index_prefix, "%s"), rows)
        return positions
