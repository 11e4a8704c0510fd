"""The views of `task_list`: projections of the log for this session and the whole store.

Views read, through a `ViewContext` (a session's log, configuration and decisions, and the
processes this host runs: the live `Session`, or a `reading.SessionReader` over a bare
log); they decide nothing and change no override or process.
One kind of write is theirs, and it goes through the `ViewWriter` passed in: a view that
meets a task still `running` whose owning orchestrator process is gone (`tasks`) ends it
`failed`, and the `workers` and `registry` views first record this host's processes found
gone, so nothing that is gone is shown running. So a store opened only to read
(`EventLog(url, create=False)`, which makes no store) may still be appended to by a view
when one exists, unless its writer refuses (`reading.NO_WRITES`, the inspector's).
`run(view, ctx, writer, **filters)` is `task_list` for any context and writer.

It stays one module of about 490 lines because it is the one list of views: `VIEWS`,
`filters_of` and `run` here are what `task_list`, the inspector, the tool schema, "Did you
mean" and the docs read.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from events.catalogue import EVENT_TYPES, REGISTRY_STREAM, session_stream
from events.projections import AnyRegistryEntry, Owner, RegistryEntry, TaskRecord
from events.reads import OVERRIDE_TYPES, session_tasks
from events.replay import replay as replay_log
from events.store import EventLog, EventRecord, Filter, record_from
from events.streams import memory_view
from orchestrator import history, view_pages, views_at_scale
from orchestrator.api import (
    MAX_POSITION,
    ConversationRow,
    InvalidTaskArgs,
    MemoryItem,
    ProfileView,
    UsageRow,
    WorkerView,
    id_problem,
)
from orchestrator.backends import WorkerProcess
from orchestrator.backends.spec import WorkerSpec
from orchestrator.config import OrchestratorConfig, did_you_mean, load_config
from orchestrator.conversation import conversation_models, read_recorded, rows_of
from orchestrator.explain import (
    HISTORY_TYPES,
    ReplayView,
    TaskExplanation,
    WorkerExplanation,
    explain_task,
    override_cause,
    replay_view,
)
from orchestrator.history import DiffRow, WhatIfRow
from orchestrator.reading import unknown_task
from orchestrator.resolver import CatalogueModel, ModelDecision, ResolutionError


class ViewContext(Protocol):
    """What a view reads: the log, the configuration, whose session it is, its decisions,
    and this host's processes (`reading.SessionReader` is one, over a bare log; the live
    `session.Session` extends it)."""

    @property
    def session_id(self) -> str:
        """The session the view is for."""
        ...

    @property
    def log(self) -> EventLog:
        """The event log."""
        ...

    @property
    def config(self) -> OrchestratorConfig:
        """The configuration."""
        ...

    def catalogue(self) -> list[CatalogueModel]:
        """The model catalogue now."""
        ...

    def session_decision(self, worker_id: str) -> ModelDecision:
        """The model this session's worker uses when a task names none."""
        ...

    def worker_spec(self, worker_id: str, decision: ModelDecision) -> WorkerSpec:
        """The process a session-level decision asks for."""
        ...

    def owners(self) -> dict[str, Owner]:
        """This session's running tasks and the orchestrator process that owns each."""
        ...

    def worker_processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes: its in-process agent here, those on this host
        recorded as running (as each backend answers `processes`)."""
        ...


class ViewWriter(Protocol):
    """The writes a view may make (`session.SessionWriter` makes them; `reading.NoWrites`,
    for a reader that must not write, refuses them)."""

    def settle(self, session_id: str, task_id: str, owner: Owner | None) -> bool:
        """End a running task whose owning process is gone; True if it did."""
        ...

    def settle_workers(self) -> None:
        """Record this host's worker processes found gone."""
        ...

    def settle_servers(self) -> None:
        """Record what became of this host's managed model servers."""
        ...


def tasks(orch: ViewContext, writer: ViewWriter) -> list[TaskRecord]:
    """This session's tasks, oldest first (those of a dead orchestrator are ended first)."""
    for task_id, owner in orch.owners().items():
        writer.settle(orch.session_id, task_id, owner)
    return sorted(session_tasks(orch.log, orch.session_id), key=lambda t: t.started_at)


