"""The worker pool's processes as the registry records them (`PoolProcesses`): probing
each (pid, start time, exit marker, /health with a proof lease), finding those gone,
recording how each ended (once), stopping, draining and pruning them. Getting a process
(decide, claim, spawn, make room) is `orchestrator.pool`'s `WorkerPool`, built on this; the
OS processes themselves are its `WorkerLauncher`'s (`orchestrator.launcher`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from events.catalogue import (
    StopReason,
    WorkerDraining,
    WorkerExited,
    WorkerStopped,
)
from events.projections import RegistryEntry, RegistryState
from events.store import EventLog, state_dir
from events.streams import StreamView, registry_view
from orchestrator.backends.client import WorkerClient, WorkerReplyError, WorkerUnreachable
from orchestrator.backends.registry_writes import Proofs, RegistryWrites
from orchestrator.launcher import WorkerLauncher
from orchestrator.processes import ProcessState, host_id, process_state, terminate
from orchestrator.reuse import Probe, ended, live_on_host, recorded_live
from orchestrator.transport import Transport

WAIT_POLL = 0.05
# A process whose identity /health (or a /prompt reply) proved this recently is trusted
# without another /health round trip; its pid and start time are still checked every time.
PROOF_LEASE = 30.0
# A process that left its exit marker is on its way out: this long to let it go by itself.
LEAVING_GRACE = 5.0
# What a worker writes in its exit marker, as the reason its stop is recorded with.
EXIT_REASONS: dict[str, StopReason] = {"idle": "idle", "respawn": "respawn", "evicted": "evicted"}


class PoolProcesses:
    """Server worker processes of one orchestrator, as the shared registry stream records
    them."""

    def __init__(
        self, log: EventLog, log_dir: Path | None = None, transport: Transport | None = None
    ) -> None:
        self.log = log
        # How the pool's calls reach worker processes (None: HTTP on 127.0.0.1).
        self.transport = transport
        self.host = host_id()
        self.registry: StreamView[RegistryState] = registry_view(log)
        self.writes = RegistryWrites(self.registry, self.host, lambda state: state.claims)
        self.log_dir = log_dir or state_dir() / "workers"
        self.launcher = WorkerLauncher(self.log_dir)
        self.proofs = Proofs(PROOF_LEASE)
        self._watchers: list[threading.Thread] = []  # those still watching, and the newest
        self._watchers_lock = threading.Lock()
        self.started_here: set[str] = set()

    # --- probing ---------------------------------------------------------------------------

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
        if not health or self.proofs.fresh(entry.instance_id):
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
        self.proofs.prove(instance_id)

    def distrust(self, instance_id: str) -> None:
        """Forget a proof: the next request asks /health again."""
        self.proofs.distrust(instance_id)

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

    # --- ending ----------------------------------------------------------------------------

    def mark_exited(self, entry: RegistryEntry, ids: dict[str, Any], detail: str) -> None:
        """Record that a process was found dead (or, with an exit marker, why it left)."""
        self.launcher.reap(entry.instance_id)
        self.distrust(entry.instance_id)
        probe = Probe("gone", stopped_reason=self.exit_marker(entry.instance_id))
        self._record_end(ended(entry, probe, ids, detail))

    def _record_end(self, event: WorkerStopped | WorkerExited) -> bool:
        """Record how a process ended, once: not when the registry already has it stopped
        (or exited, for `WorkerExited`), whoever recorded that first."""

        def holds(state: RegistryState) -> bool:
            entry = state.entries.get(event.instance_id)
            return entry is not None and (entry.live or not isinstance(event, WorkerExited))

        return self.writes.append_if(holds, [event])

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
        return recorded_live(self.registry.refresh(), self.host, worker_id)

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
        self.launcher.wait_gone(entry.instance_id, entry.pid, entry.pid_started_at)
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
        self.registry.append(
            [WorkerDraining(**ids, instance_id=entry.instance_id, reason="respawn", detail=detail)]
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
        with self._watchers_lock:  # finished ones go: a long-running orchestrator retires many
            self._watchers = [w for w in self._watchers if w.is_alive()]
            self._watchers.append(watcher)

    def join_watchers(self, timeout: float) -> None:
        """Give drain watchers up to `timeout` seconds to record their stops."""
        deadline = time.monotonic() + timeout
        with self._watchers_lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.join(max(0.0, deadline - time.monotonic()))

    def abandon(self) -> None:
        """Stop every process this pool started, recording nothing: the store it would be
        recorded in is gone (a registry nobody can read must not leave processes behind)."""
        self.launcher.abandon()

    def reap_children(self) -> None:
        """Collect exit statuses of our children that ended (no zombies left behind)."""
        self.launcher.reap_children()
