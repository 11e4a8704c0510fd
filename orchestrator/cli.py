"""`orchestrator`: thin commands over the Task API, tables for people and `--json` for programs.

Exit codes: 0 success, 1 a task failed, 2 bad usage (bad arguments, unknown worker or task,
bad or unreadable store). Errors are one line on stderr.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

if TYPE_CHECKING:  # the store, pydantic and the orchestrator load when a command needs them
    from pydantic import BaseModel

    from events.store import EventRecord
    from orchestrator.orchestrator import Orchestrator

# The global options that also work after a command's name (`run coder hi --session x`),
# unless that command has an option of the same name (which then defaults to the global).
GLOBAL_OPTIONS = ("--store", "--session")


class _PlainArgument(TyperArgument):
    """An argument shown in help by its metavar alone (`WORKER`, `[M]`), not typer's
    `{WORKER}` in the usage line and `WORKER <str>` in the list."""

    def _plain(self) -> str:
        name = self.metavar or (self.name or "").upper()
        return name + ("..." if self.nargs != 1 else "")

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        """The usage line's piece: `WORKER`, or `[M]` when optional."""
        return [self._plain() if self.required else f"[{self._plain()}]"]

    def get_help_record(self, ctx: Any) -> tuple[str, str] | None:
        """The arguments list's row: the metavar and the help, without a type label."""
        record = super().get_help_record(ctx)
        return None if record is None else (self._plain(), record[1])


class _Root(TyperGroup):
    """The `orchestrator` group: plain metavars in every command's help, and the global
    options accepted after the command name too."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in _commands(self):
            for param in command.params:
                if type(param) is TyperArgument:
                    param.__class__ = _PlainArgument  # the same object, shown plainly

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Parse with the global options moved in front of the command name."""
        return super().parse_args(ctx, _hoist_globals(self, ctx, args))


def _commands(group: TyperGroup) -> Iterator[Any]:
    """Every command under a group, nested groups' included."""
    for command in group.commands.values():
        yield command
        if isinstance(command, TyperGroup):
            yield from _commands(command)


def _options(command: Any) -> dict[str, TyperOption]:
    """A command's options by every spelling (`--store`, `-v`, ...)."""
    return {
        name: p
        for p in command.params
        if isinstance(p, TyperOption)
        for name in (*p.opts, *p.secondary_opts)
    }


def _hoist_globals(root: TyperGroup, ctx: Any, args: list[str]) -> list[str]:
    """`args` with each global option (and its value) found after the command name moved
    just in front of it (so it still wins over one given earlier), unless that command
    has an option of the same name. The other options' values are skipped, so a value
    that looks like `--session` stays a value; everything after `--` is left as it is."""
    kept: list[str] = []
    hoisted: list[str] = []
    command: Any = root
    named_at = 0  # where in `kept` the command's name is
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            kept.extend(args[i:])
            break
        if token.startswith("-") and token != "-":
            name, eq, _ = token.partition("=")
            option = _options(command).get(name)
            if option is None and command is not root and name in GLOBAL_OPTIONS:
                width = 1 if eq else 2
                hoisted.extend(args[i : i + width])
            else:
                takes_value = option is not None and not (option.is_flag or option.count)
                width = 2 if takes_value and not eq else 1
                kept.extend(args[i : i + width])
            i += width
            continue
        if isinstance(command, TyperGroup):
            found = command.get_command(ctx, token)
            if found is None:  # an unknown command: the parser says so
                kept.extend(args[i:])
                break
            if command is root:
                named_at = len(kept)
            command = found
        kept.append(token)
        i += 1
    return [*kept[:named_at], *hoisted, *kept[named_at:]]


app = typer.Typer(
    cls=_Root,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Event-sourced LLM worker orchestrator.",
)
explain_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Why a task or worker has its model."
)
app.add_typer(explain_app, name="explain")
config_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="The configuration the CLI uses."
)
app.add_typer(config_app, name="config")


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

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.", metavar="")]
WorkerArg = Annotated[str, typer.Argument(metavar="WORKER", help="A worker profile id.")]
RespawnOpt = Annotated[
    bool,
    typer.Option(
        "--respawn",
        metavar="",
        help="Start the process the new model asks for now, and retire the one this session "
        "used (if no other session used it).",
    ),
]


