"""The `kind="op"` operations: memory notes, and worker model set/reset, spawn and stop."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from events.catalogue import (
    MemoryDone,
    MemoryLinked,
    MemoryPut,
    WorkerModelReset,
    WorkerModelSet,
)
from orchestrator.api import MemoryPayload, TaskStartArgs, WorkerPayload
from orchestrator.resolver import resolve

if TYPE_CHECKING:
    from orchestrator.orchestrator import Orchestrator

Result = dict[str, Any]


def run(orch: Orchestrator, task_id: str, args: TaskStartArgs) -> Result:
    """Run one op and return its structured result (errors raise, the caller records them)."""
    assert args.op is not None
    if args.op.startswith("memory."):
        assert args.memory is not None
        return _MEMORY_OPS[args.op](orch, task_id, args.memory)
    assert args.worker is not None
    return _WORKER_OPS[args.op](orch, task_id, args.worker)


# --- memory ---------------------------------------------------------------------------------


def memory_put(orch: Orchestrator, task_id: str, m: MemoryPayload) -> Result:
    """Write a note."""
    orch.memory.append(
        [
            MemoryPut(
                session_id=orch.session_id,
                task_id=task_id,
                key=str(m.key),
                value=str(m.value),
                tags=m.tags,
            )
        ]
    )
    return {"key": m.key, "value": m.value, "tags": m.tags}


def memory_link(orch: Orchestrator, task_id: str, m: MemoryPayload) -> Result:
    """Link two notes."""
    orch.memory.append(
        [
            MemoryLinked(
                session_id=orch.session_id,
                task_id=task_id,
                from_key=str(m.from_key),
                to_key=str(m.to_key),
                link_type=str(m.type),
            )
        ]
    )
    return {"from_key": m.from_key, "to_key": m.to_key, "type": m.type}


def memory_done(orch: Orchestrator, task_id: str, m: MemoryPayload) -> Result:
    """Record a task's summary as done."""
    orch.memory.append(
        [
            MemoryDone(
                session_id=orch.session_id,
                task_id=task_id,
                done_task_id=str(m.task_id),
                summary=str(m.summary),
            )
        ]
    )
    return {"task_id": m.task_id, "summary": m.summary}


# --- worker model set / reset ---------------------------------------------------------------


def model_set(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Result:
    """Pin (sticky) or tag (dynamic) this session's model for a worker."""
    profile = orch.profile(w.worker_id)
    policy = w.model_policy or "sticky"
    res = resolve(str(w.model), profile, orch.config, orch.catalogue())
    orch.record(
        WorkerModelSet(
            session_id=orch.session_id,
            worker_id=w.worker_id,
            task_id=task_id,
            model_ref=str(w.model),
            resolved_model=res.resolved_model,
            model_policy=policy,
            reason=res.reason,
        )
    )
    respawned = _respawn(orch, task_id, w)
    return {
        "worker_id": w.worker_id,
        "model_ref": w.model,
        "model": res.resolved_model,
        "model_policy": policy,
        "reason": res.reason,
        "running": _running(orch, w.worker_id),
        "respawned": respawned,
    }


def model_reset(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Result:
    """Drop this session's override: the profile's configured model applies again."""
    profile = orch.profile(w.worker_id)
    previous = orch.session.refresh().overrides.get(w.worker_id)
    orch.record(
        WorkerModelReset(
            session_id=orch.session_id,
            worker_id=w.worker_id,
            task_id=task_id,
            previous_model_ref=previous.model_ref if previous else None,
        )
    )
    after = orch.session_decision(w.worker_id)
    respawned = _respawn(orch, task_id, w)
    return {
        "worker_id": w.worker_id,
        "model_ref": profile.model,
        "model": after.resolved_model,
        "model_policy": "dynamic",
        "reason": after.reason,
        "running": _running(orch, w.worker_id),
        "respawned": respawned,
    }


def _running(orch: Orchestrator, worker_id: str) -> bool:
    return bool(orch.pool.live_entries(worker_id)) or worker_id in orch.agents


def _respawn(orch: Orchestrator, task_id: str, w: WorkerPayload) -> bool:
    """Replace the worker's running processes whose default model is not the new one with
    one process whose default is (SPEC section 6: a force-new spawn)."""
    if not w.respawn:
        return False
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


def spawn(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Result:
    """Get (reuse) or start the worker's process for this session's model."""
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


def stop(orch: Orchestrator, task_id: str, w: WorkerPayload) -> Result:
    """Stop every process of the worker on this host (and its in-process agent); processes
    found already dead are listed as `exited`."""
    orch.profile(w.worker_id)
    ids = {"session_id": orch.session_id, "worker_id": w.worker_id, "task_id": task_id}
    stopped: list[str] = []
    exited: list[str] = []
    for entry in orch.pool.live_entries(w.worker_id):
        (stopped if orch.pool.stop(entry, ids) else exited).append(entry.instance_id)
    agent = orch.agents.pop(w.worker_id, None)
    if agent is not None:
        stopped.append(agent.instance_id)
    return {"worker_id": w.worker_id, "stopped": stopped, "exited": exited}


_MEMORY_OPS: dict[str, Callable[[Orchestrator, str, MemoryPayload], Result]] = {
    "memory.put": memory_put,
    "memory.link": memory_link,
    "memory.done": memory_done,
}
_WORKER_OPS: dict[str, Callable[[Orchestrator, str, WorkerPayload], Result]] = {
    "worker.model.set": model_set,
    "worker.model.reset": model_reset,
    "worker.spawn": spawn,
    "worker.stop": stop,
}
