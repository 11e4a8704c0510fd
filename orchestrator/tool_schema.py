"""The Task API's five tools, each with a description and an input schema in the dialect every
LLM host accepts (Anthropic, OpenAI and Gemini tool definitions, MCP clients).

That dialect is a plain object: `{"type": "object", "properties": ..., "required": ...}`,
no combinator (`oneOf`, `anyOf`, `allOf`, `if`/`then`/`else`, `not`) at the top, no `$ref`
or `$defs` anywhere, and a `type` and a `description` on every property. pydantic's schemas
are richer, so `dialect()` derives the tool schema from them by one general transform: a
field added to a model later gets it for free. What the dropped combinators said (which
fields each kind and op needs) is said in the descriptions, and `InvalidTaskArgs` enforces
it. This module imports no `mcp`: `orchestrator schema` and the MCP server share it.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from pydantic.alias_generators import to_camel

from orchestrator.api import OP_FIELDS, InvalidTaskArgs, TaskStartArgs, _Args, _message

MAX_AWAIT = 30.0  # seconds one task_await call waits at most: no call outlives a client

# Keys that make a schema conditional or a union: the dialect has none of them at the top.
COMBINATORS = ("oneOf", "anyOf", "allOf", "if", "then", "else", "not")
# Keys some hosts refuse (Gemini's function declarations); the arguments' checks enforce them.
_DROPPED = ("$schema", "$id", "additionalProperties", "if", "then", "else", "not")
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


class DialectError(TypeError):
    """A pydantic schema the transform cannot flatten (a real union or a recursive model):
    a mistake in a tool's arguments model, caught by the tests."""


def dialect(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (a pydantic JSON schema of an object) in the common tool-schema dialect.

    `$ref`s are inlined from `$defs` (a field's own description first, then the model's),
    `anyOf`/`oneOf` of one type and null becomes that type (an optional object is an object;
    a `null` default is dropped), a single-branch `allOf` is merged, `const` becomes a
    one-value `enum`, and conditionals (`if`/`then`/`else`, `not`, a top-level `allOf`) and
    `additionalProperties` are dropped.
    """
    defs = schema.get("$defs", {})
    top = {k: v for k, v in schema.items() if k not in COMBINATORS}
    flat = _flatten(top, defs, frozenset())
    flat["type"] = "object"
    flat.setdefault("properties", {})
    flat.setdefault("required", [])
    return flat


def _flatten(node: dict[str, Any], defs: dict[str, Any], seen: frozenset[str]) -> dict[str, Any]:
    node = {k: v for k, v in node.items() if k not in _DROPPED and k != "$defs"}
    ref = node.pop("$ref", None)
    if ref is not None:
        name = str(ref).rsplit("/", 1)[-1]
        if name in seen or name not in defs:
            raise DialectError(f"cannot inline {ref}: recursive or undefined")
        node = _merge(_flatten(defs[name], defs, seen | {name}), node)
    for key in ("anyOf", "oneOf"):
        branches = node.pop(key, None)
        if branches is None:
            continue
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) != 1:
            raise DialectError(f"a union of several types has no common dialect: {branches}")
        node = _merge(_flatten(kept[0], defs, seen), node)
        if "default" in node and node["default"] is None:
            del node["default"]
    parts = node.pop("allOf", None)
    if parts is not None and len(parts) == 1:
        node = _merge(_flatten(parts[0], defs, seen), node)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "type" not in node and node.get("enum"):
        node["type"] = _JSON_TYPES.get(type(node["enum"][0]), "string")
    if "properties" in node:
        node["properties"] = {
            name: _flatten(prop, defs, seen) for name, prop in node["properties"].items()
        }
    if isinstance(node.get("items"), dict):
        node["items"] = _flatten(node["items"], defs, seen)
    return node


def _merge(inner: dict[str, Any], outer: dict[str, Any]) -> dict[str, Any]:
    """`inner` (a resolved type) under `outer`'s own keys; both descriptions are kept, the
    field's (what it is for) before the type's (what it holds)."""
    merged = {**inner, **outer}
    said, says = outer.get("description"), inner.get("description")
    if said and says and says not in said:
        merged["description"] = f"{said} {' '.join(says.split())}"
    return merged


# --- the tools' arguments (task_start's are TaskStartArgs) ----------------------------------


class TaskIdArgs(_Args):
    """The arguments of task_peek and task_cancel."""

    task_id: str = Field(max_length=200, description="A task id returned by task_start.")


class TaskAwaitArgs(TaskIdArgs):
    """The arguments of task_await."""

    timeout: float = Field(
        MAX_AWAIT,
        ge=0,
        description=f"Seconds to wait (default and maximum {MAX_AWAIT:g}); the running "
        "record comes back after that.",
    )


class TaskListArgs(_Args):
    """The arguments of task_list."""

    view: str = Field("tasks", description="The view (default tasks).")
    filters: dict[str, Any] = Field({}, description="The view's filters, by name.")


def parse_args(tool: str, model: type[BaseModel], arguments: dict[str, Any]) -> Any:
    """A tool's arguments checked against its model; `InvalidTaskArgs` names each bad field."""
    try:
        return model.model_validate(arguments)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {_message(err)}"
            for err in exc.errors()
        ]
        raise InvalidTaskArgs(f"Invalid {tool} arguments: " + "; ".join(problems) + ".") from None


