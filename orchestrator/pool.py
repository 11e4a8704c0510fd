"""The worker pool: get or spawn server worker processes through the device registry.

Every decision is appended to the `registry` stream at the version it was made on. Two
requesters (threads, processes or hosts) that decide at once cannot both win: the second
append conflicts, and it decides again on the newer state, where it finds the first one's
claim and waits for the process that claim produces (ADR-0003).

The decision itself is `orchestrator.reuse.plan`, pure. This module does the I/O around it:
probing the candidates before the registry lock is taken (never while it is held), claiming
a spawn, starting its process (through the `WorkerLauncher`), registering it only while its
claim still stands (a claim taken over is fenced: its late process is stopped), and making
room by eviction. The registry's write protocol is shared with the model servers
(`orchestrator.backends.registry_writes`); probing, recording ends, stopping and draining
the recorded processes are `PoolProcesses`' (`orchestrator.pool_processes`).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from events.catalogue import (
    Event,
    WorkerReady,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerSpawnRequested,
    WorkerStopped,
)
from events.projections import RegistryEntry, RegistryState
from orchestrator.backends.client import WorkerClient, WorkerReplyError, WorkerUnreachable

# The spec lives with the backends; importing it from here still works.
from orchestrator.backends.spec import WorkerSpec
from orchestrator.launcher import READY_TIMEOUT, SpawnError
from orchestrator.pool_processes import WAIT_POLL, PoolProcesses
from orchestrator.processes import ProcessState, start_time
from orchestrator.reuse import CLAIM_TIMEOUT, Plan, Probe, Request, live_on_host, plan, to_probe

__all__ = ["ACQUIRED_GRACE", "ROOM_WAIT", "Acquired", "SpawnError", "WorkerPool", "WorkerSpec"]

# Eviction never stops a process with a request in flight or acquired (or used) this
# recently; a spawn that needs room waits for one, at most ROOM_WAIT seconds, then fails.
ACQUIRED_GRACE = 5.0
ROOM_WAIT = 30.0
ROOM_POLL = 0.2


@dataclass(frozen=True)
class Acquired:
    """The process that will serve a request, and how it was obtained. `deferred` are
    registry facts still to be recorded: a plain reuse (`WorkerReused`, nothing rejected)
    is recorded with the task's end, in the same transaction, instead of costing an append
    of its own."""

    entry: RegistryEntry
    reused: bool
    reason: str
    deferred: tuple[Event, ...] = ()


class WorkerPool(PoolProcesses):
    """Server workers of one orchestrator, backed by the shared registry stream: gets or
    spawns them (`get_or_spawn`); what it knows of those recorded is `PoolProcesses`'."""

    # --- getting a process -----------------------------------------------------------------

    def get_or_spawn(
        self,
        spec: WorkerSpec,
        ids: dict[str, Any],
        force_new: bool = False,
        spawn: bool = True,
        idle_timeout: float = 900.0,
        max_processes: int = 8,
    ) -> Acquired | None:
        """Reuse a matching live process, or spawn exactly one. None if `spawn` is False
        and nothing matches."""
        request = spec.request(self.host, force_new)
        # Outlast an abandoned claim's expiry, so a waiter takes it over instead of failing.
        deadline = time.monotonic() + CLAIM_TIMEOUT.total_seconds() + READY_TIMEOUT
        probes: dict[str, Probe] = {}
        while True:
            # Probe what the last look knew (no read, no lock); the decision re-reads and
            # asks again for anything new.
            with self.registry.lock:  # a consistent copy: folds update entries in place
                state = self.registry.state
                looked = [e.model_copy() for e in to_probe(state, request)]
                claims = [c.model_copy() for c in state.claims.values()]
            for entry in looked:
                if entry.status == "ready":
                    self.mark_acquired(entry.instance_id)  # before deciding: see `_evict`
            probes.update(self._probe(looked, probes))
            claimants = self.writes.claimants(claims)
            decided = self._decide(request, ids, probes, claimants, spawn)
            if decided is None:
                continue  # the registry moved on, or a new candidate needs probing
            if decided.reuse is not None:
                deferred = tuple(decided.events) if decided.deferred else ()
                return Acquired(decided.reuse, True, _reuse_reason(decided.reuse), deferred)
            if decided.claim_id is not None:
                acquired = self._spawn(
                    spec, decided.claim_id, ids, force_new, idle_timeout, max_processes
                )
                if acquired is not None:
                    return acquired
                probes.clear()  # fenced: our claim was taken over; look again
                continue
            if decided.wait_for is None:
                return None
            if time.monotonic() > deadline:
                raise SpawnError(
                    f'Timed out waiting for another process to spawn worker "{spec.worker_id}".'
                )
            time.sleep(WAIT_POLL)
            probes.clear()

    def _decide(
        self,
        request: Request,
        ids: dict[str, Any],
        probes: dict[str, Probe],
        claimants: dict[str, ProcessState],
        spawn: bool,
    ) -> Plan | None:
        """One decision under the registry lock, appended at the version it was made on.
        None when it must be made again (a conflict, or an entry not probed yet)."""

        def make(state: RegistryState) -> tuple[Plan, list[Event]] | None:
            decided = plan(state, request, probes, claimants, datetime.now(UTC), ids, spawn)
            if decided.unprobed:
                return None
            if decided.spawn:
                claim = self.writes.claim()
                decided.claim_id = claim["claim_id"]
                decided.events.append(
                    WorkerSpawnRequested(
                        **ids,
                        **claim,
                        fingerprint=request.fingerprint,
                        model=request.model,
                        model_policy=request.model_policy,
                        force_new=request.force_new,
                    )
                )
            # A reuse that rejects nothing, by a session that used the process before,
            # changes nothing another decision reads: it is recorded with the task's end
            # instead of costing an append of its own. A session's first use is appended
            # now, so a respawn elsewhere knows the process is shared.
            decided.deferred = (
                decided.reuse is not None
                and len(decided.events) == 1
                and ids.get("session_id") in decided.reuse.sessions
            )
            return decided, [] if decided.deferred else decided.events

        return self.writes.decide(make)

    # --- spawning --------------------------------------------------------------------------

    def _spawn(
        self,
        spec: WorkerSpec,
        claim_id: str,
        ids: dict[str, Any],
        force_new: bool,
        idle_timeout: float,
        max_processes: int,
    ) -> Acquired | None:
        """Start the process of our claim and register it, or end the claim failed. None
        when the claim was taken over meanwhile (fenced: the late process is stopped)."""
        instance_id = f"{spec.worker_id}-{uuid.uuid4().hex[:12]}"
        proc: subprocess.Popen[bytes] | None = None
        try:
            self._make_room(ids, max_processes)
            proc, url = self.launcher.launch(spec, instance_id, idle_timeout)
            spawned = WorkerSpawned(
                **ids,
                claim_id=claim_id,
                instance_id=instance_id,
                backend="server",
                host=self.host,
                pid=proc.pid,
                pid_started_at=start_time(proc.pid),
                url=url,
                fingerprint=spec.fingerprint,
                model=spec.model,
                model_policy=spec.model_policy,
                identity=spec.identity,
                idle_timeout=idle_timeout,
            )
            ready = WorkerReady(**ids, instance_id=instance_id)
            if not self.writes.fenced(claim_id, [spawned, ready]):
                self.launcher.kill(proc)
                return None
            WorkerClient(url, instance_id, self.transport).adopt()
        except Exception as exc:
            if proc is not None:
                self.launcher.kill(proc)
            error = exc if isinstance(exc, SpawnError) else SpawnError(_spawn_error(spec, exc))
            failed = WorkerSpawnFailed(**ids, claim_id=claim_id, error=str(error))
            self.writes.fenced(claim_id, [failed])  # ends our claim, unless taken over
            raise error from exc
        self.launcher.keep(instance_id, proc)
        self.started_here.add(instance_id)
        self.prove(instance_id)
        entry = self.registry.refresh().entries[instance_id]
        why = "force_new requested" if force_new else "no running process matched"
        return Acquired(
            entry, False, f"spawned {instance_id}: {why} (fingerprint {spec.fingerprint})"
        )

    def _make_room(self, ids: dict[str, Any], max_processes: int) -> None:
        """Below `max_processes` live processes on this host, or evict the least recently
        used process that is not in use (`evicted`); when every one is, wait for one to be
        free, at most `ROOM_WAIT` seconds, then fail saying so."""
        deadline = time.monotonic() + ROOM_WAIT
        while True:
            self.settle_host(ids["session_id"])  # a process found gone frees its room
            live = live_on_host(self.registry.refresh(), self.host)
            if len(live) < max_processes:
                return
            if any(self._evict(e, ids, max_processes) for e in live if e.status == "ready"):
                continue
            if time.monotonic() > deadline:
                raise SpawnError(
                    f'no room for worker "{ids.get("worker_id")}": max_processes='
                    f"{max_processes} and every worker process on this host is in use (a "
                    f"request in flight, or acquired or used in the last {ACQUIRED_GRACE:g} s) "
                    f"for {ROOM_WAIT:g} s. Try again, or raise [pool] max_processes."
                )
            time.sleep(ROOM_POLL)

    def _evict(self, entry: RegistryEntry, ids: dict[str, Any], max_processes: int) -> bool:
        """Stop a process to make room, unless it is in use. The worker decides that under
        the lock its prompts take: one with a request in flight, or acquired or used in the
        last `ACQUIRED_GRACE` seconds (acquirers mark it before deciding, see
        `mark_acquired`), refuses; once it accepts, a prompt that still reaches it is
        answered `503 draining` and its task acquires again."""
        client = WorkerClient(str(entry.url), entry.instance_id, self.transport)
        try:
            client.drain("evicted", unless_used_within=ACQUIRED_GRACE)
        except (WorkerUnreachable, WorkerReplyError):
            return False  # in use, or not answering (found gone, it is recorded next round)
        self.distrust(entry.instance_id)
        self.launcher.wait_gone(entry.instance_id, entry.pid, entry.pid_started_at)
        self.launcher.reap(entry.instance_id)
        detail = f"max_processes {max_processes} reached; least recently used, not in use"
        ended_ids = {**ids, "worker_id": entry.worker_id}
        self._record_end(
            WorkerStopped(
                **ended_ids, instance_id=entry.instance_id, reason="evicted", detail=detail
            )
        )
        self.prune(entry.instance_id)
        return True


def _spawn_error(spec: WorkerSpec, exc: BaseException) -> str:
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f'cannot spawn worker "{spec.worker_id}": {what}'


def _reuse_reason(entry: RegistryEntry) -> str:
    return (
        f"reused {entry.instance_id} (pid {entry.pid}): fingerprint {entry.fingerprint} "
        "matches, pid start time matches, identity proven by /health"
    )
