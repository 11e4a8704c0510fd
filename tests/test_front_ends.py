"""Front ends: OpenTelemetry through the SDK's in-memory exporter, the tool schema through a
JSON-schema validator, and the docs' names (the MCP server: tests/test_mcp.py)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import InvalidTaskArgs, TaskStartArgs, telemetry
from tests.chat import ChatServer, Reply
from tests.conftest import OpenOrch
from tests.helpers import config_with, run, set_model

ROOT = Path(__file__).parent.parent
CLI = str(Path(sys.executable).parent / "orchestrator")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """One SQLite file per test."""
    return f"sqlite:///{tmp_path / 'events.db'}"


# --- OpenTelemetry -------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()


def _shape(span: Any) -> tuple[Any, ...]:
    return (
        span.name,
        dict(span.attributes),
        [(e.name, dict(e.attributes)) for e in span.events],
        span.status.status_code.name,
        span.start_time,
        span.end_time,
    )


def test_worker_tasks_are_genai_spans_live_and_from_the_log(
    open_orch: OpenOrch, spans: InMemorySpanExporter, chat_server: ChatServer
) -> None:
    orch = open_orch(config=config_with("server"), session_id="otel")
    set_model(orch, "coder", "local/echo-small")
    served = run(orch, "coder", "first task")
    reused = run(orch, "coder", "second task")
    lab = {
        "extends": "none",
        "model": "lab/big",
        "providers": {
            "lab": {
                "kind": "openai",
                "base_url": chat_server.url,
                "max_retries": 0,
                "models": {"big": {}},
            }
        },
        "profiles": {"coder": {"backend": "agent"}},
    }
    other = open_orch(config=lab, session_id="otel2")
    chat_server.script = [Reply(status=500, error="down")]
    failed = run(other, "coder", "doomed")
    assert (served.status, reused.status, failed.status) == ("completed", "completed", "failed")

    live = {s.attributes["orchestrator.task_id"]: s for s in spans.get_finished_spans()}
    first, second, bad = live[served.task_id], live[reused.task_id], live[failed.task_id]
    assert first.name == "chat local/echo-small"
    assert first.attributes["gen_ai.operation.name"] == "chat"
    assert first.attributes["gen_ai.provider.name"] == "local"
    assert first.attributes["gen_ai.request.model"] == "local/echo-small"
    assert first.attributes["gen_ai.response.model"] == "local/echo-small"
    assert first.attributes["gen_ai.usage.input_tokens"] == 2
    assert first.attributes["gen_ai.usage.output_tokens"] == 3
    assert first.attributes["gen_ai.conversation.id"] == "otel"
    assert first.attributes["orchestrator.worker_id"] == "coder"
    assert first.attributes["orchestrator.reused"] is False
    assert second.attributes["orchestrator.reused"] is True
    assert (
        second.attributes["orchestrator.instance_id"]
        == first.attributes["orchestrator.instance_id"]
    )
    names = [e.name for e in first.events]
    assert names[0] == "orchestrator.worker.model.set"
    assert "orchestrator.worker.spawned" in names
    assert "orchestrator.worker.reused" in [e.name for e in second.events]
    assert bad.status.status_code.name == "ERROR"
    assert "orchestrator.model.attempt_failed" in [e.name for e in bad.events]

    spans.clear()
    exported = telemetry.export_log(orch.log.records(), None)
    assert exported == 3
    again = {s.attributes["orchestrator.task_id"]: s for s in spans.get_finished_spans()}
    for task_id, span in live.items():
        assert _shape(again[task_id]) == _shape(span)
    spans.clear()
    assert telemetry.export_log(orch.log.records(), "otel2") == 1


def test_without_the_extra_nothing_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import orchestrator.orchestrator, orchestrator.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'mcp'))))\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


# --- the tool schema -----------------------------------------------------------------------------


def _properties(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from schema.get("properties", {}).items()
    for sub in schema.get("$defs", {}).values():
        yield from _properties(sub)


def test_every_schema_property_is_described_with_a_title() -> None:
    schema = TaskStartArgs.model_json_schema()
    assert "kind=" in str(schema["description"])
    for name, prop in _properties(schema):
        assert prop.get("description"), name
        assert prop.get("title") and prop["title"] not in ("Workerid", "Forcenew"), name
    jsonschema.Draft202012Validator.check_schema(schema)


VALID = [
    {"kind": "worker", "workerId": "coder", "task": "hi"},
    {"workerId": "docs", "task": "hi", "forceNew": True, "model": "auto:fast"},
    {"kind": "op", "op": "worker.model.set", "worker": {"workerId": "coder", "model": "auto"}},
    {"kind": "op", "op": "memory.put", "memory": {"key": "k", "value": ""}},
]
INVALID = [
    {"kind": "worker", "task": "no worker"},
    {"kind": "op"},
    {"kind": "worker", "workerId": "coder", "task": "hi", "bogus": 1},
    {"kind": "worker", "workerId": "../etc", "task": "hi"},
]


@pytest.mark.parametrize("payload", VALID)
def test_a_payload_valid_for_the_schema_is_accepted(open_orch: OpenOrch, payload: dict) -> None:
    jsonschema.validate(payload, TaskStartArgs.model_json_schema())
    orch = open_orch()
    rec = orch.task_await(orch.task_start(**payload).task_id, timeout=60)
    assert rec.status == "completed", rec.error


@pytest.mark.parametrize("payload", INVALID)
def test_a_payload_invalid_for_the_schema_raises(open_orch: OpenOrch, payload: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(payload, TaskStartArgs.model_json_schema())
    with pytest.raises(InvalidTaskArgs):
        open_orch().task_start(**payload)


# --- the docs ------------------------------------------------------------------------------------


def test_every_name_the_docs_pin_exists_in_the_code() -> None:
    """Names the docs mark as pinned (`code` spans in docs/*.md tables) must exist."""
    from events import catalogue
    from orchestrator import views

    text = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    catalogue_page = (ROOT / "docs" / "events.md").read_text()
    events_named = set(re.findall(r"^\| `([A-Z][A-Za-z]+)` \|", catalogue_page, re.M))
    assert events_named, "docs/events.md lists no event"
    assert events_named <= set(catalogue.EVENT_TYPES), events_named - set(catalogue.EVENT_TYPES)
    views_named = set(re.findall(r"\| view `([a-z]+)` \|", text))
    assert views_named == set(views.VIEWS), views_named ^ set(views.VIEWS)
    fields_named = set(re.findall(r"\| field `([a-z_]+)` \|", text))
    schema_fields = set(TaskStartArgs.model_fields)
    assert fields_named == schema_fields, fields_named ^ schema_fields
    readme = (ROOT / "README.md").read_text()
    assert "/".join(["..", "shared"]) not in readme  # a clone has no steering folder
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_the_generated_reference_pages_are_current() -> None:
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "generate.py"))
    assert (ROOT / "docs" / "events.md").read_text() == gen["events_page"](), "run make docs"
    page = (ROOT / "docs" / "task-api.md").read_text()
    assert page.endswith(gen["task_api_reference"]() + "\n"), "run make docs"