def workers(orch: ViewContext, writer: ViewWriter) -> list[WorkerView]:
    """Every profile with this session's effective model and its running process, if any
    (this host's processes are checked first: one found gone is recorded, never shown)."""
    writer.settle_workers()
    rows = []
    for worker_id, profile in orch.config.profiles.items():
        try:
            decision = orch.session_decision(worker_id)
        except ResolutionError as exc:
            rows.append(
                WorkerView(
                    worker_id=worker_id,
                    backend=profile.backend,
                    status="unresolvable",
                    model=None,
                    model_ref=profile.model,
                    model_policy="dynamic",
                    reason=str(exc),
                )
            )
            continue
        spec = orch.worker_spec(worker_id, decision)
        row = WorkerView(
            worker_id=worker_id,
            backend=profile.backend,
            status="not_running",
            model=decision.resolved_model,
            model_ref=decision.model_ref,
            model_policy=decision.model_policy,
            reason=decision.reason,
            fingerprint=spec.fingerprint,
        )
        # A server process of the fingerprint wins over the in-process agent (which
        # counts only for an agent profile).
        matching = [
            p
            for p in orch.worker_processes(worker_id)
            if p.fingerprint == spec.fingerprint
            and (p.backend == "server" or profile.backend == "agent")
        ]
        matching.sort(key=lambda p: p.backend != "server")
        if matching:
            found = matching[0]
            row.status, row.instance_id, row.pid, row.url = (
                found.status,
                found.instance_id,
                found.pid,
                found.url,
            )
        rows.append(row)
    return rows


def registry(orch: ViewContext, writer: ViewWriter) -> list[AnyRegistryEntry]:
    """Every worker process and managed model server (`kind`) the device registry knows,
    on every host, oldest first (the stopped ones too: they are read from the registry's
    history, not the live state). This host's processes and model servers are checked
    first, and one found gone is recorded as such."""
    writer.settle_workers()
    writer.settle_servers()
    return views_at_scale.registry(orch.log)


def models(orch: ViewContext, writer: ViewWriter) -> list[CatalogueModel]:
    """The model catalogue."""
    return [row.model_copy() for row in orch.catalogue()]


def profiles(orch: ViewContext, writer: ViewWriter) -> list[ProfileView]:
    """The configured profiles."""
    return [
        ProfileView(
            worker_id=wid,
            name=p.name or wid,
            model=p.model,
            backend=p.backend,
            purpose=p.purpose,
            when_to_use=p.when_to_use,
        )
        for wid, p in orch.config.profiles.items()
    ]


def memory(orch: ViewContext, writer: ViewWriter) -> list[MemoryItem]:
    """Notes, links and done summaries of the memory store."""
    state = memory_view(orch.log).refresh()
    rows = [
        MemoryItem(kind="note", key=n.key, value=n.value, tags=n.tags, session_id=n.session_id)
        for n in state.notes.values()
    ]
    rows += [
        MemoryItem(kind="link", from_key=x.from_key, to_key=x.to_key, type=x.type)
        for x in state.links
    ]
    rows += [
        MemoryItem(kind="done", task_id=d.task_id, summary=d.summary, session_id=d.session_id)
        for d in state.done
    ]
    return rows


def events(
    orch: ViewContext,
    writer: ViewWriter,
    worker_id: str | None = None,
    type: str | None = None,
    since: int = 0,
    session_id: str | None = None,
    task_id: str | None = None,
    until: int | None = None,
    limit: int | None = None,
) -> list[EventRecord]:
    """The log, filtered in the store: `since` is exclusive (events after that position),
    `until` inclusive, `limit` the most rows returned (oldest first)."""
    if type is not None and type not in EVENT_TYPES:
        raise InvalidTaskArgs(
            f'Invalid task_list arguments: type: no event type "{type}".'
            + did_you_mean(type, EVENT_TYPES)
        )
    _check_position("since", since)
    if until is not None:
        _check_position("until", until)
    _check_ids(session_id=session_id, worker_id=worker_id, task_id=task_id)
    view_pages.check_limit(limit)
    where = Filter(
        session_id=session_id, worker_id=worker_id, task_id=task_id, types=(type,) if type else ()
    )
    return [record_from(*e) for e in orch.log.select(where, after=since, until=until, limit=limit)]


_THIS_SESSION: Any = object()


