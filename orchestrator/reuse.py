"""The reuse decision, without I/O: which registry entries may serve a request, and why not.

The pool (`orchestrator.pool`) adds the checks that need the outside world: is the pid alive
with the recorded start time, and does `/health` confirm the instance and fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from events.catalogue import ModelPolicy, RejectReason
from events.projections import Claim, RegistryEntry, RegistryState

CLAIM_TIMEOUT = timedelta(seconds=60)


@dataclass(frozen=True)
class Request:
    """What a caller asks the pool for."""

    worker_id: str
    fingerprint: str
    model: str
    model_policy: ModelPolicy
    host: str
    force_new: bool = False


def candidates(state: RegistryState, worker_id: str) -> list[RegistryEntry]:
    """Server processes recorded as ready for this worker id, newest first."""
    rows = [
        e
        for e in state.entries.values()
        if e.worker_id == worker_id and e.backend == "server" and e.status == "ready"
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
        return "profile_mismatch"
    return None


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


def claim_expired(claim: Claim, now: datetime) -> bool:
    """A claim older than any spawn may take is abandoned, wherever its claimant runs."""
    return now - claim.claimed_at > CLAIM_TIMEOUT
