"""`orchestrator mcp`: the Task API as an MCP server over stdio (the official `mcp` SDK).

Five tools, `task_start`, `task_await`, `task_peek`, `task_list` and `task_cancel`, each
answering with the JSON of the record or rows. One session per server process. Long work
stays start-then-await: `task_await` waits at most `MAX_AWAIT` seconds per call and returns
the running record after that, so no call outlives an MCP client's time-out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from orchestrator.api import InvalidTaskArgs, TaskStartArgs
from orchestrator.orchestrator import Orchestrator

MAX_AWAIT = 30.0

_TASK_ID = {"type": "string", "description": "A task id returned by task_start."}
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "task_start": (
        "Start a task: a prompt for a worker (kind=worker, needs workerId and task) or an "
        "operation (kind=op, needs op and its payload). Returns at once with the task id; "
        "read the result with task_await.",
        TaskStartArgs.model_json_schema(),
    ),
    "task_await": (
        f"Wait for a task to finish (at most `timeout` seconds, {MAX_AWAIT:g} at most) and "
        "return its record: status, response, model, usage, error. Call again while the "
        "status is running.",
        {
            "type": "object",
            "properties": {
                "task_id": _TASK_ID,
                "timeout": {
                    "type": "number",
                    "description": f"Seconds to wait (default and maximum {MAX_AWAIT:g}).",
                },
            },
            "required": ["task_id"],
        },
    ),
    "task_peek": (
        "Return a task's record now, without waiting.",
        {"type": "object", "properties": {"task_id": _TASK_ID}, "required": ["task_id"]},
    ),
    "task_list": (
        "Rows of a view: tasks, workers, registry, models, profiles, memory, events, replay, "
        "explain, usage. Filters go in `filters` (events: session_id, worker_id, task_id, "
        "type, since; explain: task_id or worker_id; replay: until).",
        {
            "type": "object",
            "properties": {
                "view": {"type": "string", "description": "The view (default tasks)."},
                "filters": {"type": "object", "description": "The view's filters."},
            },
        },
    ),
    "task_cancel": (
        "Cancel a running task; its request in flight is interrupted.",
        {"type": "object", "properties": {"task_id": _TASK_ID}, "required": ["task_id"]},
    ),
}


def call(orch: Orchestrator, name: str, arguments: dict[str, Any]) -> Any:
    """Run one tool call against the orchestrator; the JSON-able answer."""
    handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
        "task_start": lambda a: {
            **orch.task_start(**a).model_dump(mode="json"),
            "session_id": orch.session_id,
        },
        "task_await": lambda a: orch.task_await(
            _task_id(a), timeout=min(float(a.get("timeout") or MAX_AWAIT), MAX_AWAIT)
        ),
        "task_peek": lambda a: orch.task_peek(_task_id(a)),
        "task_cancel": lambda a: orch.task_cancel(_task_id(a)),
        "task_list": lambda a: orch.task_list(
            view=str(a.get("view") or "tasks"), **dict(a.get("filters") or {})
        ),
    }
    handler = handlers.get(name)
    if handler is None:
        raise InvalidTaskArgs(f'Unknown tool "{name}": use one of {", ".join(handlers)}.')
    return _jsonable(handler(arguments))


def _task_id(arguments: dict[str, Any]) -> str:
    task_id = arguments.get("task_id", arguments.get("taskId"))
    if not isinstance(task_id, str):
        raise InvalidTaskArgs("Invalid arguments: task_id: Field required (a task id string).")
    return task_id


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def serve(orch: Orchestrator) -> None:
    """Serve the Task API over stdio until the client closes the connection."""
    import anyio
    import mcp_types as types
    from mcp.server import Server
    from mcp.server.stdio import stdio_server

    tools = [
        types.Tool(name=name, description=description, input_schema=schema)
        for name, (description, schema) in SCHEMAS.items()
    ]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        arguments = dict(params.arguments or {})
        try:
            # The Task API blocks (task_await); a worker thread keeps the loop answering.
            answer = await anyio.to_thread.run_sync(lambda: call(orch, params.name, arguments))
        except InvalidTaskArgs as exc:
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=str(exc))], is_error=True
            )
        text = json.dumps(answer)
        structured = answer if isinstance(answer, dict) else {"rows": answer}
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], structured_content=structured
        )

    server: Server[Any] = Server(
        "orchestrator",
        instructions=(
            "Run LLM workers through the Task API: task_start, then task_await with the task "
            f"id. Session {orch.session_id}."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)
