"""The commands that read the state: the view tables (workers, registry, models, profiles),
explain and usage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from orchestrator.cli.core import JsonOpt, WorkerArg, reader, session
from orchestrator.cli.output import EVENT_COLUMNS, emit, one_row, out


def _view_command(
    view: str, columns: list[str], doc: str, needs_store: bool = True
) -> Callable[..., None]:
    """The command `orchestrator <view> [--json]`: one Task API view as a table or JSON."""

    def command(ctx: typer.Context, as_json: JsonOpt = False) -> None:
        if not needs_store:  # the configuration's view: read, no orchestrator opened
            from orchestrator import views
            from orchestrator.reading import NO_WRITES

            with reader(ctx) as context:
                emit(views.run(view, context, NO_WRITES), as_json, columns)
            return
        with session(ctx) as orch:
            emit(orch.task_list(view=view), as_json, columns)

    command.__doc__ = doc
    return command


workers = _view_command(
    "workers",
    ["worker_id", "backend", "status", "model", "model_policy", "pid", "reason"],
    "Profiles with this session's effective model and process.",
)
registry = _view_command(
    "registry",
    [
        *("kind", "worker_id", "instance_id", "host", "pid", "port"),
        *("status", "model", "model_policy", "memory_mb"),
    ],
    "Every worker process and managed model server in the device registry.",
)
models = _view_command(
    "models",
    ["model", "source", "usable", "vision", "tool_call", "context", "cost_input"],
    "The model catalogue.",
    needs_store=False,
)
profiles = _view_command(
    "profiles",
    ["worker_id", "name", "model", "backend", "purpose"],
    "The configured worker profiles.",
    needs_store=False,
)


def explain_task(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="A task id.")],
    as_json: JsonOpt = False,
) -> None:
    """Which model served a task, which process, and the events that decided it."""
    expl = one_row(ctx, as_json, "explain", task_id=task_id)
    if expl is None:
        return
    for line in expl.summary:
        out.print(f"- {line}", markup=False)
    emit(expl.chain, False, EVENT_COLUMNS, title="events")


def explain_worker(ctx: typer.Context, worker_id: WorkerArg, as_json: JsonOpt = False) -> None:
    """A worker's current effective model for this session and its process history."""
    expl = one_row(ctx, as_json, "explain", worker_id=worker_id)
    if expl is None:
        return
    out.print(
        f"{expl.worker_id} in session {expl.session_id}: {expl.model} "
        f"({expl.model_policy}) - {expl.reason}",
        markup=False,
    )
    if expl.override:
        out.print(f"override set at position {expl.override.position}", markup=False)
    emit(
        expl.processes,
        False,
        ["instance_id", "host", "pid", "status", "model", "model_policy", "started_at"],
        title="processes",
    )
    emit(expl.history, False, EVENT_COLUMNS, title="history")


def usage_cmd(
    ctx: typer.Context,
    all_: Annotated[
        bool, typer.Option("--all", metavar="", help="Every session, not only this one.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokens and cost per session, worker and model, with totals."""
    from orchestrator.api import UsageRow, round_cost

    with session(ctx) as orch:
        rows = orch.task_list(view="usage", **({"session_id": None} if all_ else {}))
    if as_json:
        emit(rows, True, [])
        return
    costs = [r.cost_usd for r in rows if r.cost_usd is not None]
    total = UsageRow(
        session_id="total",
        worker_id="",
        model="",
        tasks=sum(r.tasks for r in rows),
        input_tokens=sum(r.input_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        cost_usd=round_cost(sum(costs)) if costs else None,
    )
    emit(
        [*rows, total],
        False,
        ["session_id", "worker_id", "model", "tasks", "input_tokens", "output_tokens", "cost_usd"],
    )
