"""The views of `task_list`: read-only projections for this session and the whole store."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from events.catalogue import EVENT_TYPES
from events.projections import RegistryEntry, TaskRecord
from events.replay import replay as replay_log
from events.store import EventRecord
from events.streams import session_view
from orchestrator.api import InvalidTaskArgs, MemoryItem, ProfileView, UsageRow, WorkerView
from orchestrator.explain import (
    ReplayView,
    TaskExplanation,
    WorkerExplanation,
    explain_task,
    override_in_force,
    replay_view,
    worker_history,
)
from orchestrator.resolver import CatalogueModel, ResolutionError, did_you_mean

if TYPE_CHECKING:
    from orchestrator.orchestrator import Orchestrator


def tasks(orch: Orchestrator) -> list[TaskRecord]:
    """This session's tasks, oldest first (those of a dead orchestrator are ended first)."""
    for task_id in list(orch.session.refresh().owners):
        orch.settle(orch.session.state, task_id)
    state = orch.session.refresh()
    return sorted((t.model_copy() for t in state.tasks.values()), key=lambda t: t.started_at)


def workers(orch: Orchestrator) -> list[WorkerView]:
    """Every profile with this session's effective model and its running process, if any."""
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
        agent = orch.agent.agents.get(worker_id)
        if profile.backend == "agent" and agent and agent.fingerprint == spec.fingerprint:
            row.status, row.instance_id = "running", agent.instance_id
        for entry in orch.pool.live_entries(worker_id):
            if entry.fingerprint == spec.fingerprint:
                row.status, row.instance_id, row.pid, row.url = (
                    entry.status,
                    entry.instance_id,
                    entry.pid,
                    entry.url,
                )
                break
        rows.append(row)
    return rows


def registry(orch: Orchestrator) -> list[RegistryEntry]:
    """Every worker process the device registry knows, on every host, oldest first."""
    state = orch.pool.registry.refresh()
    return sorted((e.model_copy() for e in state.entries.values()), key=lambda e: e.started_at)


def models(orch: Orchestrator) -> list[CatalogueModel]:
    """The model catalogue."""
    return orch.catalogue()


def profiles(orch: Orchestrator) -> list[ProfileView]:
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


def memory(orch: Orchestrator) -> list[MemoryItem]:
    """Notes, links and done summaries of the memory store."""
    state = orch.memory.refresh()
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
    orch: Orchestrator,
    worker_id: str | None = None,
    type: str | None = None,
    since: int = 0,
    session_id: str | None = None,
    task_id: str | None = None,
) -> list[EventRecord]:
    """The log, filtered: `since` is exclusive (events after that position)."""
    if type is not None and type not in EVENT_TYPES:
        raise InvalidTaskArgs(
            f'Invalid task_list arguments: type: no event type "{type}".'
            + did_you_mean(type, EVENT_TYPES)
        )
    _check_position("since", since)
    rows = orch.log.records(after=since, types=[type] if type else ())
    return [
        r
        for r in rows
        if worker_id in (None, r.worker_id)
        and session_id in (None, r.session_id)
        and task_id in (None, r.task_id)
    ]


_THIS_SESSION: Any = object()


def usage(
    orch: Orchestrator, session_id: str | None = _THIS_SESSION, since: int = 0
) -> list[UsageRow]:
    """Tokens and cost per (session, worker, model) of finished worker tasks: this session's
    by default, every session's with `session_id=None`, only after position `since`."""
    wanted = orch.session_id if session_id is _THIS_SESSION else session_id
    rows: dict[tuple[str, str, str], UsageRow] = {}
    for _, _, data in orch.log.read_log(after=since, types=["TaskCompleted"]):
        used = data.get("usage")
        if not used or wanted not in (None, data.get("session_id")):
            continue
        key = (data["session_id"], str(data.get("worker_id")), str(data.get("model")))
        row = rows.get(key) or UsageRow(
            session_id=key[0],
            worker_id=key[1],
            model=key[2],
            tasks=0,
            input_tokens=0,
            output_tokens=0,
            cost_usd=None,
        )
        row.tasks += 1
        row.input_tokens += int(used.get("input_tokens") or 0)
        row.output_tokens += int(used.get("output_tokens") or 0)
        if used.get("cost_usd") is not None:
            row.cost_usd = (row.cost_usd or 0.0) + float(used["cost_usd"])
        rows[key] = row
    return [rows[k] for k in sorted(rows)]


def replay(orch: Orchestrator, until: int | None = None) -> list[ReplayView]:
    """The registry, overrides and tasks as of log position `until` (default: now)."""
    if until is not None:
        _check_position("until", until)
    return [replay_view(replay_log(orch.log, until=until))]


def _check_position(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise InvalidTaskArgs(
            f"Invalid task_list arguments: {name}: a log position is a whole number >= 0, "
            f"got {value!r}."
        )


def explain(
    orch: Orchestrator, task_id: str | None = None, worker_id: str | None = None
) -> list[TaskExplanation | WorkerExplanation]:
    """Why a task got its model and process, or a worker's current model and processes."""
    if task_id is not None:
        return [_explain_task(orch, task_id)]
    if worker_id is not None:
        return [_explain_worker(orch, worker_id)]
    raise InvalidTaskArgs("Invalid task_list arguments: explain needs task_id or worker_id.")


def _explain_task(orch: Orchestrator, task_id: str) -> TaskExplanation:
    records = orch.log.records()
    found = explain_task(records, task_id)
    if found is None:
        known = {r.task_id for r in records if r.type == "TaskStarted" and r.task_id}
        raise InvalidTaskArgs(f'Unknown task "{task_id}".' + did_you_mean(task_id, known))
    return found


def _explain_worker(orch: Orchestrator, worker_id: str) -> WorkerExplanation:
    try:  # a bad worker id is answered before the whole log is read
        decision = orch.session_decision(worker_id)
    except ResolutionError as exc:
        raise InvalidTaskArgs(str(exc)) from None
    records = orch.log.records()
    head = records[-1].position + 1 if records else 1
    return WorkerExplanation(
        worker_id=worker_id,
        session_id=orch.session_id,
        model=decision.resolved_model,
        model_ref=decision.model_ref,
        model_policy=decision.model_policy,
        reason=decision.reason,
        override=override_in_force(records, orch.session_id, worker_id, head),
        processes=[e for e in registry(orch) if e.worker_id == worker_id],
        history=worker_history(records, worker_id),
    )


def foreign_task(orch: Orchestrator, task_id: str) -> TaskRecord:
    """A task of another session, found through its TaskStarted event."""
    for _, _, data in orch.log.read_log(types=["TaskStarted"]):
        if data.get("task_id") == task_id:
            view = session_view(orch.log, data["session_id"])
            task = view.refresh().tasks.get(task_id)
            if task is not None and task.status == "running":
                orch.settle(view.state, task_id)
                task = view.refresh().tasks[task_id]
            if task is not None:
                return task
    known = orch.session.refresh().tasks
    raise InvalidTaskArgs(f'Unknown task "{task_id}".' + did_you_mean(task_id, known))


def filters_of(view: Callable[..., list[Any]]) -> list[str]:
    """The filters (keyword parameters) a view takes."""
    params = list(inspect.signature(view).parameters)
    return params[1:]  # the first is the orchestrator


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
}
