"""`orchestrator mcp` through the official MCP client and through raw JSON-RPC lines, and the
tool schemas every LLM host accepts."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest

from orchestrator import TaskStartArgs, views
from orchestrator.tool_schema import COMBINATORS, task_start_schema, tools

ROOT = Path(__file__).parent.parent
CLI = str(Path(sys.executable).parent / "orchestrator")
TOOLS = {"task_start", "task_await", "task_peek", "task_list", "task_cancel"}


@pytest.fixture
def store(tmp_path: Path) -> str:
    """One SQLite file per test."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def _server_env() -> dict[str, str]:
    # The server's workers live under this test's state dir, so the fixture reaps them; the
    # same PYTHONPATH makes the server run the code under test.
    env = {"XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


async def _mcp_session(
    args: list[str], calls: list[tuple[str, dict[str, Any]]]
) -> tuple[Any, list[Any]]:
    """The tool list, then each call's result; `task_id` of a task_await, task_peek or
    task_cancel defaults to the previous answer's."""
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=CLI, args=args, cwd=str(ROOT), env=_server_env())
    results: list[Any] = []
    with anyio.fail_after(60):
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            listed = await session.list_tools()
            for name, given in calls:
                arguments = dict(given)
                if name in ("task_await", "task_peek", "task_cancel") and "task_id" not in given:
                    arguments["task_id"] = results[-1].structured_content["task_id"]
                results.append(await session.call_tool(name, arguments))
    return listed, results


def _answer(result: Any) -> Any:
    assert result.is_error is not True, result.content[0].text
    return json.loads(result.content[0].text)


def test_mcp_server_lists_the_tools_and_runs_a_task(store: str) -> None:
    calls = [
        ("task_start", {"kind": "worker", "workerId": "coder", "task": "hello over mcp"}),
        ("task_await", {"timeout": 30}),
        ("task_start", {"kind": "worker", "workerID": "coder"}),
        ("task_await", {"task_id": "t-1", "timeout": "soon"}),
    ]
    listed, (started, awaited, bad, bad_timeout) = anyio.run(
        _mcp_session, ["--store", store, "mcp"], calls
    )
    tools_listed = {t.name: t for t in listed.tools}
    assert set(tools_listed) == TOOLS
    assert all(t.description for t in tools_listed.values())
    assert tools_listed["task_start"].input_schema == task_start_schema()
    handle = _answer(started)
    assert handle["status"] == "running" and handle["session_id"].startswith("s-")
    record = _answer(awaited)
    assert record["status"] == "completed"
    assert record["response"] == "[local/echo-large] hello over mcp"
    assert record["session_id"] == handle["session_id"]
    assert bad.is_error is True
    assert "workerID" in bad.content[0].text  # the bad field is named
    assert bad.content[0].text.startswith("Invalid task_start arguments")
    assert bad_timeout.is_error is True
    assert bad_timeout.content[0].text.startswith("Invalid task_await arguments: timeout:")


# --- the tool schemas ----------------------------------------------------------------------------


def _dialect_problems(schema: dict[str, Any], where: str = "") -> list[str]:
    """Where `schema` leaves the dialect every host accepts."""
    problems = []
    if not where:
        if schema.get("type") != "object" or "properties" not in schema:
            problems.append("top: not an object with properties")
        if not isinstance(schema.get("required"), list):
            problems.append("top: no required list")
        problems += [f"top: {k}" for k in COMBINATORS if k in schema]
    for key in ("$ref", "$defs", "anyOf", "oneOf", "allOf"):
        if key in schema:
            problems.append(f"{where or 'top'}: {key}")
    for name, prop in schema.get("properties", {}).items():
        here = f"{where}.{name}" if where else name
        if not isinstance(prop.get("type"), str):
            problems.append(f"{here}: no type")
        if not prop.get("description"):
            problems.append(f"{here}: no description")
        problems += _dialect_problems(prop, here)
    if isinstance(schema.get("items"), dict):
        problems += _dialect_problems(schema["items"], f"{where}[]")
    return problems


def test_the_dialect_check_sees_what_pydantic_gives() -> None:
    problems = _dialect_problems(TaskStartArgs.model_json_schema())
    assert "top: allOf" in problems and "worker: no type" in problems
    assert "top: $defs" in problems


