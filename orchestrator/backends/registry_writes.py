"""How the worker pool (`orchestrator.pool`) and the model servers
(`orchestrator.model_servers`) write the shared device registry: one protocol (ADR-0003,
ADR-0012), each side with its own events, reasons and claims table.

- A decision is appended at the registry version it was made on; a conflict means another
  writer moved first, and the caller decides again on the newer state.
- A start is claimed by this process (its pid and start time sign the claim); whatever the
  start produces is appended only while that claim is open (the fence), so a claim taken
  over is never fulfilled late, and a start that fails ends its claim the same way.
- How a process ended is recorded only while that still holds, so it is recorded once,
  whoever finds it first.
- A claim whose same-host claimant is gone is abandoned (`claimants` says which live).
- A process that answered as itself within the proof lease is trusted on its pid and start
  time alone (`Proofs`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from events.catalogue import Event
from events.projections import Claim, RegistryState, ServerClaim
from events.store import StreamConflict
from events.streams import StreamView
from orchestrator.processes import ProcessState, own_identity, process_state

_T = TypeVar("_T")


class RegistryWrites:
    """One side's writes to the registry (`registry`), on this `host`; `claims` picks that
    side's open claims from the state."""

    def __init__(
        self,
        registry: StreamView[RegistryState],
        host: str,
        claims: Callable[[RegistryState], Mapping[str, Claim | ServerClaim]],
    ) -> None:
        self.registry = registry
        self.host = host
        self._claims = claims

    def decide(self, make: Callable[[RegistryState], tuple[_T, list[Event]] | None]) -> _T | None:
        """Make one decision under the registry lock on the newest state and append the
        events it returns at the version it was made on. None when it must be made again:
        `make` said so (returned None), or another writer appended first."""
        with self.registry.lock:
            state = self.registry.refresh()
            version = self.registry.version
            made = make(state)
            if made is None:
                return None
            decided, events = made
            if events:
                try:
                    self.registry.log.append(self.registry.stream, events, version)
                except StreamConflict:
                    return None
            return decided

    def claim(self) -> dict[str, Any]:
        """The fields that sign a new claim: its id, this host, and this process as the
        claimant (pid and start time)."""
        pid, started = own_identity()
        return {
            "claim_id": uuid.uuid4().hex,
            "host": self.host,
            "claimant_pid": pid,
            "claimant_started_at": started,
        }

    def claimants(self, claims: Iterable[Claim | ServerClaim]) -> dict[str, ProcessState]:
        """Is each claimant of this host's claims still the process that claimed?"""
        return {
            c.claim_id: process_state(c.claimant_pid, c.claimant_started_at)
            for c in claims
            if c.host == self.host
        }

    def append_if(self, holds: Callable[[RegistryState], bool], events: list[Event]) -> bool:
        """Append `events` only while `holds` is true of the newest state (checked again
        after a conflict). False when it no longer held."""
        while True:
            with self.registry.lock:
                if not holds(self.registry.refresh()):
                    return False
                try:
                    self.registry.log.append(self.registry.stream, events, self.registry.version)
                except StreamConflict:
                    continue
                return True

    def fenced(self, claim_id: str, events: list[Event]) -> bool:
        """Append only while our claim is open: a start's facts, or its failure. False when
        the claim was taken over or ended meanwhile."""
        return self.append_if(lambda state: claim_id in self._claims(state), events)


class Proofs:
    """Processes that answered as themselves (a health check, a reply) within `lease`
    seconds: trusted on their pid and start time alone until then."""

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._at: dict[str, float] = {}

    def prove(self, instance_id: str) -> None:
        """The process answered as itself just now."""
        self._at[instance_id] = time.monotonic()

    def distrust(self, instance_id: str) -> None:
        """Forget a proof: the next look asks again."""
        self._at.pop(instance_id, None)

    def fresh(self, instance_id: str) -> bool:
        """Was the process proven within the lease?"""
        at = self._at.get(instance_id)
        return at is not None and time.monotonic() - at < self.lease
