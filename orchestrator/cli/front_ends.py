"""The commands that serve or send elsewhere: mcp, export-otel, ui, and the offline demo."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli.core import Settings, fail, session
from orchestrator.cli.output import out


def mcp(
    ctx: typer.Context,
    session_id: Annotated[
        str | None,
        typer.Option("--session", metavar="ID", help="Resume this session (default: a new one)."),
    ] = None,
) -> None:
    """Serve the Task API as an MCP server over stdio (one session per server process)."""
    import importlib.util

    if importlib.util.find_spec("mcp") is None:
        raise fail("the mcp extra is not installed: pip install 'eventlog-orchestrator[mcp]'")
    from events.store import StoreError
    from orchestrator.mcp_server import serve
    from orchestrator.orchestrator import Orchestrator

    s: Settings = ctx.obj
    try:  # no --session either side of `mcp`: a new session for this server process
        orch = Orchestrator.open(config=s.config, store=s.store, session_id=session_id or s.session)
    except (StoreError, OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    try:
        serve(orch)
    except KeyboardInterrupt:
        pass
    finally:
        orch.close()


def export_otel(
    ctx: typer.Context,
    session_filter: Annotated[
        str | None, typer.Option("--session", metavar="ID", help="Only this session's tasks.")
    ] = None,
) -> None:
    """Send the spans of a recorded log over OTLP (settings from the OTEL_* variables); exit 1
    when the receiver did not take every span."""
    from orchestrator import telemetry
    from orchestrator.config import ConfigError

    if not telemetry.available():
        raise fail("the otel extra is not installed: pip install 'eventlog-orchestrator[otel]'")
    with session(ctx) as orch:
        records = orch.log.records()
    try:
        done = telemetry.export_log(records, session_filter)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if done.delivered < done.spans:
        raise fail(
            f"delivered {done.delivered} of {done.spans} spans to {done.endpoint}: {done.problem}",
            code=1,
        )
    typer.echo(f"exported {done.spans} spans", err=True)


def demo(
    store: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Store URL (default: a temporary SQLite file)."),
    ] = None,
) -> None:
    """Offline walk-through: set/reset, reuse, refusal, force_new, the log and explain."""
    from events.store import StoreError
    from orchestrator.demo import run_demo

    try:
        run_demo(out.real(), store)
    except StoreError as exc:
        raise fail(str(exc)) from None


def ui(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(metavar="HOST", help="Address to bind (default: loopback only).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", min=0, max=65535, help="Port (0: any free one).")
    ] = 8765,
) -> None:
    """Serve a local web inspector of the store (read-only; needs the printed token)."""
    from orchestrator import ui as inspector

    absent = inspector.missing()
    if absent is not None:
        raise fail(
            f"the ui extra is not installed ({absent} is missing): "
            "pip install 'eventlog-orchestrator[ui]'"
        )
    from events.store import StoreError

    s: Settings = ctx.obj
    try:
        inspector.serve(s.store, s.config, host, port)
    except KeyboardInterrupt:
        return
    except (StoreError, ValueError) as exc:  # ConfigError is a ValueError
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
