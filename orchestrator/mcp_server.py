"""`orchestrator mcp`: the Task API as an MCP server over stdio (the official `mcp` SDK).

Five tools, `task_start`, `task_await`, `task_peek`, `task_list` and `task_cancel`, each
answering with the JSON of the record or rows (schemas and descriptions: `tool_schema`). One
session per server process. Long work stays start-then-await: `task_await` waits at most
`MAX_AWAIT` seconds per call and returns the running record after that, so no call outlives
an MCP client's time-out. Every request gets a reply: a line the SDK cannot parse is answered
here with a JSON-RPC error, and nothing reaches stderr as a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from events.store import StoreError
from orchestrator.api import InvalidTaskArgs
from orchestrator.orchestrator import Orchestrator
from orchestrator.tool_schema import (
    MAX_AWAIT,
    TaskAwaitArgs,
    TaskIdArgs,
    TaskListArgs,
    parse_args,
    tools,
)

if TYPE_CHECKING:
    import mcp_types as types

__all__ = ["MAX_AWAIT", "call", "serve"]

# Errors a caller's arguments or the store cause: a tool error with the message.
EXPECTED = (InvalidTaskArgs, StoreError)


def call(orch: Orchestrator, name: str, arguments: dict[str, Any]) -> Any:
    """Run one tool call against the orchestrator; the JSON-able answer."""

    def start(a: dict[str, Any]) -> dict[str, Any]:
        handle = orch.task_start(**a)
        # A task that ended at once (an op, a failed resolution) shows its status and error.
        done: BaseModel = handle if handle.status == "running" else orch.task_peek(handle.task_id)
        return {**done.model_dump(mode="json"), "session_id": orch.session_id}

    def wait(a: dict[str, Any]) -> Any:
        args = parse_args(name, TaskAwaitArgs, a)
        return orch.task_await(args.task_id, timeout=min(args.timeout, MAX_AWAIT))

    def listing(a: dict[str, Any]) -> Any:
        args = parse_args(name, TaskListArgs, a)
        return orch.task_list(view=args.view, **args.filters)

    handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
        "task_start": start,
        "task_await": wait,
        "task_peek": lambda a: orch.task_peek(parse_args(name, TaskIdArgs, a).task_id),
        "task_list": listing,
        "task_cancel": lambda a: orch.task_cancel(parse_args(name, TaskIdArgs, a).task_id),
    }
    handler = handlers.get(name)
    if handler is None:
        raise InvalidTaskArgs(f'Unknown tool "{name}": use one of {", ".join(handlers)}.')
    return _jsonable(handler(arguments))


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# --- the wire ------------------------------------------------------------------------------------


def _reply_id(obj: Any) -> int | str | None:
    """The id to answer a bad message with: its own when it has a valid one, else null."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    return (
        rid
        if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))
        else None
    )


def check_line(line: bytes) -> types.JSONRPCError | None:
    """None for a line the SDK reads as a JSON-RPC message; else the error that answers it.

    The SDK drops a line it cannot parse without a word, so its sender would wait forever.
    Parse errors (not JSON, nesting too deep, a lone surrogate, a number out of range) are
    answered `-32700`, a message that is not JSON-RPC `-32600`; with the request's id when
    it can be read, else null as JSON-RPC says.
    """
    import mcp_types as types

    try:
        message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError as exc:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            obj = None
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            code, text = types.PARSE_ERROR, f"Parse error: {first['msg']}"
            if "hex escape" in text:
                text += " (a \\ud800-\\udfff escape must be one half of a surrogate pair)"
        else:
            where = ".".join(str(p) for p in first["loc"][1:]) or "message"
            code, text = types.INVALID_REQUEST, f"Invalid Request: {where}: {first['msg']}"
        error = types.ErrorData(code=code, message=text)
        return types.JSONRPCError(jsonrpc="2.0", id=_reply_id(obj), error=error)
    if isinstance(message, types.JSONRPCNotification) and b'"id"' in line:
        # An id that is neither a string nor an integer (true, 1.5, 1e400) made it a
        # notification, which is never answered: say it is a bad request instead.
        try:
            has_id = "id" in json.loads(line)
        except (ValueError, RecursionError):
            has_id = True
        if has_id:
            error = types.ErrorData(
                code=types.INVALID_REQUEST,
                message="Invalid Request: id must be a string or an integer",
            )
            return types.JSONRPCError(jsonrpc="2.0", id=None, error=error)
    return None


class _CheckedStdin:
    """stdin's lines for the SDK's reader, each checked first: a line that is not a
    JSON-RPC message is answered here (through the SDK's own writer) and not passed on."""

    def __init__(self) -> None:
        import anyio

        self._lines = anyio.wrap_file(sys.stdin.buffer)
        self._write: Any = None
        self._ready = anyio.Event()

    def answer_with(self, write: Any) -> None:
        """Where error replies go: the write stream the server's answers go to."""
        self._write = write
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        import anyio
        from mcp.shared.message import SessionMessage

        async for line in self._lines:
            if not line.strip():
                continue
            error = check_line(line)
            if error is None:
                yield line.decode("utf-8", errors="replace")
                continue
            await self._ready.wait()
            try:
                await self._write.send(SessionMessage(error))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return


class _OneLine(logging.Formatter):
    """The SDK's log records as one line each: a traceback is not for an MCP host's log."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        record.exc_info = record.exc_text = None
        record.stack_info = None
        line = super().format(record)
        return f"{line}: {type(exc).__name__}: {exc}" if exc is not None else line


def _quiet_sdk_logs() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("mcp: %(message)s"))
    sdk = logging.getLogger("mcp")
    sdk.handlers = [handler]
    sdk.propagate = False
    if sdk.level == logging.NOTSET:
        sdk.setLevel(logging.WARNING)


def serve(orch: Orchestrator) -> None:
    """Serve the Task API over stdio until the client closes the connection."""
    import anyio
    import mcp_types as types
    from mcp.server import Server
    from mcp.server.stdio import stdio_server
    from mcp.shared.exceptions import MCPError

    _quiet_sdk_logs()
    listed = [
        types.Tool(name=name, description=description, input_schema=schema)
        for name, (description, schema) in tools().items()
    ]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        arguments = dict(params.arguments or {})
        try:
            # The Task API blocks (task_await); a worker thread keeps the loop answering.
            answer = await anyio.to_thread.run_sync(lambda: call(orch, params.name, arguments))
        except EXPECTED as exc:
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=str(exc))], is_error=True
            )
        except Exception as exc:  # noqa: BLE001 - a bug: one line here, a JSON-RPC error there
            text = f"internal error in {params.name}: {type(exc).__name__}: {exc}"
            print(f"error: {text}", file=sys.stderr, flush=True)
            raise MCPError(types.INTERNAL_ERROR, text) from None
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
        stdin = _CheckedStdin()
        async with stdio_server(stdin=stdin) as (read, write):  # type: ignore[arg-type]
            stdin.answer_with(write)
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)
