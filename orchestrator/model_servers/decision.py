"""The decision, pure (`plan`, `room`): a function of the registry state, the request and what
probes said about each server (alive, busy, last used), as `orchestrator.reuse` is for worker
processes. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from events.catalogue import (
    Event,
    ModelServerExited,
    ModelServerReused,
    ModelServerReuseRejected,
    ModelServerStartFailed,
    ModelServerStopped,
)
from events.projections import ModelServerEntry, RegistryState, ServerClaim
from orchestrator.fingerprint import identity_diff
from orchestrator.processes import ProcessState

# A claim outlives its start_timeout by this much only when its claimant is gone.
CLAIM_MARGIN = 30.0


@dataclass(frozen=True)
class ServerRequest:
    """What a caller asks for: the server of one model with one fingerprint, on a host."""

    model: str
    fingerprint: str
    host: str
    memory_mb: int = 0
    start_timeout: float = 300.0
    identity: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerProbe:
    """What the outside world said about one server just now."""

    process: ProcessState
    busy: bool = False  # a request holds its in-flight lock
    last_used: float | None = None  # epoch seconds of its last use
    healthy: bool | None = None  # None: not asked (gone, busy, or proven recently)
    detail: str = ""
    exit_reason: str | None = None  # what its supervisor left in `exit`
    exit_status: int | None = None
    killed: bool = False  # ours, alive and not answering: it has been stopped


@dataclass
class ServerPlan:
    """The decision: events to append at the registry version it was made on, and what
    to do: reuse a server, wait for another's claim, or start one."""

    events: list[Event] = field(default_factory=list)
    reuse: ModelServerEntry | None = None
    wait_for: ServerClaim | None = None
    start: bool = False
    unprobed: list[str] = field(default_factory=list)
    claim_id: str | None = None  # set by the I/O part: the claim it appended


def candidates(state: RegistryState, request: ServerRequest) -> list[ModelServerEntry]:
    """Servers of the requested model on the host recorded ready, newest first."""
    rows = [
        s
        for s in state.servers.values()
        if s.model == request.model and s.host == request.host and s.status == "ready"
    ]
    return sorted(rows, key=lambda s: s.started_at, reverse=True)


def plan(
    state: RegistryState,
    request: ServerRequest,
    probes: Mapping[str, ServerProbe],
    claimants: Mapping[str, ProcessState],
    now: datetime,
    ids: Mapping[str, Any],
) -> ServerPlan:
    """Decide one request. `probes` are keyed by instance id, `claimants` by claim id (the
    state of a same-host claimant's process). Servers that need a probe and have none are
    listed in `unprobed`, and nothing else is decided."""
    out = ServerPlan()
    found = candidates(state, request)
    out.unprobed = [s.instance_id for s in found if s.instance_id not in probes]
    if out.unprobed:
        return out
    for server in found:
        probe = probes[server.instance_id]
        if probe.process != "alive" or probe.killed:
            out.events.append(gone_event(server, probe, ids))
            continue
        if server.fingerprint != request.fingerprint:
            if request.fingerprint not in server.rejected_for:
                diff = identity_diff(server.identity, dict(request.identity))
                out.events.append(
                    ModelServerReuseRejected(
                        **ids,
                        instance_id=server.instance_id,
                        reason="provider_mismatch",
                        detail=diff or "another fingerprint",
                        fingerprint=server.fingerprint,
                        requested_fingerprint=request.fingerprint,
                    )
                )
            continue
        out.events.append(
            ModelServerReused(**ids, instance_id=server.instance_id, fingerprint=server.fingerprint)
        )
        out.reuse = server
        return out
    claim = pending_claim(state, request)
    if claim is not None and not claim_abandoned(claim, claimants, request.host, now):
        out.wait_for = claim
        return out
    if claim is not None:
        out.events.append(
            ModelServerStartFailed(
                **ids,
                claim_id=claim.claim_id,
                instance_id=claim.instance_id,
                error=f"claimant pid {claim.claimant_pid} died or gave up before the server "
                "was ready; this request takes the start over",
            )
        )
    out.start = True
    return out