def task_start_schema() -> dict[str, Any]:
    """The tool schema of task_start: `TaskStartArgs`'s in the common dialect, the payload
    each op needs said in `op`'s description (as `InvalidTaskArgs` enforces it)."""
    schema = dialect(TaskStartArgs.model_json_schema())
    needs = "; ".join(
        f"{op}: {', '.join(f'{group}.{to_camel(f)}' for f in fields)}"
        for op, (group, fields) in OP_FIELDS.items()
    )
    op = schema["properties"]["op"]
    op["description"] = f"{op['description']} Each op needs its payload: {needs}."
    return schema


def _views() -> tuple[list[str], str]:
    """The view names (from the views' own table) and a sentence on each one's filters."""
    from orchestrator import views

    names = list(views.VIEWS)
    filters = "; ".join(
        f"{name}: {', '.join(views.filters_of(fn))}"
        for name, fn in views.VIEWS.items()
        if views.filters_of(fn)
    )
    return names, filters


@functools.cache
def tools() -> dict[str, tuple[str, dict[str, Any]]]:
    """Each tool's description and input schema, by name."""
    names, filters = _views()
    list_schema = dialect(TaskListArgs.model_json_schema())
    list_schema["properties"]["view"]["enum"] = names
    list_schema["properties"]["filters"]["description"] += f" By view: {filters}."
    return {
        "task_start": (
            "Start a task: a prompt for a worker (kind=worker, needs workerId and task) or an "
            "operation (kind=op, needs op and its payload). A worker task answers at once "
            "with its task id and status running: read the result with task_await. A task "
            "that ends at once (an op, a failed resolution) answers with its whole record: "
            "status, result, error.",
            task_start_schema(),
        ),
        "task_await": (
            f"Wait for a task to finish (at most `timeout` seconds, {MAX_AWAIT:g} at most) and "
            "return its record: status, response, model, usage, error. Call again while the "
            "status is running.",
            dialect(TaskAwaitArgs.model_json_schema()),
        ),
        "task_peek": (
            "Return a task's record now, without waiting.",
            dialect(TaskIdArgs.model_json_schema()),
        ),
        "task_list": (
            f"Rows of a view: {', '.join(names)}. Filters go in `filters` ({filters}).",
            list_schema,
        ),
        "task_cancel": (
            "Cancel a running task; its request in flight is interrupted.",
            dialect(TaskIdArgs.model_json_schema()),
        ),
    }
