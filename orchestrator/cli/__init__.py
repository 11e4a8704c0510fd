"""`orchestrator`: thin commands over the Task API, tables for people and `--json` for programs.

Exit codes: 0 success, 1 a task failed, 2 bad usage (bad arguments, unknown worker or task,
bad or unreadable store). Errors are one line on stderr.

The package by concern: `core` (the app, global options, `session`, `fail`), `output`
(printing), and the commands in `tasks`, `inspect`, `timeline`, `config_cmd` and
`front_ends`. Every command module imports only typer and this package at the top (each
command imports what it needs when it runs), so importing them all here costs `--help`
nothing; they are registered below, in the order `--help` lists them.
"""

from __future__ import annotations

import os

import typer

from orchestrator.cli import inspect
from orchestrator.cli.config_cmd import config_check, schema
from orchestrator.cli.core import (
    GLOBAL_OPTIONS,
    JsonOpt,
    RespawnOpt,
    Settings,
    WorkerArg,
    app,
    config_app,
    explain_app,
    fail,
    main_options,
    session,
)
from orchestrator.cli.front_ends import demo, export_otel, mcp, ui
from orchestrator.cli.inspect import explain_task, explain_worker, usage_cmd
from orchestrator.cli.output import (
    EVENT_COLUMNS,
    emit,
    err,
    finish_task,
    one_row,
    out,
    printable,
)
from orchestrator.cli.tasks import conversation, logs, reset_model, run, set_model, stop
from orchestrator.cli.timeline import EVENTS_PAGE, diff_cmd, events_cmd, fork, replay, whatif

__all__ = [
    "EVENTS_PAGE",
    "EVENT_COLUMNS",
    "GLOBAL_OPTIONS",
    "JsonOpt",
    "RespawnOpt",
    "Settings",
    "WorkerArg",
    "app",
    "config_app",
    "config_check",
    "conversation",
    "demo",
    "diff_cmd",
    "emit",
    "err",
    "events_cmd",
    "explain_app",
    "explain_task",
    "explain_worker",
    "export_otel",
    "fail",
    "finish_task",
    "fork",
    "logs",
    "main",
    "main_options",
    "mcp",
    "one_row",
    "out",
    "printable",
    "replay",
    "reset_model",
    "run",
    "schema",
    "session",
    "set_model",
    "stop",
    "ui",
    "usage_cmd",
    "whatif",
]

app.command()(run)
app.command("set-model")(set_model)
app.command("reset-model")(reset_model)
app.command()(stop)
app.command()(logs)
app.command("workers")(inspect.workers)
app.command("registry")(inspect.registry)
app.command("models")(inspect.models)
app.command("profiles")(inspect.profiles)
app.command("events")(events_cmd)
app.command()(replay)
app.command()(whatif)
app.command()(fork)
app.command("diff")(diff_cmd)
explain_app.command("task")(explain_task)
explain_app.command("worker")(explain_worker)
app.command("conversation")(conversation)
app.command()(schema)
app.command()(mcp)
app.command("export-otel")(export_otel)
app.command("usage")(usage_cmd)
config_app.command("check")(config_check)
app.command()(demo)
app.command()(ui)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("COLUMNS", "160")  # tables in pipes and CI logs stay readable
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - a bug prints one line, never a traceback
        # typer would show every frame's locals, credentials included.
        from orchestrator.providers import internal_error

        typer.echo(f"error: {internal_error(exc)}", err=True)
        raise SystemExit(1) from None