def usage(
    orch: ViewContext, writer: ViewWriter, session_id: str | None = _THIS_SESSION, since: int = 0
) -> list[UsageRow]:
    """Tokens and cost per (session, worker, model) of finished worker tasks: this session's
    by default, every session's with `session_id=None`, only after position `since`."""
    wanted = orch.session_id if session_id is _THIS_SESSION else session_id
    _check_position("since", since)
    _check_ids(session_id=wanted)
    return views_at_scale.usage(orch.log, wanted, since)


def replay(
    orch: ViewContext,
    writer: ViewWriter,
    until: int | None = None,
    session_id: str | None = None,
    since: int = 0,
    limit: int | None = None,
) -> list[ReplayView]:
    """The registry, overrides and tasks as of log position `until` (default: now). A page
    of it: `session_id` keeps one session's overrides and tasks, `since` the tasks started
    after that position, `limit` the first that many of them (in log order)."""
    if until is not None:
        _check_position("until", until)
    _check_position("since", since)
    _check_ids(session_id=session_id)
    view_pages.check_limit(limit)
    if session_id is None and since == 0 and limit is None:
        return [replay_view(replay_log(orch.log, until=until))]
    return [view_pages.replay(orch.log, until, session_id, since, limit)]


def whatif(
    orch: ViewContext,
    writer: ViewWriter,
    config: OrchestratorConfig | dict[str, Any] | str | Path | None = None,
    session_id: str | None = None,
    since: int = 0,
    until: int | None = None,
    limit: int | None = None,
) -> list[WhatIfRow]:
    """Every recorded worker task (of `session_id`, or all) with the model `config` (a dict,
    a TOML file or an OrchestratorConfig) would have chosen under the same overrides. A
    page of them: those decided after position `since` up to `until`, the first `limit`."""
    if config is None:
        raise InvalidTaskArgs(
            "Invalid task_list arguments: config: the whatif view needs config= (a dict, a "
            "TOML file or an OrchestratorConfig)."
        )
    _check_position("since", since)
    if until is not None:
        _check_position("until", until)
    view_pages.check_limit(limit)
    _check_ids(session_id=session_id)
    loaded = load_config(config)
    if since == 0 and until is None and limit is None:
        return history.whatif(orch.log, loaded, os.environ, session_id)
    return view_pages.whatif(orch.log, loaded, os.environ, session_id, since, until, limit)


def diff(
    orch: ViewContext, writer: ViewWriter, since: int = 0, until: int | None = None
) -> list[DiffRow]:
    """What changed (overrides, registry processes, tasks) from position `since` to
    position `until` (default: now)."""
    _check_position("since", since)
    if until is not None:
        _check_position("until", until)
        if until < since:
            raise InvalidTaskArgs(
                f"Invalid task_list arguments: until: {until} is before since ({since})."
            )
    return views_at_scale.diff(orch.log, since, until)


