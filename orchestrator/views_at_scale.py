"""The views whose answer is small on a big log, answered at the cost of that answer
(ADR-0014): the registry from its checkpoints, one session's usage from that session's
events, and `diff` from the keys its window touched.

Each returns exactly the rows of the view that folds the log from the start (a test
compares them on recorded logs of every store).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from events.catalogue import TaskCompleted
from events.checkpoints import registry_checkpoints, registry_events
from events.projections import AnyRegistryEntry, TaskRecord, apply_task
from events.reads import OVERRIDE_TYPES, TASK_RECORD_TYPES, overrides_at
from events.store import EventLog, Filter
from orchestrator.api import UsageRow, round_cost
from orchestrator.history import DiffRow, Flat, diff_states

TASK_IDS_PER_READ = 200  # ids per indexed read (under every driver's parameter limit)


def registry(log: EventLog) -> list[AnyRegistryEntry]:
    """Every process and model server the registry ever knew, oldest first: the registry's
    checkpointed fold caught up with the log (its new events only)."""
    rows = registry_checkpoints(log).rows().values()
    return sorted((e.model_copy(deep=True) for e in rows), key=lambda e: e.started_at)


def usage(log: EventLog, session_id: str | None, since: int = 0) -> list[UsageRow]:
    """Tokens and cost per (session, worker, model) of finished worker tasks after `since`.
    One session's are summed from its own events (read by session id, which the store's
    planner keeps on the session index); every session's from every `TaskCompleted`."""
    if session_id is not None:
        found: Iterable[Any] = (
            e
            for _, e in log.select(Filter(session_id=session_id), after=since)
            if isinstance(e, TaskCompleted)
        )
    else:
        found = (e for _, e in log.select(Filter(types=("TaskCompleted",)), after=since))
    rows: dict[tuple[str, str, str], UsageRow] = {}
    for event in found:
        used = event.usage
        if not used:
            continue
        key = (event.session_id, str(event.worker_id), str(event.model))
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
            row.cost_usd = round_cost((row.cost_usd or 0.0) + float(used["cost_usd"]))
        rows[key] = row
    return [rows[k] for k in sorted(rows)]


def diff(log: EventLog, since: int, until: int | None = None) -> list[DiffRow]:
    """What changed from position `since` to `until` (default: now). Only what an event in
    that window touched can differ, so the window is read once for the overrides, processes
    and tasks it names, and each is looked up as of both ends: overrides by their session's
    override events, processes from the registry's checkpoints, tasks by id. The cost is
    the window's events, not the log's."""
    end = log.head() if until is None else until
    sessions: set[str] = set()
    processes: set[str] = set()
    tasks: set[str] = set()
    for _, event in log.select(Filter(), after=since, until=end):
        kind = event.stream_kind
        if kind == "registry":
            instance_id = getattr(event, "instance_id", None)
            if isinstance(instance_id, str):
                processes.add(instance_id)
        elif kind == "session":
            if event.type_name() in OVERRIDE_TYPES:
                sessions.add(event.session_id)
            if event.task_id is not None and event.type_name() in TASK_RECORD_TYPES:
                tasks.add(event.task_id)
    before: Flat = {}
    after: Flat = {}
    for sid in sorted(sessions):
        for flat, position in ((before, since), (after, end)):
            for worker_id, override in (overrides_at(log, sid, position) or {}).items():
                flat[("override", f"{sid}/{worker_id}")] = override.model_dump(mode="json")
    if processes:
        checkpoints, read = registry_checkpoints(log), registry_events(log)
        for flat, position in ((before, since), (after, end)):
            rows = checkpoints.rows_at(position, read)
            for iid in processes & rows.keys():
                flat[("registry", iid)] = rows[iid].model_dump(mode="json")
    then, now = _tasks_at(log, sorted(tasks), since, end)
    before.update({("task", t): r.model_dump(mode="json") for t, r in then.items()})
    after.update({("task", t): r.model_dump(mode="json") for t, r in now.items()})
    return diff_states(before, after)


def _tasks_at(
    log: EventLog, task_ids: list[str], since: int, until: int
) -> tuple[dict[str, TaskRecord], dict[str, TaskRecord]]:
    """The records of some tasks as of two positions (a task not yet started is absent),
    read by id through the index, a page of ids at a time."""
    then: dict[str, TaskRecord] = {}
    now: dict[str, TaskRecord] = {}
    for i in range(0, len(task_ids), TASK_IDS_PER_READ):
        where = Filter(task_ids=tuple(task_ids[i : i + TASK_IDS_PER_READ]), types=TASK_RECORD_TYPES)
        for position, event in log.select(where, until=until):
            task_id = str(event.task_id)
            if position <= since:
                record = apply_task(then.get(task_id), event)
                if record is not None:
                    then[task_id] = record
            record = apply_task(now.get(task_id), event)
            if record is not None:
                now[task_id] = record
    return then, now
