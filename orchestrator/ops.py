"""The `kind="op"` operations as pure deciders: (context, task, payload) -> Decision.

A decider reads only what `OpContext` gives it and returns the events to record with the
task and its result. Ops that touch processes also return `act`, the step the orchestrator
runs once the decision is in the log, against the small `Workers` interface; so this module
imports neither the orchestrator nor the views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from events.catalogue import (
    Event,
    MemoryDone,
    MemoryLinked,
    MemoryPut,
    SessionForked,
    WorkerModelReset,
    WorkerModelSet,
)
from events.projections import Override
from orchestrator.api import (
    OP_FIELDS,
    MemoryPayload,
    SessionPayload,
    TaskStartArgs,
    WorkerPayload,
)
from orchestrator.config import OrchestratorConfig, ProfileConfig
from orchestrator.errors import OrchestratorError
from orchestrator.resolver import CatalogueModel, ModelDecision, decide_model, resolve

Result = dict[str, Any]


class Workers(Protocol):
    """What an op's `act` step may do with worker processes."""

    def spawn(self, worker_id: str, task_id: str, force_new: bool) -> Result:
        """Get (reuse) or start the worker's process for this session's model."""
        ...

    def stop(self, worker_id: str, task_id: str) -> Result:
        """Stop the worker's processes on this host."""
        ...

    def respawn(self, worker_id: str, task_id: str) -> bool:
        """Start now the process the session's model asks for; retire the old one."""
        ...

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running?"""
        ...


class OpContext(Protocol):
    """What a decider may read."""

    session_id: str
    config: OrchestratorConfig

    def catalogue(self) -> list[CatalogueModel]:
        """The model catalogue now."""
        ...

    def profile(self, worker_id: str) -> ProfileConfig:
        """A known profile (raises `ResolutionError` with suggestions)."""
        ...

    def override(self, worker_id: str) -> Override | None:
        """This session's override for a worker, if any."""
        ...

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running?"""
        ...

    def in_registry(self, worker_id: str) -> bool:
        """Has the device registry ever recorded a process of the worker (any config's)?"""
        ...

    def overrides_at(self, session_id: str, position: int) -> dict[str, Override] | None:
        """A session's overrides as of a log position; None if it had no events by then."""
        ...

    def head(self) -> int:
        """The newest log position."""
        ...


class OpError(OrchestratorError, RuntimeError):
    """A well-formed op that cannot be done; the message says why (its task ends failed)."""


@dataclass(frozen=True)
class Decision:
    """What an op decided: the events to record with the task (each lands on the stream
    its class declares: this session's, the memory's, a forked session's), its result, and,
    for ops that touch processes, the step to run once the decision is in the log."""

    result: Result = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    act: Callable[[Workers], Result] | None = None


def decide(ctx: OpContext, task_id: str, args: TaskStartArgs) -> Decision:
    """Decide one op (errors raise; the caller records them). The schema has checked that
    its payload group is there."""
    assert args.op is not None
    group, _ = OP_FIELDS[args.op]
    payload = getattr(args, group)
    assert payload is not None
    return DECIDERS[args.op](ctx, task_id, payload)


# --- memory ---------------------------------------------------------------------------------


def memory_put(ctx: OpContext, task_id: str, m: MemoryPayload) -> Decision:
    """Write a note."""
    put = MemoryPut(
        session_id=ctx.session_id, task_id=task_id, key=str(m.key), value=str(m.value), tags=m.tags
    )
    return Decision({"key": m.key, "value": m.value, "tags": m.tags}, events=[put])


def memory_link(ctx: OpContext, task_id: str, m: MemoryPayload) -> Decision:
    """Link two notes."""
    link = MemoryLinked(
        session_id=ctx.session_id,
        task_id=task_id,
        from_key=str(m.from_key),
        to_key=str(m.to_key),
        link_type=str(m.type),
    )
    return Decision({"from_key": m.from_key, "to_key": m.to_key, "type": m.type}, events=[link])


def memory_done(ctx: OpContext, task_id: str, m: MemoryPayload) -> Decision:
    """Record a task's summary as done."""
    done = MemoryDone(
        session_id=ctx.session_id,
        task_id=task_id,
        done_task_id=str(m.task_id),
        summary=str(m.summary),
    )
    return Decision({"task_id": m.task_id, "summary": m.summary}, events=[done])


# --- worker model set / reset ---------------------------------------------------------------


def model_set(ctx: OpContext, task_id: str, w: WorkerPayload) -> Decision:
    """Pin (sticky) or tag (dynamic) this session's model for a worker."""
    ctx.profile(w.worker_id)  # an unknown worker id fails here, with suggestions
    policy = w.model_policy or "sticky"
    res = resolve(str(w.model), ctx.config, ctx.catalogue())
    event = WorkerModelSet(
        session_id=ctx.session_id,
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
    return _with_respawn(ctx, task_id, w, result, event)


def model_reset(ctx: OpContext, task_id: str, w: WorkerPayload) -> Decision:
    """Drop this session's override: the profile's configured model applies again."""
    profile = ctx.profile(w.worker_id)
    previous = ctx.override(w.worker_id)
    after: ModelDecision = decide_model(w.worker_id, None, None, ctx.config, ctx.catalogue())
    event = WorkerModelReset(
        session_id=ctx.session_id,
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
    return _with_respawn(ctx, task_id, w, result, event)


def _with_respawn(
    ctx: OpContext, task_id: str, w: WorkerPayload, result: Result, event: Event
) -> Decision:
    if not w.respawn:  # a pure decision: one atomic append says it all
        return Decision(
            {**result, "running": ctx.running(w.worker_id), "respawned": False}, events=[event]
        )

    def respawn(workers: Workers) -> Result:
        respawned = workers.respawn(w.worker_id, task_id)
        return {**result, "running": workers.running(w.worker_id), "respawned": respawned}

    return Decision(events=[event], act=respawn)


# --- session fork ---------------------------------------------------------------------------


def fork(ctx: OpContext, task_id: str, s: SessionPayload) -> Decision:
    """Start a new session whose overrides are those of another as of a log position."""
    head = ctx.head()
    if s.position > head:
        raise OpError(
            f"session.fork: position {s.position} is past the end of the log (the newest "
            f"position is {head})."
        )
    overrides = ctx.overrides_at(s.from_session_id, s.position)
    if overrides is None:
        raise OpError(
            f'session.fork: session "{s.from_session_id}" has no events at or before position '
            f"{s.position}; see task_list(view='events', session_id=...) for its positions."
        )
    new_id = f"fork-{task_id.removeprefix('t-')}"  # unique as the task id, and replayable
    dumped = {w: o.model_dump(mode="json") for w, o in sorted(overrides.items())}
    forked = SessionForked(
        session_id=new_id,
        task_id=task_id,
        from_session_id=s.from_session_id,
        position=s.position,
        overrides=dumped,
    )
    result = {
        "session_id": new_id,
        "from_session_id": s.from_session_id,
        "position": s.position,
        "overrides": {
            w: {k: o[k] for k in ("model_ref", "resolved_model", "model_policy")}
            for w, o in dumped.items()
        },
    }
    return Decision(result, events=[forked])


# --- spawn / stop ---------------------------------------------------------------------------


def spawn(ctx: OpContext, task_id: str, w: WorkerPayload) -> Decision:
    """Get (reuse) or start the worker's process for this session's model."""
    ctx.profile(w.worker_id)
    return Decision(act=lambda workers: workers.spawn(w.worker_id, task_id, w.force_new))


def stop(ctx: OpContext, task_id: str, w: WorkerPayload) -> Decision:
    """Stop every process of the worker on this host (and its in-process agent); processes
    found already dead are listed as `exited`. The registry is enough: a worker id that this
    configuration has no profile for is stopped too, if the registry knows it."""
    if w.worker_id not in ctx.config.profiles and not ctx.in_registry(w.worker_id):
        ctx.profile(w.worker_id)  # raises: unknown here and never recorded
    return Decision(act=lambda workers: workers.stop(w.worker_id, task_id))


# Every op's decider, by name; the names are the Task API's (`api.OP_FIELDS`), checked here.
DECIDERS: dict[str, Callable[[OpContext, str, Any], Decision]] = {
    "memory.put": memory_put,
    "memory.link": memory_link,
    "memory.done": memory_done,
    "worker.model.set": model_set,
    "worker.model.reset": model_reset,
    "worker.spawn": spawn,
    "worker.stop": stop,
    "session.fork": fork,
}
assert set(DECIDERS) == set(OP_FIELDS), "ops.DECIDERS and api.OP_FIELDS name other ops"