def gone_event(server: ModelServerEntry, probe: ServerProbe, ids: Mapping[str, Any]) -> Event:
    """What became of a server found unusable: stopped on purpose (idle, unhealthy), or
    found dead."""
    iid = server.instance_id
    if probe.killed:
        return ModelServerStopped(**ids, instance_id=iid, reason="unhealthy", detail=probe.detail)
    if probe.exit_reason == "idle":
        return ModelServerStopped(
            **ids, instance_id=iid, reason="idle", detail="stopped by its supervisor"
        )
    if probe.process == "recycled":
        detail = f"pid {server.pid} now belongs to another process"
    elif probe.exit_status is not None:
        detail = f"pid {server.pid} exited with status {probe.exit_status}"
    else:
        detail = f"pid {server.pid} no longer exists"
    if probe.exit_reason and probe.exit_reason != "exited":
        detail += f" ({probe.exit_reason})"
    return ModelServerExited(**ids, instance_id=iid, detail=detail, exit_status=probe.exit_status)


def pending_claim(state: RegistryState, request: ServerRequest) -> ServerClaim | None:
    """An open claim that will produce the server this request wants, if any."""
    for claim in state.server_claims.values():
        if claim.fingerprint == request.fingerprint and claim.host == request.host:
            return claim
    return None


def claim_abandoned(
    claim: ServerClaim, claimants: Mapping[str, ProcessState], host: str, now: datetime
) -> bool:
    """A claim older than its start may take is abandoned wherever its claimant runs; on
    this host, so is one whose claimant process is gone."""
    if now - claim.claimed_at > timedelta(seconds=claim.start_timeout + CLAIM_MARGIN):
        return True
    return claim.host == host and claimants.get(claim.claim_id, "alive") != "alive"


@dataclass(frozen=True)
class Room:
    """Whether a start fits: the idle servers to evict first (least recently used first),
    or why it must wait (every candidate busy or starting) or cannot ever fit."""

    evict: list[ModelServerEntry] = field(default_factory=list)
    wait: str | None = None
    impossible: str | None = None
    gone: list[ModelServerEntry] = field(default_factory=list)  # found dead meanwhile


def room(
    state: RegistryState,
    request: ServerRequest,
    probes: Mapping[str, ServerProbe],
    max_servers: int,
    memory_limit: int | None,
    claim_id: str | None = None,
) -> Room:
    """Which servers a start of `request` must evict to stay within `max_servers` live
    servers and `memory_limit` MB on its host. Servers starting and other open claims
    count; only ready servers with no request in flight are evicted, least recently used
    first. Servers of the host must all be probed (`probes`)."""
    if memory_limit is not None and request.memory_mb > memory_limit:
        return Room(
            impossible=f"{request.model} needs {request.memory_mb} MB; [pool] memory_mb is "
            f"{memory_limit}"
        )
    live = [s for s in state.servers.values() if s.host == request.host and s.live]
    gone = [s for s in live if s.instance_id in probes and probes[s.instance_id].process != "alive"]
    live = [s for s in live if s not in gone]
    others = [
        c
        for c in state.server_claims.values()
        if c.host == request.host and c.claim_id != claim_id and c.instance_id is None
    ]
    count = len(live) + len(others) + 1
    memory = sum(s.memory_mb for s in live) + request.memory_mb
    idle = sorted(
        (
            s
            for s in live
            if s.status == "ready"
            and s.claim_id != claim_id
            and not probes.get(s.instance_id, ServerProbe("alive", busy=True)).busy
        ),
        key=lambda s: _last_used(s, probes),
    )
    evict: list[ModelServerEntry] = []
    while count > max_servers or (memory_limit is not None and memory > memory_limit):
        if not idle:
            why = (
                f"max_model_servers ({max_servers})"
                if count > max_servers
                else f"[pool] memory_mb ({memory_limit} MB)"
            )
            return Room(wait=f"{why} reached and every other model server is busy", gone=gone)
        victim = idle.pop(0)
        evict.append(victim)
        count -= 1
        memory -= victim.memory_mb
    return Room(evict=evict, gone=gone)


def _last_used(server: ModelServerEntry, probes: Mapping[str, ServerProbe]) -> float:
    probe = probes.get(server.instance_id)
    if probe is not None and probe.last_used is not None:
        return probe.last_used
    return (server.last_used_at or server.started_at).timestamp()
