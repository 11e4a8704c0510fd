"""What the CLI prints: rich consoles made on first use, tables or JSON of rows, model text
cleaned for a terminal, a task awaited and shown."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import typer

from orchestrator.cli.core import fail, session

if TYPE_CHECKING:  # pydantic and the orchestrator load when a command needs them
    from pydantic import BaseModel

    from orchestrator.orchestrator import Orchestrator


class _Console:
    """rich's Console, made on first use: `--help` and commands that print nothing through
    it skip importing rich's console (about 30 ms)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def real(self) -> Any:
        """The rich Console itself."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False)

# Terminal control sequences (CSI, OSC, other escapes), control characters other than
# newline and tab, and the bidirectional-text controls (embeddings, overrides, isolates and
# marks): model text must not retitle, clear or rewrite the user's terminal, nor make what
# is shown read differently from what was said.
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST
    r"|\x1b[@-Z\\-_]?"  # other escapes, or a lone ESC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
    r"|[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]"  # bidi controls
)


def printable(text: str) -> str:
    """Model text made safe for a terminal: control sequences and bidi controls removed,
    newlines and tabs kept. (`--json` output is exact; only people's output is cleaned.)"""
    return _CONTROL.sub("", text)


def dumps(value: Any, **options: Any) -> str:
    """`json.dumps`, imported on first use."""
    import json  # on first use: `--help` never needs it

    return json.dumps(value, **options)


def emit(
    rows: Sequence[BaseModel], as_json: bool, columns: Sequence[str], title: str | None = None
) -> None:
    """Print rows as a table, or as a JSON array of objects."""
    if as_json:
        out.print_json(dumps([r.model_dump(mode="json") for r in rows]))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col)
    for row in rows:
        data = row.model_dump(mode="json")
        table.add_row(*[Text(printable(cell(data.get(c)))) for c in columns])  # no markup
    out.print(table)


# Event fields people rarely need in a table; `--json` has them all.
_QUIET = {
    "version",
    "args",
    "claim_id",
    "claimant_started_at",
    "pid_started_at",
    "requested_fingerprint",
    "response",
    "result",
    "identity",
    "config",
}


def cell(value: Any) -> str:
    """One value as a table cell: floats short, objects as `key=value` without the quiet
    fields, lists as JSON."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return " ".join(
            f"{k}={cell(v)}"
            for k, v in value.items()
            if k not in _QUIET and v not in (None, "", [], False)
        )
    if isinstance(value, list):
        return dumps(value)
    return str(value)


def finish_task(
    orch: Orchestrator,
    task_id: str,
    as_json: bool,
    label: str,
    describe: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """Wait for a task (with a status line), print it, exit 1 if it failed. An op's result
    is printed as `describe` says in one line, else as JSON."""
    with err.status(f"{label} (spawning or reusing a worker)..."):
        rec = orch.task_await(task_id)
    if as_json:
        out.print_json(rec.model_dump_json())
    elif rec.status == "completed":
        if rec.kind == "worker":
            text = rec.response
        elif describe is not None and rec.result is not None:
            text = describe(rec.result)
        else:
            text = dumps(rec.result, indent=2)
        typer.echo(printable(text or ""))  # as it is: rich would expand the tabs
        for call in rec.tool_calls or ():  # what to answer with `run --continue --tool-result`
            function = call.get("function") or {}
            typer.echo(
                printable(
                    f"tool call {call.get('id')}: {function.get('name')}"
                    f"({function.get('arguments', '')})"
                )
            )
    if rec.status != "completed":
        raise fail(str(rec.error or rec.status), code=1)


def one_row(ctx: typer.Context, as_json: bool, view: str, **filters: Any) -> Any:
    """A one-row view: printed as JSON (and None returned) with --json, else returned."""
    with session(ctx) as orch:
        row = orch.task_list(view=view, **filters)[0]
    if as_json:
        out.print_json(row.model_dump_json())
        return None
    return row


EVENT_COLUMNS = ["position", "timestamp", "type", "session_id", "worker_id", "task_id", "data"]
