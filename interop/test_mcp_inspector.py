"""The MCP Inspector's CLI (npm) as the MCP client of `orchestrator mcp`.

Each inspector call starts its own `orchestrator mcp` over stdio on one SQLite store; they
share the session through `--session`, as separate agent runs would.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from interop.conftest import CLI
from interop.peers import peer_command

TOOLS = {"task_start", "task_await", "task_peek", "task_list", "task_cancel"}
COMBINATORS = {"oneOf", "anyOf", "allOf", "if", "not"}


@pytest.fixture(scope="session")
def inspector() -> Path:
    """The installed `mcp-inspector` command (skips when it could not be installed)."""
    return peer_command("mcp-inspector")


def inspect(inspector: Path, store: str, *method: str, session: str = "interop") -> Any:
    """One inspector `--cli` call against `orchestrator mcp`; its JSON answer."""
    cmd = [
        str(inspector),
        "--cli",
        # The inspector gives the server a bare environment: the state dir is passed on so
        # the server's workers are this test's.
        "-e",
        f"XDG_STATE_HOME={os.environ['XDG_STATE_HOME']}",
        CLI,
        "--store",
        store,
        "--session",
        session,
        "mcp",
        *method,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def call(inspector: Path, store: str, tool: str, *args: str) -> dict[str, Any]:
    """`tools/call` of one tool with `key=value` arguments (a value may be JSON)."""
    answer = inspect(
        inspector, store, "--method", "tools/call", "--tool-name", tool, "--tool-arg", *args
    )
    assert answer.get("isError") is not True, answer
    result: dict[str, Any] = json.loads(answer["content"][0]["text"])
    return result


def _schemas(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, prop in schema.get("properties", {}).items():
        found.append((name, prop))
        found += [(f"{name}.{n}", p) for n, p in _schemas(prop)]
    return found


def test_the_inspector_lists_the_five_tools(inspector: Path, store: str) -> None:
    tools = {t["name"]: t for t in inspect(inspector, store, "--method", "tools/list")["tools"]}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool["description"], tool["name"]
        assert tool["inputSchema"]["type"] == "object", tool["name"]


def test_the_tool_schemas_the_inspector_gets_are_in_the_common_dialect(
    inspector: Path, store: str
) -> None:
    """What every LLM host accepts: no top-level combinator, no $ref anywhere, a type and a
    description on every property, an optional object an object."""
    tools = inspect(inspector, store, "--method", "tools/list")["tools"]
    for tool in tools:
        schema = tool["inputSchema"]
        assert not COMBINATORS & set(schema), tool["name"]
        assert "$ref" not in json.dumps(schema) and "$defs" not in schema, tool["name"]
        for name, prop in _schemas(schema):
            assert prop.get("type"), f"{tool['name']}: {name} has no type"
            assert prop.get("description"), f"{tool['name']}: {name} has no description"
    start = next(t["inputSchema"] for t in tools if t["name"] == "task_start")
    assert start["properties"]["worker"]["type"] == "object"


def test_model_set_with_a_nested_worker_then_a_task_is_served_by_that_model(
    inspector: Path, store: str
) -> None:
    worker = json.dumps({"worker_id": "coder", "model": "local/echo-small"})
    set_op = call(
        inspector, store, "task_start", "kind=op", "op=worker.model.set", f"worker={worker}"
    )
    assert set_op["status"] == "completed", set_op
    done = call(inspector, store, "task_await", f"taskId={set_op['task_id']}", "timeout=60")
    assert done["result"]["worker_id"] == "coder"
    assert done["result"]["model"] == "local/echo-small"
    assert done["result"]["model_policy"] == "sticky"

    started = call(inspector, store, "task_start", "workerId=coder", "task=hello inspector")
    assert started["status"] == "running", started
    record = call(inspector, store, "task_await", f"taskId={started['task_id']}", "timeout=60")
    assert record["status"] == "completed", record
    assert record["model"] == "local/echo-small"
    assert record["response"] == "[local/echo-small] hello inspector"
    assert record["session_id"] == "interop"
