"""The PostgreSQL recorder: loaded only for a PostgreSQL store, so no other command pays
for importing psycopg."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg.sql import SQL

from events.store import _index_ddl, _index_rows, _insert_index_sql


class IndexedPostgresRecorder(PostgresApplicationRecorder):
    """PostgreSQL's recorder, writing each event's index row in the events' transaction."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.index_prefix = f'"{datastore.schema}".' if datastore.schema else ""
        for statement in _index_ddl(self.index_prefix, "BIGINT"):
            self.sql_create_statements.append(SQL(statement))  # type: ignore[arg-type]

    def _fetch_ids_after_insert_events(
        self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        positions = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        rows = _index_rows(stored_events, positions, kwargs)
        curs.executemany(_insert_index_sql(self.index_prefix, "%s"), rows)
        return positions
