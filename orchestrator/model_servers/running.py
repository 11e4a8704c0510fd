"""The managed model servers as the registry records them (`RunningServers`): probing each
(pid and start time, its supervisor's last word, busy, last used, the ready path with a
proof lease), recording how each ended (once), stopping one, the ones named, or all this
orchestrator started. Getting one (decide, claim, start, make room, lease) is
`servers.ModelServers`', built on this.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from events.catalogue import Event, ModelServerStopped, StopReason
from events.projections import ModelServerEntry, RegistryState
from events.store import EventLog
from events.streams import StreamView
from orchestrator.backends.registry_writes import Proofs, RegistryWrites
from orchestrator.config import OrchestratorConfig
from orchestrator.launcher import Launcher
from orchestrator.model_servers.decision import ServerProbe, gone_event
from orchestrator.model_servers.files import (
    exit_marker,
    is_busy,
    lock_exclusive,
    mtime,
    open_inflight,
    ready_probe,
    write_exit,
)
from orchestrator.model_servers.launch import SUPERVISOR_GRACE
from orchestrator.processes import host_id, process_state, terminate

# A server whose ready path answered this recently is trusted on its pid and start time.
PROOF_LEASE = 30.0
HEALTH_TIMEOUT = 5.0


class RunningServers:
    """The managed model servers of one orchestrator, backed by the shared registry."""

    def __init__(
        self,
        log: EventLog,
        registry: StreamView[RegistryState],
        config: OrchestratorConfig,
        run_dir: Callable[[], Path],
    ) -> None:
        self.log = log
        self.registry = registry
        self.config = config
        self.host = host_id()
        self._run_dir = run_dir
        self.writes = RegistryWrites(registry, self.host, lambda state: state.server_claims)
        # The supervisors started here; one killed outright would leave its server running.
        self.launcher = Launcher(grace=SUPERVISOR_GRACE, kill_lingering=False)
        self.proofs = Proofs(PROOF_LEASE)
        self.started_here: set[str] = set()

    # --- probing -----------------------------------------------------------------------------

    def probe(self, server: ModelServerEntry, health: bool = True) -> ServerProbe:
        """Is the server's process alive, busy, and (unless proven recently or busy) does
        its ready path answer? One that is ours and does not answer is stopped here."""
        directory = Path(server.log_path).parent
        proc = process_state(server.pid, server.pid_started_at)
        if proc != "alive":
            reason, status = self._last_word(server, directory)
            return ServerProbe(proc, exit_reason=reason, exit_status=status)
        busy = is_busy(directory)
        last_used = mtime(directory / "used")
        if busy or not health or self.proofs.fresh(server.instance_id):
            return ServerProbe("alive", busy=busy, last_used=last_used)
        ready_path = str(server.identity.get("ready_path", "/v1/models"))
        problem = ready_probe(server.port, ready_path, HEALTH_TIMEOUT)
        if problem is None:
            self.proofs.prove(server.instance_id)
            return ServerProbe("alive", busy=busy, last_used=last_used, healthy=True)
        detail = f"GET {ready_path} on port {server.port}: {problem}"
        killed = self._kill(server)
        return ServerProbe("alive", healthy=False, detail=detail, killed=killed)

    def _last_word(
        self, server: ModelServerEntry, directory: Path
    ) -> tuple[str | None, int | None]:
        """Why a server that is gone ended, as its supervisor wrote it: the supervisor
        reaps the server, then writes, so a supervisor still running gets a moment."""
        deadline = time.monotonic() + 1.0
        while True:
            reason, status = exit_marker(directory)
            sup = process_state(server.supervisor_pid, server.supervisor_started_at)
            if reason is not None or sup != "alive" or time.monotonic() > deadline:
                self.launcher.reap(server.instance_id)
                return reason, status
            time.sleep(0.02)

    # --- stopping and finding the dead ------------------------------------------------------

    def _record_live(self, server: ModelServerEntry, event: Event) -> None:
        """Record how a server ended, once: only while the registry still has it live."""
        iid = server.instance_id

        def live(state: RegistryState) -> bool:
            now = state.servers.get(iid)
            return now is not None and now.live

        self.writes.append_if(live, [event])

    def _record_gone(
        self, server: ModelServerEntry, probe: ServerProbe, ids: Mapping[str, Any]
    ) -> None:
        self._record_live(server, gone_event(server, probe, ids))

    def stop(
        self,
        server: ModelServerEntry,
        ids: Mapping[str, Any],
        reason: StopReason = "requested",
        detail: str = "",
        wait: bool = True,
    ) -> bool:
        """Stop a server and record it. With `wait=False` (an eviction) a server with a
        request in flight is left alone and False returned; otherwise its requests get up to
        a few seconds to finish before it is stopped anyway. True when it is gone (a server
        found dead is recorded exited)."""
        directory = Path(server.log_path).parent
        self.proofs.distrust(server.instance_id)
        fd = open_inflight(directory)
        try:
            if not lock_exclusive(fd, 0.0 if not wait else 5.0) and not wait:
                return False
            if process_state(server.pid, server.pid_started_at) != "alive":
                reason_left, status = self._last_word(server, directory)
                probe = ServerProbe("gone", exit_reason=reason_left, exit_status=status)
                self._record_gone(server, probe, ids)
                return True
            write_exit(directory, reason, detail)
            self._terminate(server)
        finally:
            os.close(fd)
        stopped = ModelServerStopped(
            **ids, instance_id=server.instance_id, reason=reason, detail=detail
        )
        self._record_live(server, stopped)
        return True

    def _terminate(self, server: ModelServerEntry) -> None:
        """The supervisor stops the server's group; then make sure both are gone."""
        self.launcher.stop(server.instance_id, server.supervisor_pid, server.supervisor_started_at)
        terminate(server.pid, server.pid_started_at)

    def _kill(self, server: ModelServerEntry) -> bool:
        directory = Path(server.log_path).parent
        write_exit(directory, "unhealthy", "its ready path did not answer")
        self._terminate(server)
        return process_state(server.pid, server.pid_started_at) != "alive"

    def stoppable(self) -> list[ModelServerEntry]:
        """Servers of this host recorded running or whose process still runs."""
        state = self.registry.refresh()
        return [
            s
            for s in state.servers.values()
            if s.host == self.host and (s.live or process_state(s.pid, s.pid_started_at) == "alive")
        ]

    def stop_matching(
        self, which: str | None, ids: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """Stop this host's servers named by instance id or `provider/model` (every one
        when `which` is None), whatever their recorded status: (stopped, already gone)."""
        stopped: list[str] = []
        gone: list[str] = []
        for server in self.stoppable():
            if which is None or which in (server.instance_id, server.model):
                alive = process_state(server.pid, server.pid_started_at) == "alive"
                self.stop(server, ids)
                (stopped if alive else gone).append(server.instance_id)
        return stopped, gone

    def sweep(self, ids: Mapping[str, Any]) -> None:
        """Record what became of this host's servers that look live: found dead, or
        stopped by their supervisor (idle). The registry tells the truth when read."""
        for server in self.stoppable():
            claim = self.registry.state.server_claims.get(server.claim_id or "")
            if claim is not None and self.writes.claimants([claim]).get(claim.claim_id) == "alive":
                continue  # starting, and its starter is on it
            probe = self.probe(server, health=False)
            if probe.process != "alive":
                self._record_gone(server, probe, ids)

    def reap_children(self) -> None:
        """Collect the exit statuses of supervisors that ended (no zombies)."""
        self.launcher.reap_children()

    def abandon(self) -> None:
        """Stop every server this orchestrator started, recording nothing (the store is
        gone: no one could ever find them)."""
        self.launcher.abandon()
