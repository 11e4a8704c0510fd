"""The views answered at the cost of their answer (registry, usage, diff) give exactly the
rows of the views that fold the log from the start, on recorded logs of every store."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from events import checkpoints
from events.catalogue import (
    Event,
    ModelAttemptFailed,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
    WorkerExited,
    WorkerModelReset,
    WorkerModelSet,
    WorkerReady,
    WorkerReused,
    WorkerStopped,
)
from events.reads import registry_history
from events.store import EventLog, Filter
from orchestrator import history, views_at_scale
from orchestrator.api import UsageRow, round_cost
from tests.helpers import fake_spawned

SESSIONS = ("a", "b", "c")
WORKERS = ("coder", "docs")


def _event(rng: random.Random, n: int, started: list[tuple[str, str]], spawned: list[str]) -> Event:
    """One plausible event (tasks and processes named by earlier ones, or not)."""
    sid, wid = rng.choice(SESSIONS), rng.choice(WORKERS)
    kind = rng.randrange(10)
    if kind == 0:
        return WorkerModelSet(
            session_id=sid,
            worker_id=wid,
            model_ref=f"m{n}",
            resolved_model=f"p/m{n}",
            model_policy="sticky",
            reason="set",
        )
    if kind == 1:
        return WorkerModelReset(session_id=sid, worker_id=wid)
    if kind in (2, 3) or not started:
        started.append((f"t{n}", sid))
        return TaskStarted(session_id=sid, worker_id=wid, task_id=f"t{n}", kind="worker", args={})
    task, sid = rng.choice(started)  # a task's events are in its own session
    ids: dict[str, Any] = {"session_id": sid, "worker_id": wid, "task_id": task}
    if kind == 4:
        return ModelAttemptFailed(**ids, model="p/big", error="down", retryable=True)
    if kind == 5:
        used = {"input_tokens": rng.randrange(9), "output_tokens": 2, "cost_usd": 0.001 * n}
        return TaskCompleted(
            **ids, model=f"p/m{n % 2}", response="ok", usage=rng.choice([used, {}])
        )
    if kind == 6:
        return rng.choice([TaskFailed(**ids, error="no"), TaskCancelled(**ids)])
    if kind == 7 or not spawned:
        spawned.append(f"w{n}")
        return fake_spawned(sid, wid, f"w{n}", n, "p/big")
    iid, ids = rng.choice(spawned), {"session_id": sid, "worker_id": wid}
    return rng.choice(
        [
            WorkerReady(**ids, instance_id=iid),
            WorkerReused(**ids, instance_id=iid, fingerprint="fp", task_id=task),
            WorkerStopped(**ids, instance_id=iid),
            WorkerExited(**ids, instance_id=iid),
        ]
    )


def record(log: EventLog, seed: int, count: int) -> None:
    """Append `count` random events, a few at a time, to their streams."""
    rng = random.Random(seed)
    started: list[tuple[str, str]] = []
    spawned: list[str] = []
    n = 0
    while n < count:
        batch = []
        for _ in range(rng.randrange(1, 4)):
            n += 1
            batch.append(_event(rng, n, started, spawned))
        streams: dict[str, list[Event]] = {}
        for event in batch:
            stream = (
                "registry" if event.stream_kind == "registry" else f"session:{event.session_id}"
            )
            streams.setdefault(stream, []).append(event)
        log.append_batches([(s, e, log.stream_version(s)) for s, e in streams.items()])


def slow_registry(log: EventLog) -> list[Any]:
    """The `registry` view's rows as the full history walk gives them."""
    state, retired = registry_history(log)
    rows = [*state.entries.values(), *state.servers.values(), *retired.values()]
    return sorted(rows, key=lambda e: e.started_at)


def slow_usage(log: EventLog, session_id: str | None, since: int) -> list[UsageRow]:
    """The `usage` view's rows as the type-filtered read of every `TaskCompleted` gives them."""
    rows: dict[tuple[str, str, str], UsageRow] = {}
    for _, e in log.select(Filter(session_id=session_id, types=("TaskCompleted",)), after=since):
        assert isinstance(e, TaskCompleted)
        if not e.usage:
            continue
        key = (e.session_id, str(e.worker_id), str(e.model))
        zero: dict[str, Any] = {"tasks": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": None}
        row = rows.setdefault(
            key, UsageRow(session_id=key[0], worker_id=key[1], model=key[2], **zero)
        )
        row.tasks += 1
        row.input_tokens += int(e.usage.get("input_tokens") or 0)
        row.output_tokens += int(e.usage.get("output_tokens") or 0)
        if e.usage.get("cost_usd") is not None:
            row.cost_usd = round_cost((row.cost_usd or 0.0) + float(e.usage["cost_usd"]))
    return [rows[k] for k in sorted(rows)]


def assert_same_answers(log: EventLog, rng: random.Random) -> None:
    head = log.head()
    assert views_at_scale.registry(log) == slow_registry(log)
    for sid in (*SESSIONS, None):
        since = rng.randrange(head + 1)
        assert views_at_scale.usage(log, sid, since) == slow_usage(log, sid, since)
    pairs = [(0, None), (0, head), (head, None)]
    pairs += [tuple(sorted(rng.sample(range(head + 1), 2))) for _ in range(12)]  # type: ignore[misc]
    for since, until in pairs:
        assert views_at_scale.diff(log, since, until) == history.diff(log, since, until), (
            since,
            until,
        )


def test_registry_usage_and_diff_equal_the_full_folds_on_every_store(store: Any) -> None:
    log = store if isinstance(store, EventLog) else EventLog(store)
    try:
        checkpoints.CHECKPOINT_EVERY = 7  # many checkpoints in a short log
        record(log, seed=22, count=300)
        rng = random.Random(1)
        assert_same_answers(log, rng)
        record(log, seed=23, count=60)  # caught up incrementally, not rebuilt
        assert_same_answers(log, rng)
    finally:
        checkpoints.CHECKPOINT_EVERY = 256
        if log is not store:
            log.close()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), count=st.integers(1, 120), every=st.integers(1, 9))
def test_the_same_on_random_logs(seed: int, count: int, every: int) -> None:
    log = EventLog("memory")
    try:
        checkpoints.CHECKPOINT_EVERY = every
        record(log, seed, count)
        assert_same_answers(log, random.Random(seed))
    finally:
        checkpoints.CHECKPOINT_EVERY = 256
        log.close()
