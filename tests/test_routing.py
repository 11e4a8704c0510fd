"""Events route themselves: each lands on the stream its class declares."""

from __future__ import annotations

from events.catalogue import (
    MemoryPut,
    ModelCooledDown,
    SessionForked,
    TaskFailed,
    session_stream,
    utcnow,
)
from orchestrator import Orchestrator
from tests.helpers import config_with


def _types(orch: Orchestrator, stream: str) -> list[str]:
    return [e.event.type_name() for e in orch.log.read_stream(stream)]


def test_record_sends_each_event_to_its_own_stream_in_one_call() -> None:
    with Orchestrator.open(config=config_with("agent"), store="memory", session_id="a") as orch:
        orch.record(
            MemoryPut(session_id="a", key="k", value="v"),
            SessionForked(session_id="b", from_session_id="a", position=0),
            ModelCooledDown(session_id="a", model="local/echo", until=utcnow(), reason="r"),
        )
        assert _types(orch, "memory") == ["MemoryPut"]
        assert _types(orch, session_stream("b")) == ["SessionForked"]
        assert _types(orch, "models") == ["ModelCooledDown"]
        # Nothing was written to this session's stream, so it was not opened yet.
        assert _types(orch, session_stream("a")) == []
        orch.record(TaskFailed(session_id="a", task_id="t-1", error="x"))
        assert _types(orch, session_stream("a")) == ["SessionOpened", "TaskFailed"]
