"""The Task API's shapes: `task_start` arguments (the tool schema), handles and view rows.

It stays one module over 400 lines because it is the Task API's contract in one place: the
`task_start` arguments (from which the tool schema is generated), their checks, and the view
rows.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from events.catalogue import ModelPolicy
from orchestrator.config import ID_PATTERN, ID_RULE, check_id
from orchestrator.errors import OrchestratorError
from orchestrator.providers import json_problem

Op = Literal[
    "memory.put",
    "memory.link",
    "memory.done",
    "worker.model.set",
    "worker.model.reset",
    "worker.spawn",
    "worker.stop",
    "session.fork",
]


class InvalidTaskArgs(OrchestratorError, ValueError):
    """`task_start` arguments that break the schema; the message names each bad field."""


# Limits on what one task may carry (docs/task-api.md). They keep every event well below
# what a store takes in one write, so no write can stall on a huge row.
MAX_TEXT = 1_000_000  # the ceiling of `[limits] max_text` (default 200,000 characters)
MAX_ID = 64  # characters of a worker, task or key id
MAX_ATTACHMENTS = 16
MAX_ATTACHMENT = 200_000  # characters of one attachment
MAX_TOOLS = 64
MAX_DEPTH = 64  # levels of nesting in a task's arguments (tool definitions nest)
MAX_POSITION = 2**63 - 1  # a log position a store can hold
MAX_TOOL_RESULTS = 128  # tool results one task sends back
MAX_ARGS_BYTES = 1024 * 1024  # one task's arguments, encoded (ADR-0006)

WorkerId = Annotated[
    str,
    Field(
        pattern=ID_PATTERN,
        description="A profile id, e.g. `coder`, `docs` (see task_list(view='profiles')).",
    ),
]


def _title(name: str, _info: Any) -> str:
    return name.replace("_", " ").capitalize()


class _Args(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        field_title_generator=_title,
    )


class MemoryPayload(_Args):
    """The payload of the memory ops: `memory.put` {key, value, tags}, `memory.link`
    {from_key, to_key, type}, `memory.done` {task_id, summary}."""

    key: str | None = Field(None, description="memory.put: the note's key.")
    value: str | None = Field(None, description="memory.put: the note's text (may be empty).")
    tags: list[str] = Field([], max_length=64, description="memory.put: optional tags.")
    from_key: str | None = Field(None, description="memory.link: source.")
    to_key: str | None = Field(None, description="memory.link: target.")
    type: str | None = Field(None, max_length=200, description="memory.link: the link's type.")
    task_id: str | None = Field(
        None, max_length=MAX_ID, description="memory.done: the task that is done."
    )
    summary: str | None = Field(None, description="memory.done: what the task achieved.")


class WorkerPayload(_Args):
    """The payload of the worker ops."""

    worker_id: WorkerId
    model: str | None = Field(
        None,
        max_length=200,
        description="worker.model.set (required): a tag (`auto`, `auto:fast`, `auto:vision`, "
        "`auto:docs`) or `provider/model`.",
    )
    model_policy: ModelPolicy | None = Field(
        None,
        description="worker.model.set: `sticky` (default) pins the resolved model; `dynamic` "
        "re-resolves the tag at every task.",
    )
    respawn: bool = Field(
        False,
        description="worker.model.set/reset: start the process the new model asks for now, "
        "and retire the one this session used (if no other session used it).",
    )
    force_new: bool = Field(False, description="worker.spawn: never reuse a running process.")


class SessionPayload(_Args):
    """The payload of `session.fork`."""

    from_session_id: str = Field(
        pattern=ID_PATTERN, description="session.fork (required): the session to fork from."
    )
    position: int = Field(
        ge=0,
        le=MAX_POSITION,
        description="session.fork (required): the log position whose overrides the new "
        "session starts with (see task_list(view='events')).",
    )


class ToolResult(_Args):
    """The result of one tool call the previous turn's reply asked for."""

    tool_call_id: str = Field(
        min_length=1,
        max_length=200,
        description="The `id` of the call in the continued task's `tool_calls`.",
    )
    content: str = Field(
        description="What the tool returned, as text (JSON as a string if it is structured)."
    )


