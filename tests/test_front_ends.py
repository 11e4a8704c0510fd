"""Front ends: the tool schema through a JSON-schema validator, and the docs' names (the MCP
server: tests/test_mcp.py; OpenTelemetry: tests/test_otel.py)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from orchestrator import InvalidTaskArgs, TaskStartArgs
from tests.conftest import OpenOrch

ROOT = Path(__file__).parent.parent
CLI = str(Path(sys.executable).parent / "orchestrator")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """One SQLite file per test."""
    return f"sqlite:///{tmp_path / 'events.db'}"


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
