"""The reuse decision, without I/O: a pure function of (registry state, request, probes, now).

The pool (`orchestrator.pool`) gathers the probes first, outside any lock: is each
candidate's pid alive with the recorded start time, and does `/health` confirm its instance
and fingerprint (skipped while a recent proof holds). `plan()` then says what to append and
what to do: reuse an entry, claim a spawn, wait for another's claim, or nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from events.catalogue import (
    Event,
    ModelPolicy,
    RejectReason,
    StopReason,
    WorkerExited,
    WorkerReused,
    WorkerReuseRejected,
    WorkerSpawnFailed,
    WorkerStopped,
)
from events.projections import Claim, RegistryEntry, RegistryState
from orchestrator.fingerprint import identity_diff
from orchestrator.processes import ProcessState

# Longer than any healthy spawn (READY within 30 s), so only an abandoned claim expires.
CLAIM_TIMEOUT = timedelta(seconds=40)


@dataclass(frozen=True)
class Request:
    """What a caller asks the pool for."""

    worker_id: str
    fingerprint: str
    model: str
    model_policy: ModelPolicy
    host: str
    force_new: bool = False
    identity: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """What the outside world said about one registry entry just now."""

    process: ProcessState
    healthy: bool | None = None  # None: not asked (gone, or proven recently)
    detail: str = ""
    stopped_reason: StopReason | None = None  # it left an exit marker saying why
    killed: bool = False  # it was ours and unusable, and has been stopped


@dataclass
class Plan:
    """The decision: events to append at the registry version it was made on, and the act."""

    events: list[Event] = field(default_factory=list)
    reuse: RegistryEntry | None = None
    wait_for: Claim | None = None
    spawn: bool = False
    unprobed: list[str] = field(default_factory=list)
    deferred: bool = False  # set by the pool: the events are recorded later, with the task
    claim_id: str | None = None  # set by the pool: the claim it appended for the spawn


def candidates(state: RegistryState, worker_id: str) -> list[RegistryEntry]:
    """Server processes recorded as serving (ready or draining) for this worker id, newest
    first."""
    rows = [
        e
        for e in state.entries.values()
        if e.worker_id == worker_id and e.backend == "server" and e.status in ("ready", "draining")
    ]
    return sorted(rows, key=lambda e: e.started_at, reverse=True)


def static_rejection(entry: RegistryEntry, request: Request) -> RejectReason | None:
    """Why `entry` cannot serve `request` judging by the log alone, or None if it may."""
    if entry.host != request.host:
        return "other_host"
    if request.force_new:
        return "force_new"
    if entry.model != request.model:
        return "model_mismatch"
    if entry.model_policy != request.model_policy:
        return "policy_mismatch"
    if entry.fingerprint != request.fingerprint:
        if entry.identity.get("providers") != request.identity.get("providers"):
            return "provider_mismatch"
        return "profile_mismatch"
    if entry.status == "draining":
        return "draining"
    return None


def to_probe(state: RegistryState, request: Request) -> list[RegistryEntry]:
    """Entries whose fate depends on the outside world: reuse candidates that pass the
    static checks, and draining processes of this host (found gone, they are recorded)."""
    return [
        e
        for e in candidates(state, request.worker_id)
        if e.host == request.host
        and (e.status == "draining" or static_rejection(e, request) is None)
    ]


def plan(
    state: RegistryState,
    request: Request,
    probes: Mapping[str, Probe],
    claimants: Mapping[str, ProcessState],
    now: datetime,
    ids: Mapping[str, Any],
    allow_spawn: bool = True,
) -> Plan:
    """Decide one request. `probes` are keyed by instance id, `claimants` by claim id (the
    state of a same-host claimant's process). Entries that need a probe and have none are
    listed in `unprobed`, and nothing else is decided."""
    out = Plan()
    missing = [e.instance_id for e in to_probe(state, request) if e.instance_id not in probes]
    if missing:
        out.unprobed = missing
        return out
    for entry in candidates(state, request.worker_id):
        probe = probes.get(entry.instance_id)
        if probe is not None and (probe.process != "alive" or probe.killed):
            out.events += _gone(entry, request, probe, ids)
            continue
        reason = static_rejection(entry, request)
        if reason is None and probe is not None and probe.healthy is False:
            out.events += _gone(entry, request, probe, ids)
            continue
        if reason is None:
            out.events.append(
                WorkerReused(**ids, instance_id=entry.instance_id, fingerprint=entry.fingerprint)
            )
            out.reuse = entry
            return out
        if reason == "force_new" or request.fingerprint not in entry.rejected_for:
            out.events.append(
                _rejected(entry, request, reason, _detail(reason, entry, request), ids)
            )
    if not allow_spawn:
        return out
    claim = None if request.force_new else pending_claim(state, request)
    if claim is not None and not claim_abandoned(claim, claimants, request.host, now):
        out.wait_for = claim
        return out
    if claim is not None:
        out.events.append(
            WorkerSpawnFailed(
                **ids,
                claim_id=claim.claim_id,
                error=f"claimant pid {claim.claimant_pid} on {claim.host} died or gave up "
                "before its worker was ready; this request takes the spawn over",
            )
        )
    out.spawn = True
    return out


def _gone(
    entry: RegistryEntry, request: Request, probe: Probe, ids: Mapping[str, Any]
) -> list[Event]:
    """A candidate that cannot serve anyone any more: why, and what became of it."""
    events: list[Event] = []
    if probe.process == "recycled":
        reason: RejectReason = "pid_recycled"
        detail = f"pid {entry.pid} now belongs to another process"
    elif probe.process == "gone":
        reason, detail = "process_gone", f"pid {entry.pid} no longer exists"
    else:
        reason, detail = "health_failed", probe.detail
    if entry.status != "draining" and static_rejection(entry, request) in (None, "force_new"):
        events.append(_rejected(entry, request, reason, detail, ids))
    events.append(ended(entry, probe, ids, detail))
    return events


def ended(
    entry: RegistryEntry, probe: Probe, ids: Mapping[str, Any], detail: str
) -> WorkerStopped | WorkerExited:
    """The event that ends the entry of a process found unusable: stopped with the reason it
    left by itself (its exit marker; a draining one that is gone was drained), stopped
    `unhealthy` when it was ours and had to be killed, else exited."""
    iid = entry.instance_id
    if probe.killed:
        return WorkerStopped(**ids, instance_id=iid, reason="unhealthy", detail=detail)
    if probe.stopped_reason is not None:
        return WorkerStopped(**ids, instance_id=iid, reason=probe.stopped_reason, detail="exited")
    if entry.status == "draining" and probe.process == "gone":
        return WorkerStopped(**ids, instance_id=iid, reason="respawn", detail="drained")
    return WorkerExited(**ids, instance_id=iid, detail=detail)


def _rejected(
    entry: RegistryEntry,
    request: Request,
    reason: RejectReason,
    detail: str,
    ids: Mapping[str, Any],
) -> WorkerReuseRejected:
    return WorkerReuseRejected(
        **ids,
        instance_id=entry.instance_id,
        reason=reason,
        detail=detail,
        fingerprint=entry.fingerprint,
        requested_fingerprint=request.fingerprint,
    )


def _detail(reason: RejectReason, entry: RegistryEntry, request: Request) -> str:
    if reason == "model_mismatch":
        return f"runs {entry.model}, requested {request.model}"
    if reason == "policy_mismatch":
        return f"runs with policy {entry.model_policy}, requested {request.model_policy}"
    if reason == "other_host":
        return f"runs on host {entry.host}, this is {request.host}"
    if reason == "force_new":
        return "force_new requested"
    if reason == "draining":
        return "draining: it finishes its running tasks, then stops"
    diff = identity_diff(entry.identity, dict(request.identity)) if entry.identity else ""
    return diff or f"fingerprint {entry.fingerprint} differs from requested {request.fingerprint}"


def pending_claim(state: RegistryState, request: Request) -> Claim | None:
    """An open claim that will produce the process this request wants, if any."""
    for claim in state.claims.values():
        if (
            claim.worker_id == request.worker_id
            and claim.fingerprint == request.fingerprint
            and claim.host == request.host
        ):
            return claim
    return None


def claim_abandoned(
    claim: Claim, claimants: Mapping[str, ProcessState], host: str, now: datetime
) -> bool:
    """A claim older than any spawn may take is abandoned wherever its claimant runs; on
    this host, so is one whose claimant process is gone."""
    if now - claim.claimed_at > CLAIM_TIMEOUT:
        return True
    return claim.host == host and claimants.get(claim.claim_id, "alive") != "alive"


def recorded_live(
    state: RegistryState, host: str, worker_id: str | None = None
) -> list[RegistryEntry]:
    """Entries of `host` recorded as running (of one worker id, or all), in registry order:
    what the registry says, nothing probed."""
    return [
        e
        for e in state.entries.values()
        if e.live and e.host == host and worker_id in (None, e.worker_id)
    ]


def live_on_host(state: RegistryState, host: str) -> list[RegistryEntry]:
    """Entries of `host` recorded as running, least recently used first."""
    rows = recorded_live(state, host)
    return sorted(rows, key=lambda e: e.last_used_at or e.started_at)
