"""The `kind="op"` operations: memory notes, and worker model set/reset, spawn and stop."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from events.catalogue import (
    Event,
    MemoryDone,
    MemoryLinked,
    MemoryPut,
    WorkerModelReset,
    WorkerModelSet,
)
from orchestrator.api import MemoryPayload, TaskStartArgs, WorkerPayload
from orchestrator.resolver import decide_model, resolve

if TYPE_CHECKING:
    from orchestrator.orchestrator import Orchestrator

Result = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What an op decided: session and memory events to record with the task, its result,
    and, for ops that touch processes, the step to run once the decision is in the log."""

    result: Result = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    memory: list[Event] = field(default_factory=list)
    then: Callable[[], Result] | None = None


def run(orch: Orchestrator, task_id: str, args: TaskStartArgs) -> Outcome:
    """Decide one op (errors raise; the caller records them)."""
    assert args.op is not None
    if args.op.startswith("memory."):
        assert args.memory is not None
        return _MEMORY_OPS[args.op](orch, task_id, args.memory)
    assert args.worker is not None
    return _WORKER_OPS[args.op](orch, task_id, args.worker)


# --- memory ---------------------------------------------------------------------------------


def memory_put(orch: Orchestrator, task_id: str, m: MemoryPayload) -> Outcome:
    """Write a note."""
    put = MemoryPut(
        session_id=orch.session_id, task_id=task_id, key=str(m.key), value=str(m.value), tags=m.tags
    )
    return Outcome({"key": m.key, "value": m.value, "tags": m.tags}, memory=[put])


def memory_link(orch: Orchestrator, task_id: str, m: MemoryPayload) -> Outcome:
    """Link two notes."""
    link = MemoryLinked(
        session_id=orch.session_id,
        task_id=task_id,
        from_key=str(m.from_key),
        to_key=str(m.to_key),
        link_type=str(m.type),
    )
    return Outcome({"from_key": m.from_key, "to_key": m.to_key, "type": m.type}, memory=[link])


def memory_done(orch: Orchestrator, task_id: str, m: MemoryPayload) -> Outcome:
    """Record a task's summary as done."""
    done = MemoryDone(
        session_id=orch.session_id,
        task_id=task_id,
        done_task_id=str(m.task_id),
        summary=str(m.summary),
    )
    return Outcome({"task_id": m.task_id, "summary": m.summary}, memory=[done])


# --- worker model set / reset ---------------------------------------------------------------