class TaskStartArgs(_Args):
    """Start a task on the LLM worker orchestrator.

    `kind="worker"` sends `task` (a prompt) to the worker `worker_id` and needs both; the
    reply is read with task_await. `continue_from` continues an earlier worker task's
    conversation, and `tool_results` answers its tool calls (then `task` may be empty).
    `kind="op"` runs an operation named by `op` with its payload: `memory` for
    memory.put/link/done, `worker` for worker.model.set/reset, worker.spawn and worker.stop,
    `session` for session.fork. Keys may be snake_case or camelCase. The call returns at
    once with a task id; await it for the result.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"kind": {"const": "op"}}, "required": ["kind"]},
                    "then": {"required": ["op"]},
                    "else": {
                        "required": ["workerId"],
                        "anyOf": [{"required": ["task"]}, {"required": ["toolResults"]}],
                    },
                }
            ]
        }
    )

    kind: Literal["worker", "op"] = Field(
        "worker",
        description="`worker` (default): send `task` to a worker. `op`: run the operation `op`.",
    )
    worker_id: WorkerId | None = Field(
        None,
        description="kind=worker (required): the worker profile to send the task to, e.g. "
        "`coder` or `docs`.",
    )
    task: str | None = Field(
        None,
        description="kind=worker (required unless tool_results are given): the prompt text.",
    )
    model: str | None = Field(
        None,
        max_length=200,
        description="kind=worker (optional): a model for this task only, a tag or "
        "`provider/model`; otherwise the session's or the profile's model serves.",
    )
    auto_spawn: bool = Field(
        True,
        description="kind=worker: start a worker process when none runs (default true).",
    )
    force_new: bool = Field(
        False, description="kind=worker: never reuse a running process; start a fresh one."
    )
    attachments: list[Annotated[str, Field(max_length=MAX_ATTACHMENT)]] = Field(
        [], max_length=MAX_ATTACHMENTS, description="kind=worker: files or URLs for the model."
    )
    tools: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_TOOLS,
        description="kind=worker: OpenAI function-tool definitions, passed to the model as "
        "they are; tool calls come back in the record's `tool_calls`.",
    )
    continue_from: str | None = Field(
        None,
        max_length=MAX_ID,
        description="kind=worker (optional): the task id of an earlier worker task (any "
        "session) whose conversation this task continues: the model gets its whole history "
        "(system prompt, earlier messages, replies and tool results), then `task`. "
        "Continuing from an earlier turn of a chain branches the conversation there.",
    )
    tool_results: list[ToolResult] | None = Field(
        None,
        max_length=MAX_TOOL_RESULTS,
        description="kind=worker, with continue_from (optional): the results of the tool "
        "calls that task's reply asked for, one per call, each as "
        "{toolCallId, content}; sent as `tool` messages. `task` may then be empty (no new "
        "user message).",
    )
    op: Op | None = Field(None, description="kind=op (required): the operation to run.")
    memory: MemoryPayload | None = Field(
        None, description="kind=op, op=memory.*: the note, link or summary."
    )
    worker: WorkerPayload | None = Field(
        None, description="kind=op, op=worker.*: which worker and what to do with it."
    )
    session: SessionPayload | None = Field(
        None,
        description="kind=op, op=session.fork: the session and log position to fork from.",
    )


# Each op's payload group and its required fields: the one list of op names besides `Op`
# (checked against it below); the op deciders (`ops.DECIDERS`) are keyed from it too.
OP_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "memory.put": ("memory", ("key", "value")),
    "memory.link": ("memory", ("from_key", "to_key", "type")),
    "memory.done": ("memory", ("task_id", "summary")),
    "worker.model.set": ("worker", ("worker_id", "model")),
    "worker.model.reset": ("worker", ("worker_id",)),
    "worker.spawn": ("worker", ("worker_id",)),
    "worker.stop": ("worker", ("worker_id",)),
    "session.fork": ("session", ("from_session_id", "position")),
}
# A new op is named in both, or the schema drifts (checked when the module loads).
assert set(OP_FIELDS) == set(get_args(Op)), "api.OP_FIELDS and api.Op name other ops"
_KIND_FIELDS = {
    "worker": (
        "worker_id",
        "task",
        "model",
        "auto_spawn",
        "force_new",
        "attachments",
        "tools",
        "continue_from",
        "tool_results",
    ),
    "op": ("op", "memory", "worker", "session"),
}


def parse_task_args(payload: dict[str, Any]) -> TaskStartArgs:
    """Validate a `task_start` payload; raise `InvalidTaskArgs` naming every bad field."""
    problems = _both_spellings(payload)
    if problems:
        raise InvalidTaskArgs(_paragraph(problems))
    try:
        args = TaskStartArgs.model_validate(payload)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {_message(err)}"
            for err in exc.errors()
        ]
        raise InvalidTaskArgs(_paragraph(problems)) from None
    # What the schema takes but no store can hold: lone surrogates, numbers beyond 64 bits,
    # NaN, values JSON lacks.
    problems = [
        p for key, value in payload.items() if (p := json_problem(value, key, 0, MAX_DEPTH))
    ]
    if problems:
        raise InvalidTaskArgs(_paragraph(problems))
    other = "op" if args.kind == "worker" else "worker"
    problems = [
        f'{f}: belongs to kind="{other}", not kind="{args.kind}"'
        for f in _KIND_FIELDS[other]
        if f in args.model_fields_set
    ]
    if args.kind == "worker":
        # Tool results may stand alone: `task` is then optional.
        required = ("worker_id",) if args.tool_results else ("worker_id", "task")
        problems += [
            f'{f}: Field required for kind="worker"' for f in required if getattr(args, f) is None
        ]
        if args.tool_results is not None and args.continue_from is None:
            problems.append(
                "tool_results: needs continue_from, the task whose tool calls they answer"
            )
    elif args.op is None:
        problems.append('op: Field required for kind="op"')
    else:
        group, fields = OP_FIELDS[args.op]
        payload_obj = getattr(args, group)
        if payload_obj is None:
            problems.append(f'{group}: Field required for op "{args.op}"')
        else:
            problems += [
                f'{group}.{f}: Field required for op "{args.op}"'
                for f in fields
                if getattr(payload_obj, f) is None
            ]
        problems += [
            f'{unused}: does not belong to op "{args.op}" (use {group})'
            for unused in ("memory", "worker", "session")
            if unused != group and unused in args.model_fields_set
        ]
    if problems:
        raise InvalidTaskArgs(_paragraph(problems))
    return args


@functools.lru_cache(maxsize=256)
def _camel(key: str) -> str:
    # Payload keys repeat on every call; the alias generator is a handful of regexes.
    return to_camel(key)


def _both_spellings(payload: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys given twice, as snake_case and as camelCase: one clear error each."""
    problems = []
    for key, value in payload.items():
        camel = _camel(key)
        if camel != key and camel in payload:
            problems.append(f"{prefix}{key}: given twice, as {key} and {camel}; give one")
        if isinstance(value, dict) and key in ("memory", "worker", "session"):
            problems += _both_spellings(value, f"{key}.")
        if isinstance(value, list) and camel == "toolResults":
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    problems += _both_spellings(item, f"{key}.{i}.")
    return problems