def _check_position(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_POSITION:
        raise InvalidTaskArgs(
            f"Invalid task_list arguments: {name}: a log position is a whole number from 0 "
            f"to {MAX_POSITION}, got {str(value)[:40]!r}."
        )


def _check_ids(**ids: str | None) -> None:
    """Id filters a store can look up (text, valid Unicode, not too long)."""
    for name, value in ids.items():
        problem = None if value is None else id_problem(value, "an id")
        if problem is not None:
            raise InvalidTaskArgs(f"Invalid task_list arguments: {name}: {problem}.")


def explain(
    orch: ViewContext, writer: ViewWriter, task_id: str | None = None, worker_id: str | None = None
) -> list[TaskExplanation | WorkerExplanation]:
    """Why a task got its model and process, or a worker's current model and processes."""
    if task_id is not None:
        return [_explain_task(orch, task_id)]
    if worker_id is not None:
        return [_explain_worker(orch, writer, worker_id)]
    raise InvalidTaskArgs("Invalid task_list arguments: explain needs task_id or worker_id.")


def _explain_task(orch: ViewContext, task_id: str) -> TaskExplanation:
    chain = [record_from(*e) for e in orch.log.select(Filter(task_id=task_id))]
    started = next((r for r in chain if r.type == "TaskStarted"), None)
    resolved = next((r for r in chain if r.type == "ModelResolved"), None)
    override = None
    if started is not None and resolved is not None and resolved.data["source"] == "session":
        override = _override_record(
            orch.log, str(started.session_id), str(started.worker_id), resolved.position
        )
    ids = started.data.get("conversation") or [] if started is not None else []
    found = explain_task(chain, override, conversation_models(orch.log, ids))
    if found is None:
        raise unknown_task(orch.log, orch.session_id, task_id)
    return found


def _override_record(
    log: EventLog, session_id: str, worker_id: str, before: int
) -> EventRecord | None:
    """The session's newest override event for a worker before a position (one row)."""
    for_worker = Filter(session_id=session_id, worker_id=worker_id, types=OVERRIDE_TYPES[:2])
    forked = Filter(stream=session_stream(session_id), types=("SessionForked",))
    found = [
        record_from(*e)
        for where in (for_worker, forked)
        for e in log.select(where, until=before - 1, limit=1, newest_first=True)
    ]
    return max(found, key=lambda r: r.position, default=None)


def _explain_worker(orch: ViewContext, writer: ViewWriter, worker_id: str) -> WorkerExplanation:
    try:  # a bad worker id is answered before anything is read
        decision = orch.session_decision(worker_id)
    except ResolutionError as exc:
        raise InvalidTaskArgs(str(exc)) from None
    override = _override_record(orch.log, orch.session_id, worker_id, orch.log.head() + 1)
    history = orch.log.select(
        Filter(worker_id=worker_id, stream=REGISTRY_STREAM, types=HISTORY_TYPES)
    )
    return WorkerExplanation(
        worker_id=worker_id,
        session_id=orch.session_id,
        model=decision.resolved_model,
        model_ref=decision.model_ref,
        model_policy=decision.model_policy,
        reason=decision.reason,
        override=override_cause(override, worker_id),
        processes=[
            e
            for e in registry(orch, writer)
            if isinstance(e, RegistryEntry) and e.worker_id == worker_id
        ],
        history=[record_from(*e) for e in history],
    )


def conversation(
    orch: ViewContext, writer: ViewWriter, task_id: str | None = None
) -> list[ConversationRow]:
    """The messages a worker task's request carried (system prompt, the earlier turns it
    kept, its tool results and message) and its reply, each with the task (turn) it
    belongs to and the model that served that turn."""
    if task_id is None:
        raise InvalidTaskArgs("Invalid task_list arguments: conversation needs task_id.")
    recorded = read_recorded(orch.log, task_id)
    if recorded is None:
        raise unknown_task(orch.log, orch.session_id, task_id)
    if recorded.started.kind != "worker":
        raise InvalidTaskArgs(
            f'Invalid task_list arguments: task_id: "{task_id}" is an op; only a worker task '
            "has a conversation."
        )
    worker_id = str(recorded.started.worker_id)
    profile = orch.config.profiles.get(worker_id)
    return rows_of(recorded, profile.system_prompt if profile else "")


def filters_of(view: Callable[..., list[Any]]) -> list[str]:
    """The filters (keyword parameters) a view takes."""
    params = list(inspect.signature(view).parameters)
    return params[2:]  # the first two are the context and the writer


VIEWS: dict[str, Callable[..., list[Any]]] = {
    "tasks": tasks,
    "workers": workers,
    "registry": registry,
    "models": models,
    "profiles": profiles,
    "memory": memory,
    "events": events,
    "replay": replay,
    "explain": explain,
    "usage": usage,
    "whatif": whatif,
    "diff": diff,
    "conversation": conversation,
}


def run(view: str, ctx: ViewContext, writer: ViewWriter, **filters: Any) -> list[Any]:
    """The rows of `view` (what `task_list(view, **filters)` answers): an unknown view or
    filter raises `InvalidTaskArgs` with "Did you mean" (a filter's message lists the
    view's filters)."""
    handler = VIEWS.get(view)
    if handler is None:
        raise InvalidTaskArgs(
            f'Invalid task_list arguments: view: unknown view "{view}".' + did_you_mean(view, VIEWS)
        )
    allowed = filters_of(handler)
    for name in filters:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidTaskArgs(
                f'Invalid task_list arguments: {name}: the {view} view has no filter "{name}"'
                f" (its filters: {known})." + did_you_mean(name, allowed)
            )
    return handler(ctx, writer, **filters)