def test_every_tool_schema_is_in_the_common_dialect(store: str) -> None:
    listed, _ = anyio.run(_mcp_session, ["--store", store, "mcp"], [])
    served = {t.name: t.input_schema for t in listed.tools}
    assert set(served) == TOOLS
    for name, schema in served.items():
        assert _dialect_problems(schema) == [], name
        jsonschema.Draft202012Validator.check_schema(schema)
    printed = subprocess.run([CLI, "schema"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(printed.stdout) == served["task_start"]
    worker = served["task_start"]["properties"]["worker"]
    assert worker["type"] == "object" and "workerId" in worker["properties"]
    # What the combinators said is said in words: the payload each op needs.
    assert "worker.model.set: worker.workerId, worker.model" in str(
        served["task_start"]["properties"]["op"]["description"]
    )


def test_the_transform_flattens_fields_it_has_not_seen() -> None:
    """A field added later (a list of nested models, an optional one) gets the dialect too."""
    from pydantic import BaseModel, Field

    from orchestrator.tool_schema import dialect

    class Result(BaseModel):
        """One tool result."""

        tool_call_id: str = Field(description="The call answered.")
        content: str = Field(description="What the tool said.")

    class Later(BaseModel):
        continue_from: str | None = Field(None, description="A task to continue.")
        tool_results: list[Result] | None = Field(None, description="Results of tool calls.")
        last: Result | None = Field(None, description="The last result.")

    schema = dialect(Later.model_json_schema())
    assert _dialect_problems(schema) == []
    results = schema["properties"]["tool_results"]
    assert results["type"] == "array" and results["items"]["required"] == [
        "tool_call_id",
        "content",
    ]
    assert schema["properties"]["last"]["description"] == "The last result. One tool result."
    assert "default" not in schema["properties"]["continue_from"]


VALID = [
    {"kind": "worker", "workerId": "coder", "task": "hi"},
    {"kind": "op", "op": "worker.model.set", "worker": {"workerId": "coder", "model": "auto"}},
    {"kind": "op", "op": "memory.put", "memory": {"key": "k", "value": ""}},
    {"kind": "op", "op": "session.fork", "session": {"fromSessionId": "cli", "position": 0}},
]


@pytest.mark.parametrize("payload", VALID)
def test_a_valid_payload_is_valid_for_the_tool_schema(payload: dict[str, Any]) -> None:
    jsonschema.validate(payload, task_start_schema())


def test_task_list_names_every_view() -> None:
    description, schema = tools()["task_list"]
    assert schema["properties"]["view"]["enum"] == list(views.VIEWS)
    for name in views.VIEWS:
        assert f" {name}," in description or f" {name}." in description, name
    assert "whatif: config, session_id" in description


# --- answers and sessions ------------------------------------------------------------------------


def test_an_op_answers_with_its_record_and_worker_is_an_object(store: str) -> None:
    calls = [
        (
            "task_start",
            {"kind": "op", "op": "worker.model.set", "worker": {"workerId": "coder", "model": "x"}},
        ),
        (
            "task_start",
            {
                "kind": "op",
                "op": "worker.model.set",
                "worker": {"workerId": "coder", "model": "local/echo-small"},
            },
        ),
        ("task_start", {"kind": "worker", "workerId": "coder", "task": "hi", "model": "nope/x"}),
    ]
    _, (failed, done, unresolved) = anyio.run(_mcp_session, ["--store", store, "mcp"], calls)
    failed_record = _answer(failed)
    assert failed_record["status"] == "failed"
    assert 'Model "x"' in failed_record["error"]
    done_record = _answer(done)
    assert done_record["status"] == "completed"
    assert done_record["result"]["model"] == "local/echo-small"
    assert done_record["session_id"] == failed_record["session_id"]
    unresolved_record = _answer(unresolved)
    assert unresolved_record["status"] == "failed"
    assert 'Model "nope/x"' in unresolved_record["error"]


@pytest.mark.parametrize(
    "args",
    [["--session", "review", "mcp"], ["mcp", "--session", "review"]],
    ids=["global", "command"],
)
def test_mcp_resumes_the_session_given(store: str, args: list[str]) -> None:
    set_model = [CLI, "--store", store, "--session", "review", "set-model", "coder"]
    subprocess.run([*set_model, "local/echo-small"], check=True, capture_output=True, cwd=ROOT)
    calls = [
        ("task_start", {"kind": "worker", "workerId": "coder", "task": "resumed"}),
        ("task_await", {}),
    ]
    _, (started, awaited) = anyio.run(_mcp_session, ["--store", store, *args], calls)
    assert _answer(started)["session_id"] == "review"
    record = _answer(awaited)
    assert record["session_id"] == "review"
    assert record["model"] == "local/echo-small"  # the session's override serves


# --- raw JSON-RPC: a reply to everything, and the server stays up ------------------------------


class RawServer:
    """`orchestrator mcp` spoken to line by line; every read has a deadline."""

    def __init__(self, store: str) -> None:
        env = {**os.environ, **_server_env()}
        self.proc = subprocess.Popen(
            [CLI, "--store", store, "mcp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 20) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout} s") from None
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, rid: int, method: str, params: dict[str, Any] | None = None) -> Any:
        message = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        self.send(json.dumps(message).encode())
        return self.reply()

    def close(self) -> str:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.stderr.read().decode()


@pytest.fixture
def raw(store: str) -> Iterator[RawServer]:
    server = RawServer(store)
    init = {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    }
    assert "result" in server.request(1, "initialize", init)
    server.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    yield server
    if server.proc.poll() is None:
        server.proc.kill()


def _call(name: str, arguments: bytes) -> bytes:
    return (
        b'"method":"tools/call","params":{"name":"'
        + name.encode()
        + b'","arguments":'
        + arguments
        + b"}}"
    )


HUGE = 10**30


def test_every_malformed_request_gets_an_error_reply_and_the_server_stays_up(
    raw: RawServer,
) -> None:
    surrogate = b'{"jsonrpc":"2.0","id":2,' + _call("task_peek", b'{"task_id":"\\ud800"}')
    deep = b"[" * 50_000 + b"]" * 50_000
    nested = b'{"jsonrpc":"2.0","id":3,' + _call("task_list", b'{"filters":{"a":' + deep + b"}}")
    huge = b'{"jsonrpc":"2.0","id":' + str(HUGE).encode() + b","
    bad_args = huge + _call("task_await", b'{"task_id":"t-1","timeout":"soon"}')
    cases = [
        (surrogate, 2, -32700, "surrogate pair"),
        (nested, None, -32700, "recursion limit"),
        (b"not json at all", None, -32700, "Parse error"),
        (b'{"jsonrpc":"2.0","id":true,"method":"tools/list"}', None, -32600, "id must be"),
        (b'{"jsonrpc":"2.0","id":6,"method":7}', 6, -32600, "method"),
    ]
    for n, (line, rid, code, says) in enumerate(cases):
        raw.send(line)
        reply = raw.reply()
        assert reply["id"] == rid and reply["error"]["code"] == code, (line[:60], reply)
        assert says in reply["error"]["message"]
        assert "tools" in raw.request(100 + n, "tools/list")["result"]  # still up
    raw.send(bad_args)
    reply = raw.reply()
    assert reply["id"] == HUGE
    assert reply["result"]["isError"] is True  # a tool error naming the field, not code 0
    assert "timeout" in reply["result"]["content"][0]["text"]
    raw.send(huge + b'"method":"tools/list"}')
    assert raw.reply()["id"] == HUGE
    assert raw.request(200, "ping")["result"] == {}
    stderr = raw.close()
    assert "Traceback" not in stderr, stderr


def test_a_failure_inside_a_tool_is_an_error_reply_not_code_0(raw: RawServer) -> None:
    # A filter of a type the view does not check (a path given as a number): never code 0
    # nor a traceback; a tool error, or -32603 with one line on stderr.
    arguments = {"view": "whatif", "filters": {"config": 5}}
    reply = raw.request(HUGE, "tools/call", {"name": "task_list", "arguments": arguments})
    assert reply["id"] == HUGE
    if "error" in reply:
        assert reply["error"]["code"] == -32603, reply
        assert "task_list" in reply["error"]["message"]
    else:
        assert reply["result"]["isError"] is True
    assert raw.request(2, "ping")["result"] == {}
    stderr = raw.close()
    assert "Traceback" not in stderr, stderr
