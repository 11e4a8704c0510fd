"""The worker pool: get or spawn server worker processes through the device registry.

Every decision is appended to the `registry` stream at the version it was made on. Two
requesters (threads, processes or hosts) that decide at once cannot both win: the second
append conflicts, and it decides again on the newer state, where it finds the first one's
claim and waits for the process that claim produces (ADR-0003).

The decision itself is `orchestrator.reuse.plan`, pure. This module does the I/O around it:
probing pids and `/health` before the registry lock is taken (never while it is held),
starting processes (through `orchestrator.launcher`, which owns them as OS processes),
registering them only while their claim still stands (a claim taken over is fenced: its
late process is stopped), and stopping, draining and evicting.

Over 400 lines on purpose: the registry protocol (claim, fence, register, record an end
once) is read in one module; the OS processes themselves are the launcher's.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from events.catalogue import (
    REGISTRY_STREAM,
    Event,
    StopReason,
    WorkerDraining,
    WorkerExited,
    WorkerReady,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerSpawnRequested,
    WorkerStopped,
)
from events.projections import Claim, RegistryEntry, RegistryState, apply_registry
from events.store import EventLog, StreamConflict, state_dir
from events.streams import StreamView
from orchestrator.backends.client import WorkerClient, WorkerReplyError, WorkerUnreachable

# The spec lives with the backends; importing it from here still works.
from orchestrator.backends.spec import WorkerSpec
from orchestrator.launcher import READY_TIMEOUT, Launcher, SpawnError
from orchestrator.processes import (
    ProcessState,
    host_id,
    own_identity,
    process_state,
    start_time,
    terminate,
)
from orchestrator.reuse import (
    CLAIM_TIMEOUT,
    Plan,
    Probe,
    Request,
    ended,
    live_on_host,
    plan,
    to_probe,
)
from orchestrator.transport import Transport

WAIT_POLL = 0.05
# A process whose identity /health (or a /prompt reply) proved this recently is trusted
# without another /health round trip; its pid and start time are still checked every time.
PROOF_LEASE = 30.0
# Eviction never stops a process with a request in flight or acquired (or used) this
# recently; a spawn that needs room waits for one, at most ROOM_WAIT seconds, then fails.
ACQUIRED_GRACE = 5.0
ROOM_WAIT = 30.0
ROOM_POLL = 0.2
# A process that left its exit marker is on its way out: this long to let it go by itself.
LEAVING_GRACE = 5.0
# What a worker writes in its exit marker, as the reason its stop is recorded with.
EXIT_REASONS: dict[str, StopReason] = {"idle": "idle", "respawn": "respawn", "evicted": "evicted"}


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


class WorkerPool:
    """Server workers of one orchestrator, backed by the shared registry stream."""

    def __init__(
        self, log: EventLog, log_dir: Path | None = None, transport: Transport | None = None
    ) -> None:
        self.log = log
        # How the pool's calls reach worker processes (None: HTTP on 127.0.0.1).
        self.transport = transport
        self.host = host_id()
        self.registry: StreamView[RegistryState] = StreamView(
            log, REGISTRY_STREAM, RegistryState, apply_registry
        )
        self.log_dir = log_dir or state_dir() / "workers"
        self.launcher = Launcher(self.log_dir)
        self._proven: dict[str, float] = {}
        self._watchers: list[threading.Thread] = []
        self.started_here: set[str] = set()

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
            claimants = self._claimants(claims)
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
        with self.registry.lock:
            state = self.registry.refresh()
            version = self.registry.version
            decided = plan(state, request, probes, claimants, datetime.now(UTC), ids, spawn)
            if decided.unprobed:
                return None
            if decided.spawn:
                pid, started = own_identity()
                decided.claim_id = uuid.uuid4().hex
                decided.events.append(
                    WorkerSpawnRequested(
                        **ids,
                        claim_id=decided.claim_id,
                        fingerprint=request.fingerprint,
                        model=request.model,
                        model_policy=request.model_policy,
                        host=self.host,
                        claimant_pid=pid,
                        claimant_started_at=started,
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
            if decided.events and not decided.deferred:
                try:
                    self.log.append(REGISTRY_STREAM, decided.events, version)
                except StreamConflict:
                    return None
            return decided

    def _probe(self, entries: Iterable[RegistryEntry], known: dict[str, Probe]) -> dict[str, Probe]:
        """Ask the outside world about entries (no lock held): pid, start time, /health."""
        found: dict[str, Probe] = {}
        for entry in entries:
            if entry.instance_id in known:
                continue
            found[entry.instance_id] = self.probe(entry, health=entry.status == "ready")
        return found

    def probe(self, entry: RegistryEntry, health: bool = True) -> Probe:
        """Is the entry's process alive, and does it answer as itself? An unusable process
        that is still ours (same pid and start time) is stopped here, not left orphaned."""
        proc = process_state(entry.pid, entry.pid_started_at)
        leaving = self.exit_marker(entry.instance_id)
        if proc == "alive" and leaving is not None:
            # It has stopped serving and exits by itself: give it the moment it needs.
            proc, killed = self._let_go(entry)
            healthy = False if proc == "alive" else None  # lingering and unkillable: unusable
            return Probe(proc, healthy, "did not exit", stopped_reason=leaving, killed=killed)
        if proc != "alive":
            self.launcher.reap(entry.instance_id)
            return Probe(proc, stopped_reason=leaving)
        proven = self._proven.get(entry.instance_id)
        if not health or (proven is not None and time.monotonic() - proven < PROOF_LEASE):
            return Probe("alive")
        client = WorkerClient(str(entry.url), entry.instance_id, self.transport)
        try:
            answer = client.health()
        except WorkerUnreachable as exc:
            # Our pid and start time, yet it does not answer: ours and broken, so stopped.
            killed = terminate(entry.pid, entry.pid_started_at)
            self.launcher.reap(entry.instance_id)
            detail = f"/health did not answer: {exc}"
            return Probe("alive", healthy=False, detail=detail, killed=killed)
        except WorkerReplyError as exc:
            # It answers, but refuses this instance's token or breaks the protocol: not the
            # recorded process, so not ours to stop.
            return Probe("alive", healthy=False, detail=f"/health refused: {exc}")
        if answer.instance_id != entry.instance_id or answer.fingerprint != entry.fingerprint:
            # Someone else answers there: not ours to stop, and not the recorded process.
            return Probe(
                "alive",
                healthy=False,
                detail=f"/health answered instance {answer.instance_id} fingerprint "
                f"{answer.fingerprint}, recorded {entry.instance_id} {entry.fingerprint}",
            )
        self.prove(entry.instance_id)
        return Probe("alive", healthy=True)

    def prove(self, instance_id: str) -> None:
        """The process answered as itself just now (a /health or a /prompt reply)."""
        self._proven[instance_id] = time.monotonic()

    def distrust(self, instance_id: str) -> None:
        """Forget a proof: the next request asks /health again."""
        self._proven.pop(instance_id, None)

    def _claimants(self, claims: Iterable[Claim]) -> dict[str, ProcessState]:
        return {
            c.claim_id: process_state(c.claimant_pid, c.claimant_started_at)
            for c in claims
            if c.host == self.host
        }

    def exit_marker(self, instance_id: str) -> StopReason | None:
        """Why a process left by itself (idle, respawn, evicted), as its exit marker says;
        None when it left none (still serving, crashed, or left for another reason)."""
        try:
            text = (self.log_dir / f"{instance_id}.exit").read_text().strip()
        except OSError:
            return None
        return EXIT_REASONS.get(text)

    def mark_acquired(self, instance_id: str) -> None:
        """Tell every orchestrator process of this host, and the worker itself, that the
        process is being acquired: its idle clock restarts and eviction passes it over for
        `ACQUIRED_GRACE` seconds. A file's time, not an HTTP call or a log append."""
        with contextlib.suppress(OSError):
            (self.log_dir / f"{instance_id}.acquired").touch()

    def _let_go(self, entry: RegistryEntry) -> tuple[ProcessState, bool]:
        """Wait for a process that is leaving by itself; kill it if it lingers. Returns its
        state afterwards and whether it had to be killed."""
        deadline = time.monotonic() + LEAVING_GRACE
        while time.monotonic() < deadline:
            self.launcher.reap(entry.instance_id)
            proc = process_state(entry.pid, entry.pid_started_at)
            if proc != "alive":
                return proc, False
            time.sleep(WAIT_POLL)
        killed = terminate(entry.pid, entry.pid_started_at)
        self.launcher.reap(entry.instance_id)
        return process_state(entry.pid, entry.pid_started_at), killed

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
            if not self._register(claim_id, [spawned, WorkerReady(**ids, instance_id=instance_id)]):
                self.launcher.kill(proc)
                return None
            WorkerClient(url, instance_id, self.transport).adopt()
        except Exception as exc:
            if proc is not None:
                self.launcher.kill(proc)
            error = exc if isinstance(exc, SpawnError) else SpawnError(_spawn_error(spec, exc))
            self._end_claim(claim_id, ids, str(error))
            raise error from exc
        self.launcher.keep(instance_id, proc)
        self.started_here.add(instance_id)
        self.prove(instance_id)
        entry = self.registry.refresh().entries[instance_id]
        why = "force_new requested" if force_new else "no running process matched"
        return Acquired(
            entry, False, f"spawned {instance_id}: {why} (fingerprint {spec.fingerprint})"
        )

    def _register(self, claim_id: str, events: list[Event]) -> bool:
        """Append the spawn only while our claim is still open (the fence)."""
        while True:
            with self.registry.lock:
                state = self.registry.refresh()
                if claim_id not in state.claims:
                    return False
                try:
                    self.log.append(REGISTRY_STREAM, events, self.registry.version)
                except StreamConflict:
                    continue
                return True

    def _end_claim(self, claim_id: str, ids: dict[str, Any], error: str) -> None:
        with self.registry.lock:
            if claim_id in self.registry.refresh().claims:
                self._record(WorkerSpawnFailed(**ids, claim_id=claim_id, error=error))

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
        self.launcher.wait_gone(entry)
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

    # --- stopping --------------------------------------------------------------------------

    def _record(self, *events: Event) -> None:
        self.registry.append(list(events))

    def mark_exited(self, entry: RegistryEntry, ids: dict[str, Any], detail: str) -> None:
        """Record that a process was found dead (or, with an exit marker, why it left)."""
        self.launcher.reap(entry.instance_id)
        self.distrust(entry.instance_id)
        probe = Probe("gone", stopped_reason=self.exit_marker(entry.instance_id))
        self._record_end(ended(entry, probe, ids, detail))

    def _record_end(self, event: WorkerStopped | WorkerExited) -> bool:
        """Record how a process ended, once: not when the registry already has it stopped
        (or exited, for `WorkerExited`), whoever recorded that first."""
        while True:
            with self.registry.lock:
                entry = self.registry.refresh().entries.get(event.instance_id)
                if entry is None or (isinstance(event, WorkerExited) and not entry.live):
                    return False
                try:
                    self.log.append(REGISTRY_STREAM, [event], self.registry.version)
                except StreamConflict:
                    continue
                return True

    def found_gone(
        self, session_id: str, worker_id: str | None = None
    ) -> list[WorkerStopped | WorkerExited]:
        """Check each process of this host (of one worker id, or all) the registry shows
        running, by pid and start time (no HTTP): the events that would record those found
        gone, recorded by nobody yet (a read-only reader shows them without recording)."""
        found: list[WorkerStopped | WorkerExited] = []
        for entry in live_on_host(self.registry.refresh(), self.host):
            if worker_id not in (None, entry.worker_id):
                continue
            proc = process_state(entry.pid, entry.pid_started_at)
            if proc == "alive":
                continue
            self.launcher.reap(entry.instance_id)
            detail = (
                f"pid {entry.pid} now belongs to another process"
                if proc == "recycled"
                else f"pid {entry.pid} no longer exists"
            )
            ids = {"session_id": session_id, "worker_id": entry.worker_id}
            probe = Probe(proc, stopped_reason=self.exit_marker(entry.instance_id))
            found.append(ended(entry, probe, ids, detail))
        return found

    def settle_host(
        self, session_id: str, worker_id: str | None = None
    ) -> list[WorkerStopped | WorkerExited]:
        """The registry tells the truth when read: record what `found_gone` finds (each
        once), so no process that is gone is shown running. Returns what it recorded."""
        found = self.found_gone(session_id, worker_id)
        recorded = [e for e in found if self._record_end(e)]
        for event in recorded:
            self.distrust(event.instance_id)
            if isinstance(event, WorkerStopped):  # it left on purpose: nothing to debug
                self.prune(event.instance_id)
        return recorded

    def live_entries(self, worker_id: str | None = None) -> list[RegistryEntry]:
        """Processes on this host recorded as running (optionally of one worker id)."""
        state = self.registry.refresh()
        return [
            e
            for e in state.entries.values()
            if e.live and e.host == self.host and worker_id in (None, e.worker_id)
        ]

    def stoppable(self, worker_id: str | None = None) -> list[RegistryEntry]:
        """Every entry of this host that is recorded running or whose process still runs,
        whatever its recorded status (a process wrongly recorded exited is still stopped)."""
        state = self.registry.refresh()
        return [
            e
            for e in state.entries.values()
            if e.host == self.host
            and worker_id in (None, e.worker_id)
            and e.backend == "server"
            and (e.live or process_state(e.pid, e.pid_started_at) == "alive")
        ]

    def stop(
        self,
        entry: RegistryEntry,
        ids: dict[str, Any],
        reason: StopReason = "requested",
        detail: str = "",
    ) -> bool:
        """Ask a process to shut down, make sure it is gone, and record it. Returns False
        (and records `WorkerExited`) when it had already died."""
        self.distrust(entry.instance_id)
        if process_state(entry.pid, entry.pid_started_at) != "alive":
            if entry.live:
                self.mark_exited(entry, ids, "found dead when asked to stop")
            return False
        # It is killed below if it does not go by itself.
        with contextlib.suppress(WorkerUnreachable, WorkerReplyError):
            WorkerClient(str(entry.url), entry.instance_id, self.transport).shutdown()
        self.launcher.wait_gone(entry)
        self.launcher.reap(entry.instance_id)
        self._record_end(
            WorkerStopped(**ids, instance_id=entry.instance_id, reason=reason, detail=detail)
        )
        self.prune(entry.instance_id)
        return True

    def prune(self, instance_id: str) -> None:
        """Remove a stopped process's log and markers (a crashed one keeps its log)."""
        for suffix in (".log", ".exit", ".acquired"):
            (self.log_dir / f"{instance_id}{suffix}").unlink(missing_ok=True)

    def retire(self, entry: RegistryEntry, ids: dict[str, Any], detail: str) -> None:
        """Drain a process: no new tasks, the running ones finish, then it stops (`respawn`).
        A watcher records the stop; if this orchestrator goes first, whoever finds the
        process gone does."""
        self.distrust(entry.instance_id)
        self._record(
            WorkerDraining(**ids, instance_id=entry.instance_id, reason="respawn", detail=detail)
        )
        try:
            WorkerClient(str(entry.url), entry.instance_id, self.transport).drain("respawn")
        except (WorkerUnreachable, WorkerReplyError):
            self.stop(entry, ids, reason="respawn", detail=detail)
            return

        def watch() -> None:
            while process_state(entry.pid, entry.pid_started_at) == "alive":
                self.launcher.reap(entry.instance_id)
                time.sleep(WAIT_POLL * 4)
            self.launcher.reap(entry.instance_id)
            self._record_end(
                WorkerStopped(**ids, instance_id=entry.instance_id, reason="respawn", detail=detail)
            )

        watcher = threading.Thread(target=watch, daemon=True, name=f"drain-{entry.instance_id}")
        watcher.start()
        self._watchers.append(watcher)

    def join_watchers(self, timeout: float) -> None:
        """Give drain watchers up to `timeout` seconds to record their stops."""
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            watcher.join(max(0.0, deadline - time.monotonic()))

    def abandon(self) -> None:
        """Stop every process this pool started, recording nothing: the store it would be
        recorded in is gone (a registry nobody can read must not leave processes behind)."""
        self.launcher.abandon()

    def reap_children(self) -> None:
        """Collect exit statuses of our children that ended (no zombies left behind)."""
        self.launcher.reap_children()


def _spawn_error(spec: WorkerSpec, exc: BaseException) -> str:
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f'cannot spawn worker "{spec.worker_id}": {what}'


def _reuse_reason(entry: RegistryEntry) -> str:
    return (
        f"reused {entry.instance_id} (pid {entry.pid}): fingerprint {entry.fingerprint} "
        "matches, pid start time matches, identity proven by /health"
    )
