"""Build a realistic log of a given size, then time opening a session and replaying it.

The log is many sessions' tasks (TaskStarted, ModelResolved, TaskCompleted and a WorkerReused
in the registry per task, an override now and then), written through the same `EventLog` the
orchestrator uses, in batches, the registry's as the pool appends them (after refreshing its
view, which saves the registry's snapshot and checkpoint when due). The measured session,
`bench`, is small and written last.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from typing import Any

import orjson

from bench.measure import Stats, timed
from events.catalogue import (
    REGISTRY_STREAM,
    Event,
    ModelResolved,
    TaskCompleted,
    TaskStarted,
    WorkerModelSet,
    WorkerReady,
    WorkerReused,
    WorkerSpawned,
    event_from_json,
)
from events.replay import replay
from events.store import EventLog, Filter
from events.streams import registry_view
from orchestrator import Orchestrator

SESSION_SIZE = 1000  # events per filler session


def _task_events(session_id: str, n: int) -> tuple[list[Event], list[Event]]:
    task_id = f"t-{n:012x}"
    ids: dict[str, Any] = {"session_id": session_id, "worker_id": "coder", "task_id": task_id}
    session = [
        TaskStarted(**ids, kind="worker", args={"task": "hello", "worker_id": "coder"}),
        ModelResolved(
            **ids,
            model_ref="auto",
            resolved_model="local/echo-large",
            model_policy="dynamic",
            source="profile",
            reason="profile default",
            fingerprint="fp-bench",
        ),
        TaskCompleted(
            **ids,
            model="local/echo-large",
            response="[local/echo-large] hello",
            instance_id="coder-bench",
            pid=1,
        ),
    ]
    registry = [WorkerReused(**ids, instance_id="coder-bench", fingerprint="fp-bench")]
    return session, registry


def build_log(url: str, size: int) -> float:
    """Append about `size` events; returns the append throughput in events/s."""
    log = EventLog(url)
    ids: dict[str, Any] = {"session_id": "builder", "worker_id": "coder"}
    registry: list[Event] = [
        WorkerSpawned(
            **ids,
            instance_id="coder-bench",
            backend="server",
            host="bench",
            pid=1,
            pid_started_at=0.0,
            url="http://127.0.0.1:9",
            fingerprint="fp-bench",
            model="local/echo-large",
            model_policy="dynamic",
        ),
        WorkerReady(**ids, instance_id="coder-bench"),
    ]
    # The registry is appended as the pool appends it: after refreshing its view, which
    # saves the registry's snapshot and checkpoint when due (the log writers leave).
    view = registry_view(log)
    written = 0
    n = 0
    started = time.perf_counter()
    while written < size:
        session_id = f"s-{uuid.uuid4().hex[:10]}"
        batch: list[Event] = [
            WorkerModelSet(
                session_id=session_id,
                worker_id="docs",
                model_ref="auto:fast",
                resolved_model="local/echo-small",
                model_policy="sticky",
                reason="tag auto:fast -> small_model",
            )
        ]
        while len(batch) + len(registry) < SESSION_SIZE:
            n += 1
            s_events, r_events = _task_events(session_id, n)
            batch += s_events
            registry += r_events
        log.append(f"session:{session_id}", batch, 0)
        view.refresh()
        log.append(REGISTRY_STREAM, registry, view.version)
        written += len(batch) + len(registry)
        registry = []
    view.refresh()
    elapsed = time.perf_counter() - started
    with Orchestrator.open(store=log, session_id="bench") as orch:
        for model in ("local/echo-small", "local/echo-vision"):
            orch.task_start(
                kind="op", op="worker.model.set", worker={"worker_id": "coder", "model": model}
            )
    log.close()
    return written / elapsed


def open_and_read(url: str, runs: int) -> dict[str, Any]:
    """Time: open the store and an orchestrator on session `bench`, read its state."""

    def once() -> None:
        with Orchestrator.open(store=url, session_id="bench") as orch:
            orch.session.refresh()
            orch.pool.registry.refresh()

    stats: Stats = timed(once, runs, warmup=2)
    return stats.__dict__


def replay_all(url: str) -> tuple[float, int]:
    """Seconds to replay the whole log, and how many events it had."""
    log = EventLog(url)
    started = time.perf_counter()
    state = replay(log)
    elapsed = time.perf_counter() - started
    log.close()
    return elapsed, state.position


def middle_task(url: str) -> str:
    """A task id from the middle of a built log (its tasks are numbered in order)."""
    log = EventLog(url)
    try:
        started = sum(1 for _ in log.select(Filter(types=("TaskStarted",)), limit=None))
    finally:
        log.close()
    return f"t-{max(1, started // 2):012x}"


def debug_reads(url: str, runs: int) -> dict[str, Any]:
    """Time the debugging reads of one task deep in the log, from another session:
    `explain task`, `task_peek`, a page of its session's events, a page of a worker's."""
    task_id = middle_task(url)
    with Orchestrator.open(store=url, session_id="bench") as orch:
        session_id = orch.task_peek(task_id).session_id
        reads = {
            "explain": lambda: orch.task_list(view="explain", task_id=task_id),
            "peek": lambda: orch.task_peek(task_id),
            "session_page": lambda: orch.task_list(view="events", session_id=session_id, limit=100),
            "worker_page": lambda: orch.task_list(view="events", worker_id="coder", limit=100),
        }
        return {name: timed(read, runs, warmup=2).__dict__ for name, read in reads.items()}


def decode_floor(db_path: str) -> float:
    """The replay floor: read every row of the SQLite log and decode it with orjson."""
    started = time.perf_counter()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        cursor = conn.execute("SELECT rowid, topic, state FROM stored_events ORDER BY rowid")
        while rows := cursor.fetchmany(1000):
            for _, _, state in rows:
                orjson.loads(state)
    return time.perf_counter() - started


def typed_decode_floor(db_path: str) -> float:
    """A second floor: read every row and decode it into its event class (what a typed
    replay must do before folding anything)."""
    started = time.perf_counter()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        cursor = conn.execute("SELECT rowid, topic, state FROM stored_events ORDER BY rowid")
        while rows := cursor.fetchmany(1000):
            for _, topic, state in rows:
                event_from_json(topic, state)
    return time.perf_counter() - started


def big_session(url: str, tasks: int) -> None:
    """Append `tasks` finished tasks to session `big` (as a long-lived CLI session has)."""
    log = EventLog(url)
    version = log.stream_version("session:big")
    batch: list[Event] = []
    for n in range(tasks):
        ids: dict[str, Any] = {"session_id": "big", "task_id": f"t-big-{n:08d}"}
        batch += [
            TaskStarted(**ids, kind="op", op="memory.put", args={"key": "k", "value": "v"}),
            TaskCompleted(**ids, result={"key": "k", "value": "v", "tags": []}),
        ]
        if len(batch) >= 1000:
            log.append("session:big", batch, version)
            version += len(batch)
            batch = []
    if batch:
        log.append("session:big", batch, version)
    log.close()


def open_session(url: str, session_id: str, runs: int) -> dict[str, Any]:
    """Time opening an orchestrator on a session and reading its state."""

    def once() -> None:
        with Orchestrator.open(store=url, session_id=session_id) as orch:
            orch.session.refresh()

    return timed(once, runs, warmup=2).__dict__


def op_latency(url: str, session_id: str, runs: int) -> dict[str, Any]:
    """Time one `worker.model.set` + await on a session (its p99 shows snapshot cost)."""
    with Orchestrator.open(store=url, session_id=session_id) as orch:

        def once() -> None:
            handle = orch.task_start(
                kind="op", op="worker.model.set", worker={"worker_id": "coder", "model": "auto"}
            )
            orch.task_await(handle.task_id)

        return timed(once, runs).__dict__
