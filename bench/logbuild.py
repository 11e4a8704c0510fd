"""Build a realistic log of a given size, then time opening a session and replaying it.

The log is many sessions' tasks (TaskStarted, ModelResolved, TaskCompleted and a WorkerReused
in the registry per task, an override now and then), written through the same `EventLog` the
orchestrator uses, in batches. The measured session, `bench`, is small and written last.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.measure import Stats, timed
from events.catalogue import (
    Event,
    ModelResolved,
    TaskCompleted,
    TaskStarted,
    WorkerModelSet,
    WorkerReady,
    WorkerReused,
    WorkerSpawned,
)
from events.replay import replay
from events.store import EventLog
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
    registry_version = 0
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
        log.append("registry", registry, registry_version)
        registry_version += len(registry)
        written += len(batch) + len(registry)
        registry = []
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
