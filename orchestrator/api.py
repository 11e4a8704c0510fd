"""The Task API's shapes: `task_start` arguments (the tool schema), handles and view rows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from events.catalogue import ModelPolicy

Op = Literal[
    "memory.put",
    "memory.link",
    "memory.done",
    "worker.model.set",
    "worker.model.reset",
    "worker.spawn",
    "worker.stop",
]
View = Literal[
    "tasks", "workers", "registry", "models", "profiles", "memory", "events", "replay", "explain"
]


class InvalidTaskArgs(ValueError):
    """`task_start` arguments that break the schema; the message names each bad field."""


class _Args(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class MemoryPayload(_Args):
    """`memory={...}` of the memory ops: put {key, value, tags}, link {from_key, to_key,
    type}, done {task_id, summary}."""

    key: str | None = None
    value: str | None = None
    tags: list[str] = []
    from_key: str | None = None
    to_key: str | None = None
    type: str | None = None
    task_id: str | None = None
    summary: str | None = None


class WorkerPayload(_Args):
    """`worker={...}` of the worker ops."""

    worker_id: str
    model: str | None = None
    model_policy: ModelPolicy | None = None
    respawn: bool = False
    force_new: bool = False


class TaskStartArgs(_Args):
    """Arguments of `task_start`, in snake_case or camelCase. Its JSON schema is the tool
    schema an LLM calls the orchestrator with."""

    kind: Literal["worker", "op"] = "worker"
    worker_id: str | None = None
    task: str | None = None
    model: str | None = None
    auto_spawn: bool = True
    force_new: bool = False
    attachments: list[str] = []
    tools: list[dict[str, Any]] | None = None
    op: Op | None = None
    memory: MemoryPayload | None = None
    worker: WorkerPayload | None = None


_REQUIRED: dict[str, tuple[str, tuple[str, ...]]] = {
    "memory.put": ("memory", ("key", "value")),
    "memory.link": ("memory", ("from_key", "to_key", "type")),
    "memory.done": ("memory", ("task_id", "summary")),
    "worker.model.set": ("worker", ("worker_id", "model")),
    "worker.model.reset": ("worker", ("worker_id",)),
    "worker.spawn": ("worker", ("worker_id",)),
    "worker.stop": ("worker", ("worker_id",)),
}


def parse_task_args(payload: dict[str, Any]) -> TaskStartArgs:
    """Validate a `task_start` payload; raise `InvalidTaskArgs` naming every bad field."""
    try:
        args = TaskStartArgs.model_validate(payload)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise InvalidTaskArgs(_paragraph(problems)) from None
    problems = []
    if args.kind == "worker":
        problems += [
            f'{f}: Field required for kind="worker"'
            for f in ("worker_id", "task")
            if not getattr(args, f)
        ]
    elif args.op is None:
        problems.append('op: Field required for kind="op"')
    else:
        group, fields = _REQUIRED[args.op]
        payload_obj = getattr(args, group)
        if payload_obj is None:
            problems.append(f'{group}: Field required for op "{args.op}"')
        else:
            problems += [
                f'{group}.{f}: Field required for op "{args.op}"'
                for f in fields
                if not getattr(payload_obj, f)
            ]
    if problems:
        raise InvalidTaskArgs(_paragraph(problems))
    return args


def _paragraph(problems: list[str]) -> str:
    return "Invalid task_start arguments: " + "; ".join(problems) + "."


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


class UsageRow(BaseModel):
    """One row of the `usage` view: what a (session, worker, model) consumed."""

    session_id: str
    worker_id: str
    model: str
    tasks: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
