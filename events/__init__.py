"""What happened: the event catalogue, the store, projections and replay."""

from events.catalogue import EVENT_TYPES, Event
from events.projections import (
    LogState,
    MemoryState,
    Override,
    RegistryEntry,
    RegistryState,
    SessionState,
    TaskRecord,
    apply,
)
from events.replay import replay
from events.store import EventLog, EventRecord, StoreError, StreamConflict

__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventLog",
    "EventRecord",
    "LogState",
    "MemoryState",
    "Override",
    "RegistryEntry",
    "RegistryState",
    "SessionState",
    "StoreError",
    "StreamConflict",
    "TaskRecord",
    "apply",
    "replay",
]