def _message(err: Any) -> str:
    if err["type"] == "string_pattern_mismatch":
        return f"must be {ID_RULE}; got {str(err.get('input'))[:80]!r}"
    if err["type"] in ("string_too_long", "too_long"):
        limit = err.get("ctx", {}).get("max_length")
        return f"too long: the limit is {limit} (see docs/task-api.md)"
    return str(err["msg"])


def check_limits(args: TaskStartArgs, max_text: int) -> None:
    """The configured text limit (`[limits] max_text`), below the schema's ceiling."""
    texts = {"task": args.task}
    for i, result in enumerate(args.tool_results or ()):
        texts[f"tool_results.{i}.content"] = result.content
    if args.memory is not None:
        texts |= {f"memory.{f}": getattr(args.memory, f) for f in ("key", "value", "summary")}
    problems = [
        f"{name}: too long: the limit is {max_text} (see docs/task-api.md)"
        for name, text in texts.items()
        if text is not None and len(text) > max_text
    ]
    if problems:
        raise InvalidTaskArgs(_paragraph(problems))


def recorded_args(args: TaskStartArgs, max_text: int) -> dict[str, Any]:
    """The arguments as `TaskStarted` records them, once they pass the configured text
    limit (`check_limits`) and, encoded, `MAX_ARGS_BYTES`."""
    check_limits(args, max_text)
    recorded = args.model_dump(mode="json", exclude_none=True)
    encoded = len(orjson.dumps(recorded))  # what TaskStarted will hold, dumped once
    if encoded > MAX_ARGS_BYTES:
        raise InvalidTaskArgs(
            f"Invalid task_start arguments: arguments: {encoded:,} bytes once encoded; "
            f"the limit for one task is {MAX_ARGS_BYTES:,} (see docs/task-api.md)."
        )
    return recorded


