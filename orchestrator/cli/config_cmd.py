"""The commands about the configuration: config check, and the tool schema."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from orchestrator.cli.core import Settings, fail
from orchestrator.cli.output import dumps, out


def schema() -> None:
    """Print the tool schema of task_start as JSON, in the dialect every LLM host accepts."""
    from orchestrator.tool_schema import task_start_schema

    out.print_json(dumps(task_start_schema()))


def config_check(ctx: typer.Context) -> None:
    """Load the configuration, say which model each tag resolves to, and check that every
    model it names resolves. Problems exit 2; warnings alone (e.g. an unset API key
    variable) still exit 0."""
    from orchestrator.config import ConfigError, discover_config_path, display_path, load_config
    from orchestrator.resolver import check_config

    s: Settings = ctx.obj
    path = Path(s.config) if s.config else discover_config_path()
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    where = display_path(path) if path else "built-in default"
    report = check_config(cfg, os.environ)
    for line in report.warnings:
        typer.echo(f"warning: {where}: {line}", err=True)
    if report.problems:
        for line in report.problems:
            typer.echo(f"{where}: {line}", err=True)
    else:
        count = len(report.warnings)
        warned = f" ({count} warning{'s' if count > 1 else ''})" if count else ""
        typer.echo(
            f"ok: {where}: {len(cfg.providers)} providers, {len(cfg.profiles)} profiles{warned}"
        )
    for line in report.tags:
        typer.echo(line)
    from orchestrator.model_servers import managed_commands

    for line in managed_commands(cfg):
        typer.echo(line)
    if report.problems:
        raise typer.Exit(2)
