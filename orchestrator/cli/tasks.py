"""The commands that start tasks or act on processes: run, set-model, reset-model, stop, and
the logs and conversation they leave."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.core import JsonOpt, RespawnOpt, WorkerArg, fail, session
from orchestrator.cli.output import dumps, emit, finish_task, out, printable


def run(
    ctx: typer.Context,
    worker: WorkerArg,
    text: Annotated[str, typer.Argument(metavar="TEXT", help="The task's prompt.")],
    model: Annotated[
        str | None, typer.Option(metavar="MODEL", help="Model for this task only.")
    ] = None,
    force_new: Annotated[
        bool, typer.Option("--force-new", metavar="", help="Never reuse a process.")
    ] = False,
    continue_from: Annotated[
        str | None,
        typer.Option(
            "--continue",
            metavar="TASK_ID",
            help="Continue that worker task's conversation: the model gets its history first.",
        ),
    ] = None,
    tool_result: Annotated[
        list[str] | None,
        typer.Option(
            "--tool-result",
            metavar="CALL_ID=TEXT",
            help="With --continue: the result of one of that task's tool calls (repeat the "
            "option for each call); TEXT may then be empty.",
        ),
    ] = None,
    tools_file: Annotated[
        Path | None,
        typer.Option(
            "--tools", metavar="FILE", help="A JSON file of OpenAI function-tool definitions."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a task on a worker and print its reply (and the tool calls it asks for)."""
    results = None
    if tool_result:
        pairs = [r.partition("=") for r in tool_result]
        bad = [r for r, (_, eq, _) in zip(tool_result, pairs, strict=True) if not eq]
        if bad:
            raise fail(f"--tool-result: expected CALL_ID=TEXT, got {bad[0]!r}")
        results = [{"tool_call_id": i, "content": text} for i, _, text in pairs]
    tools = _tools_file(tools_file) if tools_file is not None else None
    with session(ctx, create=True) as orch:
        handle = orch.task_start(
            kind="worker",
            worker_id=worker,
            task=text,
            model=model,
            force_new=force_new,
            continue_from=continue_from,
            tool_results=results,
            tools=tools,
        )
        finish_task(orch, handle.task_id, as_json, f"running on {worker}")


