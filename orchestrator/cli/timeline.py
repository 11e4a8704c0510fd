"""The commands that read the log over time: events (and --follow), replay, whatif, fork
and diff."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli.core import JsonOpt, fail, session
from orchestrator.cli.output import EVENT_COLUMNS, cell, dumps, emit, one_row, out, printable

if TYPE_CHECKING:  # the store, pydantic and the orchestrator load when a command needs them
    from pydantic import BaseModel

    from events.store import EventRecord
    from orchestrator.orchestrator import Orchestrator


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
        line = " ".join(f"{c}={cell(data.get(c))}" for c in EVENT_COLUMNS[:-1])
        sys.stdout.write(printable(f"{line} {cell(data['data'])}") + "\n")
    sys.stdout.flush()


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
    session_filter: Annotated[
        str | None,
        typer.Option("--session", metavar="ID", help="Only this session's overrides and tasks."),
    ] = None,
    since: Annotated[
        int | None,
        typer.Option(metavar="N", min=0, help="Only the tasks started after this position."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(metavar="N", min=1, help="At most N tasks (oldest first).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Registry, session overrides and tasks as of log position N; or, with --check,
    whether every recorded model decision still comes out the same (exit 1 if not)."""
    if check_:
        _replay_check(ctx, as_json)
        return
    if until is None:
        raise fail("replay needs --until N (a log position) or --check")
    page = _given(session_id=session_filter, since=since, limit=limit)
    view = one_row(ctx, as_json, "replay", until=until, **page)
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


def whatif(
    ctx: typer.Context,
    config_file: Annotated[
        Path, typer.Option("--config", metavar="FILE", help="The configuration to try.")
    ],
    session_filter: Annotated[
        str | None, typer.Option("--session", metavar="ID", help="Only this session's tasks.")
    ] = None,
    since: Annotated[
        int | None,
        typer.Option(metavar="N", min=0, help="Only the tasks decided after this position."),
    ] = None,
    until: Annotated[
        int | None,
        typer.Option(metavar="N", min=0, help="Only the tasks decided up to this position."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(metavar="N", min=1, help="At most N tasks (oldest first).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which model each recorded worker task would get under another configuration (a page
    of them with --since, --until or --limit)."""
    from orchestrator.config import ConfigError, load_config

    try:  # before the store: a bad file is the one problem worth a line
        config = load_config(config_file)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    with session(ctx) as orch:
        page = _given(since=since, until=until, limit=limit)
        rows = orch.task_list(view="whatif", config=config, session_id=session_filter, **page)
    emit(
        rows,
        as_json,
        ["task_id", "turn", "worker_id", "served_model", "whatif_model", "changed", "reason"],
    )


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
        out.print_json(dumps(rec.result))
    else:
        out.print(rec.result["session_id"], markup=False)


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
        return printable(" ".join(f"{k}={cell(whole[k])}" for k in _SUMMARY if whole.get(k)))
    parts = [
        f"{k}: {cell(row.before.get(k))} -> {cell(row.after.get(k))}"
        for k in sorted(row.before.keys() | row.after.keys())
        if row.before.get(k) != row.after.get(k)
    ]
    return printable("; ".join(parts))


def _given(**options: Any) -> dict[str, Any]:
    """The paging options given (a view asked for none answers whole, as before)."""
    return {name: value for name, value in options.items() if value is not None}
