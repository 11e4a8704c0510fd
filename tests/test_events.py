"""The event log itself: upcasting old versions, atomic multi-stream appends, conflicts."""

from __future__ import annotations

import json

import pytest
from eventsourcing.persistence import StoredEvent

from events import EventLog, StreamConflict, replay
from events.catalogue import MemoryPut, SessionOpened
from orchestrator import Orchestrator
from tests.helpers import config_with, run


def test_a_v1_model_set_written_by_an_old_release_is_read_as_a_sticky_override() -> None:
    log = EventLog("memory")
    v1 = {
        "version": 1,
        "session_id": "old",
        "worker_id": "coder",
        "task_id": None,
        "timestamp": "2026-01-01T00:00:00Z",
        "model_ref": "local/echo-small",
        "resolved_model": "local/echo-small",
    }
    # What release 1 wrote: no model_policy, no reason.
    log._recorder.insert_events(
        [StoredEvent("session:old", 1, "WorkerModelSet", json.dumps(v1).encode())]
    )
    with Orchestrator.open(config=config_with(), store=log, session_id="old") as orch:
        assert run(orch, "coder", "hi").response == "[local/echo-small] hi"
        override = orch.session.refresh().overrides["coder"]
        assert override.model_policy == "sticky"
    record = log.records(types=["WorkerModelSet"])[0]
    assert record.data["version"] == 2
    assert replay(log).sessions["old"].overrides["coder"].model_policy == "sticky"


def test_appends_to_several_streams_land_together_or_not_at_all() -> None:
    log = EventLog("memory")
    opened = SessionOpened(session_id="a", resumed=False, host="h", pid=1)
    note = MemoryPut(session_id="a", key="k", value="v")
    log.append("session:a", [opened], 0)
    with pytest.raises(StreamConflict):
        # The session stream is at 1 already: the memory half must not land either.
        log.append_batches([("memory", [note], 0), ("session:a", [opened], 0)])
    assert log.read_stream("memory") == []
    assert [p for p, _ in log.read_log()] == [1]