def _tools_file(path: Path) -> Any:
    """The tool definitions of a `--tools` file, or one line saying what is wrong with it."""
    import json

    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise fail(f"--tools: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise fail(f"--tools: {path} is not JSON: {exc}") from None


def set_model(
    ctx: typer.Context,
    worker: WorkerArg,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A tag or provider/model.")],
    policy: Annotated[
        str, typer.Option(metavar="POLICY", help="sticky (pin the model) or dynamic.")
    ] = "sticky",
    respawn: RespawnOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Set this session's model for a worker."""
    with session(ctx, create=True) as orch:
        handle = orch.task_start(
            kind="op",
            op="worker.model.set",
            worker={
                "worker_id": worker,
                "model": model,
                "model_policy": policy,
                "respawn": respawn,
            },
        )
        finish_task(
            orch,
            handle.task_id,
            as_json,
            f"setting {worker}",
            lambda r: (
                f"{r['worker_id']} uses {r['model']} in session {orch.session_id} "
                + _model_because(r)
            ),
        )


def _model_because(result: dict[str, Any]) -> str:
    """The tail of set-model's and reset-model's sentence: policy, reason, respawn."""
    respawned = "; its process was respawned" if result.get("respawned") else ""
    return f"({result['model_policy']}: {result['reason']}){respawned}"


def reset_model(
    ctx: typer.Context,
    worker: WorkerArg,
    respawn: RespawnOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Reset this session's model for a worker to the profile's."""
    with session(ctx, create=True) as orch:
        handle = orch.task_start(
            kind="op", op="worker.model.reset", worker={"worker_id": worker, "respawn": respawn}
        )
        finish_task(
            orch,
            handle.task_id,
            as_json,
            f"resetting {worker}",
            lambda r: (
                f"{r['worker_id']} is back to its profile's model {r['model']} in "
                f"session {orch.session_id} " + _model_because(r)
            ),
        )


def stop(
    ctx: typer.Context,
    worker: Annotated[
        str | None, typer.Argument(metavar="WORKER", help="A worker profile id.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", metavar="", help="Stop every worker.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop a worker's processes on this host (or all workers')."""
    if worker is None and not all_:
        raise fail("give a WORKER to stop, or --all")
    if worker is not None and all_:
        raise fail("give a WORKER or --all, not both")
    with session(ctx) as orch:
        profiles = [p.worker_id for p in orch.task_list(view="profiles")]
        # Managed model servers: `stop --all`, or one named by instance id or model.
        sids = {"session_id": orch.session_id}
        if worker is not None and worker not in profiles:
            stopped, gone = orch.servers.stop_matching(worker, sids)
            if stopped or gone:
                _print_server_stops(stopped, gone, as_json)
                return
        servers = orch.servers.stop_matching(None, sids) if all_ else ([], [])
        ids = [worker] if worker else list(profiles)
        if all_:  # and every worker this host runs a process of, profile or not
            ids += sorted({e.worker_id for e in orch.pool.stoppable()} - set(ids))
        results = []
        for worker_id in ids:
            handle = orch.task_start(kind="op", op="worker.stop", worker={"worker_id": worker_id})
            rec = orch.task_await(handle.task_id)
            if rec.status != "completed":
                raise fail(str(rec.error), code=1)
            results.append(rec.result)
        if as_json:
            if all_:
                results.append({"model_servers": {"stopped": servers[0], "exited": servers[1]}})
            out.print_json(dumps(results))
            return
        lines = _server_stop_lines(*servers)
        for r in results:
            if r and r["stopped"]:
                lines.append(f"{r['worker_id']}: stopped {', '.join(r['stopped'])}")
            if r and r["exited"]:
                lines.append(f"{r['worker_id']}: already gone {', '.join(r['exited'])}")
        out.print("\n".join(lines) or "nothing to stop on this host", markup=False)


def _server_stop_lines(stopped: list[str], gone: list[str]) -> list[str]:
    lines = [f"model server: stopped {', '.join(stopped)}"] if stopped else []
    return lines + ([f"model server: already gone {', '.join(gone)}"] if gone else [])


def _print_server_stops(stopped: list[str], gone: list[str], as_json: bool) -> None:
    if as_json:
        out.print_json(dumps([{"model_servers": {"stopped": stopped, "exited": gone}}]))
    else:
        out.print("\n".join(_server_stop_lines(stopped, gone)), markup=False)


def logs(
    ctx: typer.Context,
    instance: Annotated[
        str, typer.Argument(metavar="SERVER_INSTANCE", help="A model server's instance id.")
    ],
    lines: Annotated[
        int, typer.Option("--lines", "-n", metavar="N", help="Last N lines (0: all).")
    ] = 100,
) -> None:
    """Print a managed model server's log (its stdout and stderr)."""
    from orchestrator.config import did_you_mean
    from orchestrator.model_servers import read_log_tail

    with session(ctx) as orch:
        servers = [r for r in orch.task_list(view="registry") if r.kind == "model_server"]
    found = next((s for s in servers if s.instance_id == instance), None)
    if found is None:
        hint = did_you_mean(instance, [s.instance_id for s in servers])
        raise fail(f'no model server "{instance}" in the registry.{hint}')
    path = Path(found.log_path)
    if not path.is_file():
        raise fail(f"the log of {instance} ({path}) is gone")
    for line in read_log_tail(path, max(0, lines)):
        typer.echo(printable(line))


def conversation(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="A worker task id.")],
    as_json: JsonOpt = False,
) -> None:
    """The messages a worker task's request carried, and its reply, turn by turn."""
    with session(ctx) as orch:
        rows = orch.task_list(view="conversation", task_id=task_id)
    emit(
        rows,
        as_json,
        ["task_id", "role", "model", "content", "tool_calls", "tool_call_id"],
        title=f"conversation of {task_id}",
    )