@dataclass(frozen=True)
class Settings:
    """Global options shared by every command."""

    store: str | None
    session: str | None  # None: the command's default (`cli`; a new one for `mcp`)
    config: str | None


@app.callback()
def main_options(
    ctx: typer.Context,
    store: Annotated[
        str | None, typer.Option(metavar="URL", help="Store URL (env ORCHESTRATOR_STORE).")
    ] = None,
    session: Annotated[
        str | None,
        typer.Option(
            envvar="ORCHESTRATOR_SESSION", metavar="ID", help="Session id (default: cli)."
        ),
    ] = None,
    config: Annotated[
        str | None, typer.Option(metavar="FILE", help="Path to orchestrator.toml.")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", metavar="", help="Log every event to stderr (JSON lines)."),
    ] = False,
) -> None:
    """Global options."""
    if verbose:
        from events.logs import configure_json_lines

        configure_json_lines()
        import logging  # only `-v` needs it: `--help` and quiet commands skip its import

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        # Only our JSON event lines: the HTTP clients' own request lines stay quiet.
        for noisy in ("httpx", "httpcore", "mcp"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = Settings(store=store, session=session, config=config)
    # A command with its own `--store` or `--session` (`demo`, `events`, `whatif`, ...)
    # takes the global one as its default, so the global option is honoured there too.
    if isinstance(ctx.command, TyperGroup):
        given = {"--store": store, "--session": session}
        ctx.default_map = {**(ctx.default_map or {}), **_defaults_below(ctx.command, given)}


def _defaults_below(group: TyperGroup, given: dict[str, str | None]) -> dict[str, Any]:
    """The `default_map` that hands the given global option values down to the commands
    (under `group`) that have an option of the same name."""
    found: dict[str, Any] = {}
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            below = _defaults_below(command, given)
        else:
            below = {
                option.name: given[spelling]
                for spelling, option in _options(command).items()
                if given.get(spelling) is not None
            }
        if below:
            found[name] = below
    return found


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


def _dumps(value: Any, **options: Any) -> str:
    import json  # on first use: `--help` never needs it

    return json.dumps(value, **options)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear line on stderr (one per problem, each marked `error:`) and return
    the exit to raise."""
    for line in message.splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)  # never wrapped: one line, greppable
    return typer.Exit(code)


@contextmanager
def session(
    ctx: typer.Context, create: bool = False, needs_store: bool = True
) -> Iterator[Orchestrator]:
    """The CLI's session on the chosen store; errors become one line and exit 2.

    Reading never creates: only a command that writes passes `create`; any other, where
    there is no store, says `no orchestrator store at URL` and makes nothing there. A
    command that `needs_store=False` (it shows the configuration) reads an empty
    in-memory log instead."""
    from events.store import EventLog, NoStore, StoreError
    from orchestrator.api import InvalidTaskArgs
    from orchestrator.config import load_config
    from orchestrator.errors import OrchestratorError
    from orchestrator.orchestrator import Orchestrator

    s: Settings = ctx.obj
    log: EventLog | None = None
    try:
        config = load_config(s.config)  # a bad --config is said first: it names the file
        if not create:
            try:
                log = EventLog(s.store, create=False)
            except NoStore:
                if needs_store:
                    raise
                log = EventLog("memory")
        orch = Orchestrator.open(config=config, store=log or s.store, session_id=s.session or "cli")
    except (OrchestratorError, OSError) as exc:
        if log is not None:
            log.close()
        raise fail(str(exc)) from None
    try:
        yield orch
    except (InvalidTaskArgs, StoreError) as exc:
        raise fail(str(exc)) from None
    finally:
        try:
            orch.close()
        except StoreError as exc:
            raise fail(str(exc)) from None
        finally:
            if log is not None:
                log.close()


def emit(
    rows: Sequence[BaseModel], as_json: bool, columns: Sequence[str], title: str | None = None
) -> None:
    """Print rows as a table, or as a JSON array of objects."""
    if as_json:
        out.print_json(_dumps([r.model_dump(mode="json") for r in rows]))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col)
    for row in rows:
        data = row.model_dump(mode="json")
        table.add_row(*[Text(printable(_cell(data.get(c)))) for c in columns])  # no markup
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


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return " ".join(
            f"{k}={_cell(v)}"
            for k, v in value.items()
            if k not in _QUIET and v not in (None, "", [], False)
        )
    if isinstance(value, list):
        return _dumps(value)
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
            text = _dumps(rec.result, indent=2)
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


# --- commands ---------------------------------------------------------------------------------


@app.command()
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


@app.command("set-model")
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


@app.command("reset-model")
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


@app.command()
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
            out.print_json(_dumps(results))
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
        out.print_json(_dumps([{"model_servers": {"stopped": stopped, "exited": gone}}]))
    else:
        out.print("\n".join(_server_stop_lines(stopped, gone)), markup=False)


@app.command()
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


def _view_command(view: str, columns: list[str], doc: str, needs_store: bool = True) -> None:
    """Register `orchestrator <view> [--json]`: one Task API view as a table or JSON."""

    def command(ctx: typer.Context, as_json: JsonOpt = False) -> None:
        with session(ctx, needs_store=needs_store) as orch:
            emit(orch.task_list(view=view), as_json, columns)

    command.__doc__ = doc
    app.command(name=view)(command)


_view_command(
    "workers",
    ["worker_id", "backend", "status", "model", "model_policy", "pid", "reason"],
    "Profiles with this session's effective model and process.",
)
_view_command(
    "registry",
    [
        *("kind", "worker_id", "instance_id", "host", "pid", "port"),
        *("status", "model", "model_policy", "memory_mb"),
    ],
    "Every worker process and managed model server in the device registry.",
)
_view_command(
    "models",
    ["model", "source", "usable", "vision", "tool_call", "context", "cost_input"],
    "The model catalogue.",
    needs_store=False,
)
_view_command(
    "profiles",
    ["worker_id", "name", "model", "backend", "purpose"],
    "The configured worker profiles.",
    needs_store=False,
)


EVENT_COLUMNS = ["position", "timestamp", "type", "session_id", "worker_id", "task_id", "data"]


@app.command("events")
def events_cmd(
    ctx: typer.Context,
    worker: Annotated[str | None, typer.Option(metavar="WORKER", help="Only this worker.")] = None,
    type_: Annotated[
        str | None, typer.Option("--type", metavar="TYPE", help="Only this event type.")
    ] = None,
    session_filter: Annotated[
        str | None,
        typer.Option(
            "--session",
            metavar="ID",
            help="Only this session (default: the global --session, else all).",
        ),
    ] = None,
    task: Annotated[str | None, typer.Option(metavar="ID", help="Only this task.")] = None,
    since: Annotated[
        int, typer.Option(metavar="N", min=0, help="Only events after this position.")
    ] = 0,
    until: Annotated[
        int | None, typer.Option(metavar="N", min=0, help="Only events up to this position.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(metavar="N", min=1, help="At most N events (oldest first).")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", metavar="", help="Keep printing new events (stop: Ctrl-C)."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The event log, filtered in the store and printed as it is read (a table when it
    fits one page, else one line per event)."""
    filters = {"worker_id": worker, "type": type_, "session_id": session_filter, "task_id": task}
    with session(ctx) as orch:
        end = orch.log.head() if until is None else until
        pages = _event_pages(orch, filters, since, end, limit)
        if as_json and not follow:
            _print_json_array(row for page in pages for row in page)
        elif as_json or follow:
            for page in pages:
                _print_stream(page, as_json)
        else:
            first = next(pages, [])
            second = next(pages, None)
            if second is None:
                emit(first, False, EVENT_COLUMNS)
            else:  # too long for one table: stream it, one line per event
                _print_stream(first, False)
                _print_stream(second, False)
                for page in pages:
                    _print_stream(page, False)
        if follow:
            _follow(orch, filters, max(since, end), as_json)


EVENTS_PAGE = 500  # rows read (and held) at a time


def _event_pages(
    orch: Orchestrator, filters: dict[str, Any], since: int, until: int, limit: int | None
) -> Iterator[list[EventRecord]]:
    """The `events` view, a page at a time: each page is one indexed read after the last
    row of the one before, so memory stays flat however many rows match."""
    left = limit
    while left is None or left > 0:
        size = EVENTS_PAGE if left is None else min(EVENTS_PAGE, left)
        rows = orch.task_list(view="events", since=since, until=until, limit=size, **filters)
        if rows:
            yield rows
        if len(rows) < size:
            return
        since = rows[-1].position
        if left is not None:
            left -= len(rows)


def _follow(orch: Orchestrator, filters: dict[str, Any], last: int, as_json: bool) -> None:
    """Print the events appended after position `last` as they land, until SIGINT or
    SIGTERM (whatever disposition the process inherited: `nohup` and CI ignore SIGINT)."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        typer.echo(f"following events after position {last} (Ctrl-C to stop)", err=True)
        while True:
            if not orch.log.wait_for_events(last, timeout=5.0):
                continue
            head = orch.log.head()
            # Events appended after `head` was read come again next time: print up to it.
            for page in _event_pages(orch, filters, last, head, None):
                _print_stream(page, as_json)
            last = head
    except KeyboardInterrupt:
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_json_array(rows: Iterable[BaseModel]) -> None:
    """A JSON array of rows, written as they come (one object a line): never all held."""
    opened = False
    for row in rows:
        sys.stdout.write(("," if opened else "[") + "\n" + row.model_dump_json())
        opened = True
    sys.stdout.write("\n]\n" if opened else "[]\n")
    sys.stdout.flush()


def _print_stream(rows: Sequence[BaseModel], as_json: bool) -> None:
    """Rows one a line: JSON objects, or `column=value` for people."""
    for row in rows:
        if as_json:
            sys.stdout.write(row.model_dump_json() + "\n")
            continue
        data = row.model_dump(mode="json")
        line = " ".join(f"{c}={_cell(data.get(c))}" for c in EVENT_COLUMNS[:-1])
        sys.stdout.write(printable(f"{line} {_cell(data['data'])}") + "\n")
    sys.stdout.flush()


@app.command()
def replay(
    ctx: typer.Context,
    until: Annotated[
        int | None,
        typer.Option(metavar="N", min=0, help="Log position to replay up to (inclusive)."),
    ] = None,
    check_: Annotated[
        bool,
        typer.Option(
            "--check",
            metavar="",
            help="Re-run every recorded model decision on its recorded configuration.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Registry, session overrides and tasks as of log position N; or, with --check,
    whether every recorded model decision still comes out the same (exit 1 if not)."""
    if check_:
        _replay_check(ctx, as_json)
        return
    if until is None:
        raise fail("replay needs --until N (a log position) or --check")
    view = one_row(ctx, as_json, "replay", until=until)
    if view is None:
        return
    out.print(f"state as of position {view.position}")
    emit(
        view.registry,
        False,
        ["worker_id", "instance_id", "pid", "status", "model"],
        title="registry",
    )
    emit(
        view.overrides,
        False,
        ["session_id", "worker_id", "model_ref", "resolved_model", "model_policy"],
        title="session overrides",
    )
    emit(
        view.tasks,
        False,
        ["task_id", "session_id", "kind", "op", "worker_id", "status", "model"],
        title="tasks",
    )


def _replay_check(ctx: typer.Context, as_json: bool) -> None:
    from orchestrator import history

    with session(ctx) as orch:
        report = history.check(orch.log)
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        for d in report.differences:
            out.print(
                f"position {d.position} task {d.task_id} ({d.session_id}/{d.worker_id}): "
                f"{printable(d.detail)}",
                markup=False,
            )
        tail = (
            f" ({report.unchecked} not checked: recorded without a configuration this "
            "version can read)"
            if report.unchecked
            else ""
        )
        if report.ok:
            out.print(f"ok: {report.reproduced} decisions reproduced{tail}", markup=False)
        else:
            out.print(
                f"{len(report.differences)} of {report.checked} decisions came out "
                f"differently{tail}",
                markup=False,
            )
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def whatif(
    ctx: typer.Context,
    config_file: Annotated[
        Path, typer.Option("--config", metavar="FILE", help="The configuration to try.")
    ],
    session_filter: Annotated[
        str | None, typer.Option("--session", metavar="ID", help="Only this session's tasks.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which model each recorded worker task would get under another configuration."""
    from orchestrator.config import ConfigError, load_config

    try:  # before the store: a bad file is the one problem worth a line
        config = load_config(config_file)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    with session(ctx) as orch:
        rows = orch.task_list(view="whatif", config=config, session_id=session_filter)
    emit(
        rows,
        as_json,
        ["task_id", "turn", "worker_id", "served_model", "whatif_model", "changed", "reason"],
    )


@app.command()
def fork(
    ctx: typer.Context,
    from_session: Annotated[str, typer.Argument(metavar="SESSION", help="A session id.")],
    at: Annotated[
        int, typer.Option("--at", metavar="N", min=0, help="The log position to fork at.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Start a new session with SESSION's overrides as of position N; prints its id."""
    with session(ctx, create=True) as orch:
        handle = orch.task_start(
            kind="op", op="session.fork", session={"from_session_id": from_session, "position": at}
        )
        rec = orch.task_await(handle.task_id, timeout=30)
    if rec.status != "completed" or rec.result is None:
        typer.echo(printable(rec.error or f"fork {rec.status}"), err=True)
        raise typer.Exit(1)
    if as_json:
        out.print_json(_dumps(rec.result))
    else:
        out.print(rec.result["session_id"], markup=False)


@app.command("diff")
def diff_cmd(
    ctx: typer.Context,
    since: Annotated[int, typer.Argument(metavar="N", min=0, help="From this position.")],
    until: Annotated[
        int | None, typer.Argument(metavar="M", min=0, help="To this position (default: now).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """What changed (overrides, registry processes, tasks) between positions N and M."""
    with session(ctx) as orch:
        rows = orch.task_list(view="diff", since=since, until=until)
    if as_json:
        emit(rows, True, [])
        return
    for row in rows:
        out.print(f"{row.change:<8} {row.scope:<9} {row.key}  {_changed(row)}", markup=False)
    if not rows:
        out.print(f"nothing changed between positions {since} and {until or 'now'}")


_SUMMARY = ("status", "model", "model_ref", "resolved_model", "model_policy")


def _changed(row: Any) -> str:
    """The fields that differ, `field: before -> after`; for a row added or removed, the
    few fields that say what it is."""
    if row.before is None or row.after is None:
        whole = row.after if row.before is None else row.before
        return printable(" ".join(f"{k}={_cell(whole[k])}" for k in _SUMMARY if whole.get(k)))
    parts = [
        f"{k}: {_cell(row.before.get(k))} -> {_cell(row.after.get(k))}"
        for k in sorted(row.before.keys() | row.after.keys())
        if row.before.get(k) != row.after.get(k)
    ]
    return printable("; ".join(parts))


def one_row(ctx: typer.Context, as_json: bool, view: str, **filters: Any) -> Any:
    """A one-row view: printed as JSON (and None returned) with --json, else returned."""
    with session(ctx) as orch:
        row = orch.task_list(view=view, **filters)[0]
    if as_json:
        out.print_json(row.model_dump_json())
        return None
    return row


@explain_app.command("task")
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


@explain_app.command("worker")
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


@app.command("conversation")
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


@app.command()
def schema() -> None:
    """Print the tool schema of task_start as JSON, in the dialect every LLM host accepts."""
    from orchestrator.tool_schema import task_start_schema

    out.print_json(_dumps(task_start_schema()))


@app.command()
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


@app.command("export-otel")
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


@app.command("usage")
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


@config_app.command("check")
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


@app.command()
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


@app.command()
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