def model_set(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Outcome:
    """Pin (sticky) or tag (dynamic) this session's model for a worker."""
    profile = orch.profile(w.worker_id)
    policy = w.model_policy or "sticky"
    res = resolve(str(w.model), profile, orch.config, orch.catalogue())
    event = WorkerModelSet(
        session_id=orch.session_id,
        worker_id=w.worker_id,
        task_id=task_id,
        model_ref=str(w.model),
        resolved_model=res.resolved_model,
        model_policy=policy,
        reason=res.reason,
    )
    result = {
        "worker_id": w.worker_id,
        "model_ref": w.model,
        "model": res.resolved_model,
        "model_policy": policy,
        "reason": res.reason,
    }
    return _with_respawn(orch, task_id, w, result, event)


def model_reset(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Outcome:
    """Drop this session's override: the profile's configured model applies again."""
    profile = orch.profile(w.worker_id)
    previous = orch.session.refresh().overrides.get(w.worker_id)
    after = decide_model(w.worker_id, None, None, orch.config, orch.catalogue())
    event = WorkerModelReset(
        session_id=orch.session_id,
        worker_id=w.worker_id,
        task_id=task_id,
        previous_model_ref=previous.model_ref if previous else None,
    )
    result = {
        "worker_id": w.worker_id,
        "model_ref": profile.model,
        "model": after.resolved_model,
        "model_policy": "dynamic",
        "reason": after.reason,
    }
    return _with_respawn(orch, task_id, w, result, event)


def _with_respawn(
    orch: Orchestrator, task_id: str, w: WorkerPayload, result: Result, event: Event
) -> Outcome:
    if not w.respawn:
        return Outcome(
            {**result, "running": _running(orch, w.worker_id), "respawned": False}, events=[event]
        )

    def then() -> Result:
        respawned = _respawn(orch, task_id, w)
        return {**result, "running": _running(orch, w.worker_id), "respawned": respawned}

    return Outcome(events=[event], then=then)


def _running(orch: Orchestrator, worker_id: str) -> bool:
    return bool(orch.pool.live_entries(worker_id)) or worker_id in orch.agents


def _respawn(orch: Orchestrator, task_id: str, w: WorkerPayload) -> bool:
    """Replace the worker's running processes whose default model is not the new one with
    one process whose default is (SPEC section 6: a force-new spawn)."""
    after = orch.worker_spec(w.worker_id, orch.session_decision(w.worker_id))
    if orch.profile(w.worker_id).backend == "agent":
        agent = orch.agents.get(w.worker_id)
        if agent is None or agent.model == after.model:
            return False
        orch.agent_for(after, force_new=True)
        return True
    ids = {"session_id": orch.session_id, "worker_id": w.worker_id, "task_id": task_id}
    old = [e for e in orch.pool.live_entries(w.worker_id) if e.model != after.model]
    if not old:
        return False
    for entry in old:
        orch.pool.stop(entry, ids, reason=f"respawn with {after.model}")
    orch.pool.get_or_spawn(after, orch.session_id, task_id, force_new=True)
    return True


# --- spawn / stop ---------------------------------------------------------------------------


def spawn(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Outcome:
    """Get (reuse) or start the worker's process for this session's model."""
    orch.profile(w.worker_id)
    return Outcome(then=lambda: _spawn(orch, task_id, w))


def _spawn(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Result:
    decision = orch.session_decision(w.worker_id)
    spec = orch.worker_spec(w.worker_id, decision)
    base = {
        "worker_id": w.worker_id,
        "fingerprint": spec.fingerprint,
        "model": spec.model,
        "model_policy": spec.model_policy,
    }
    if orch.profile(w.worker_id).backend == "agent":
        agent, reused = orch.agent_for(spec, force_new=w.force_new)
        return {
            **base,
            "instance_id": agent.instance_id,
            "pid": os.getpid(),
            "url": None,
            "reused": reused,
            "reason": "in-process agent worker",
        }
    acquired = orch.pool.get_or_spawn(spec, orch.session_id, task_id, force_new=w.force_new)
    assert acquired is not None
    e = acquired.entry
    return {
        **base,
        "instance_id": e.instance_id,
        "pid": e.pid,
        "url": e.url,
        "reused": acquired.reused,
        "reason": acquired.reason,
    }


def stop(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Outcome:
    """Stop every process of the worker on this host (and its in-process agent); processes
    found already dead are listed as `exited`."""
    orch.profile(w.worker_id)
    return Outcome(then=lambda: _stop(orch, task_id, w))


def _stop(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Result:
    ids = {"session_id": orch.session_id, "worker_id": w.worker_id, "task_id": task_id}
    stopped: list[str] = []
    exited: list[str] = []
    for entry in orch.pool.live_entries(w.worker_id):
        (stopped if orch.pool.stop(entry, ids) else exited).append(entry.instance_id)
    agent = orch.agents.pop(w.worker_id, None)
    if agent is not None:
        stopped.append(agent.instance_id)
    return {"worker_id": w.worker_id, "stopped": stopped, "exited": exited}


_MEMORY_OPS: dict[str, Callable[[Orchestrator, str, MemoryPayload], Outcome]] = {
    "memory.put": memory_put,
    "memory.link": memory_link,
    "memory.done": memory_done,
}
_WORKER_OPS: dict[str, Callable[[Orchestrator, str, WorkerPayload], Outcome]] = {
    "worker.model.set": model_set,
    "worker.model.reset": model_reset,
    "worker.spawn": spawn,
    "worker.stop": stop,
}
