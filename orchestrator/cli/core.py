"""The CLI's frame: the typer `app` and its groups, the global options (also accepted after a
command's name), `Settings`, and `session()`/`fail()` every command opens and errors through."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

if TYPE_CHECKING:  # the store and the orchestrator load when a command needs them
    from orchestrator.orchestrator import Orchestrator
    from orchestrator.reading import SessionReader

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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear line on stderr (one per problem, each marked `error:`) and return
    the exit to raise."""
    for line in message.splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)  # never wrapped: one line, greppable
    return typer.Exit(code)


@contextmanager
def reader(ctx: typer.Context) -> Iterator[SessionReader]:
    """What a command that only shows the configuration reads (with `views.run` and
    `NO_WRITES`): the store if there is one, else an empty in-memory log, with no
    orchestrator opened (so no process directory, lease or session is made). Errors
    become one line and exit 2."""
    from events.store import EventLog, NoStore
    from orchestrator.config import load_config
    from orchestrator.errors import OrchestratorError
    from orchestrator.reading import SessionReader

    s: Settings = ctx.obj
    try:
        config = load_config(s.config)
        try:
            log = EventLog(s.store, create=False)
        except NoStore:
            log = EventLog("memory")
    except (OrchestratorError, OSError) as exc:
        raise fail(str(exc)) from None
    try:
        yield SessionReader(config, log, s.session or "cli")
    except OrchestratorError as exc:
        raise fail(str(exc)) from None
    finally:
        log.close()


@contextmanager
def session(ctx: typer.Context, create: bool = False) -> Iterator[Orchestrator]:
    """The CLI's session on the chosen store; errors become one line and exit 2.

    Reading never creates: only a command that writes passes `create`; any other, where
    there is no store, says `no orchestrator store at URL` and makes nothing there (a
    command that shows only the configuration uses `reader` instead)."""
    from events.store import EventLog, StoreError
    from orchestrator.api import InvalidTaskArgs
    from orchestrator.config import load_config
    from orchestrator.errors import OrchestratorError
    from orchestrator.orchestrator import Orchestrator

    s: Settings = ctx.obj
    log: EventLog | None = None
    try:
        config = load_config(s.config)  # a bad --config is said first: it names the file
        if not create:
            log = EventLog(s.store, create=False)
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