def check_session_id(session_id: str) -> str:
    """A session id follows the id rule, or `InvalidTaskArgs` says the rule."""
    try:
        return check_id(session_id)
    except ValueError:
        shown = session_id[:80] + ("..." if len(session_id) > 80 else "")
        raise InvalidTaskArgs(
            f"Invalid session id {shown!r}: a session id must be {ID_RULE}."
        ) from None


def id_problem(value: Any, what: str = "a task id") -> str | None:
    """What keeps `value` from being an id a store can look up (text, valid Unicode, at
    most `MAX_ID` characters), or None."""
    problem = "must be text" if not isinstance(value, str) else json_problem(value, "")
    if problem is None and len(value) > MAX_ID:
        problem = f"too long: {what} is at most {MAX_ID} characters"
    return None if problem is None else problem.removeprefix("the value: ")


def check_task_id(task_id: Any) -> str:
    """A task id a store can look up, or `InvalidTaskArgs` naming what is wrong with it."""
    problem = id_problem(task_id)
    if problem is None:
        return str(task_id)
    shown = _printable(repr(task_id)[:80])
    raise InvalidTaskArgs(f"Invalid task id {shown}: task_id: {problem}.")


def _printable(text: str) -> str:
    # A message that quotes a lone surrogate could not be printed or stored: escape it.
    return text.encode("utf-8", "backslashreplace").decode()


def _paragraph(problems: list[str]) -> str:
    return _printable("Invalid task_start arguments: " + "; ".join(problems) + ".")


class TaskHandle(BaseModel):
    """What `task_start` returns at once."""

    task_id: str
    status: str


class WorkerView(BaseModel):
    """A profile as this session sees it now (the `workers` view)."""

    worker_id: str
    backend: str
    status: str
    model: str | None
    model_ref: str
    model_policy: ModelPolicy
    reason: str
    instance_id: str | None = None
    pid: int | None = None
    url: str | None = None
    fingerprint: str | None = None


class ProfileView(BaseModel):
    """A configured profile (the `profiles` view)."""

    worker_id: str
    name: str
    model: str
    backend: str
    purpose: str
    when_to_use: str


class MemoryItem(BaseModel):
    """One row of the `memory` view: a note, a link or a done summary."""

    kind: Literal["note", "link", "done"]
    key: str | None = None
    value: str | None = None
    tags: list[str] = []
    from_key: str | None = None
    to_key: str | None = None
    type: str | None = None
    task_id: str | None = None
    summary: str | None = None
    session_id: str | None = None


class ConversationRow(BaseModel):
    """One message of a worker task's request, or its reply (the `conversation` view)."""

    task_id: str  # the turn (task) the message belongs to
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    model: str | None  # the model that served the message's turn


class UsageRow(BaseModel):
    """One row of the `usage` view: what a (session, worker, model) consumed."""

    session_id: str
    worker_id: str
    model: str
    tasks: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


def round_cost(cost_usd: float) -> float:
    """A cost in USD to 12 significant digits: the float noise of pricing (`3 * 0.1 / 1e6`
    is 3.0000000000000004e-07) is not shown as if it were a price."""
    return float(f"{cost_usd:.12g}")
