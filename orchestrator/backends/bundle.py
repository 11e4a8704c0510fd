"""The act side's processes for one orchestrator: the worker pool (server workers, over the
shared device registry), the in-process agents, and the managed model servers.

The task runner runs tasks on them and the session reads from them (is a worker running?
the registry's view); nothing else holds them. The views read them through
`orchestrator.views.ViewContext`.
"""

from __future__ import annotations

import os

from events.projections import RegistryEntry, RegistryState
from events.store import EventLog
from events.streams import StreamView
from orchestrator.backends import Backend
from orchestrator.backends.agent import AgentBackend
from orchestrator.backends.server import ServerBackend
from orchestrator.config import OrchestratorConfig
from orchestrator.model_servers import ModelServers
from orchestrator.pool import WorkerPool
from orchestrator.resolver import check_worker
from orchestrator.transport import Transport


class Backends:
    """Where this orchestrator's worker tasks run, by the backend their profile names."""

    def __init__(
        self, config: OrchestratorConfig, log: EventLog, transport: Transport | None = None
    ) -> None:
        self.config = config
        # `transport` carries the agents' provider requests and the calls to worker
        # processes (None: real sockets); model servers are always reached over sockets.
        self.pool = WorkerPool(log, log.private_dir("workers"), transport)
        self.agent = AgentBackend(config, lambda: os.environ, transport)
        self.server = ServerBackend(self.pool, config, lambda: os.environ)
        # Managed model servers share the registry stream (and its view) with the workers.
        self.servers = ModelServers(
            log, self.pool.registry, config, lambda: log.private_dir("model_servers")
        )
        self.by_kind: dict[str, Backend] = {"agent": self.agent, "server": self.server}

    @property
    def registry(self) -> StreamView[RegistryState]:
        """The device registry's live view, shared by the pool and the model servers."""
        return self.pool.registry

    def of(self, worker_id: str) -> Backend:
        """Where the worker's tasks run (its profile's backend)."""
        return self.by_kind[check_worker(worker_id, self.config).backend]

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running (on its backend)?"""
        return self.of(worker_id).running(worker_id)

    def live_entries(self, worker_id: str) -> list[RegistryEntry]:
        """The worker's processes on this host recorded as running."""
        return self.pool.live_entries(worker_id)

    def agent_instance(self, worker_id: str) -> tuple[str, str] | None:
        """The worker's in-process agent, if any: (fingerprint, instance id)."""
        agent = self.agent.agents.get(worker_id)
        return None if agent is None else (agent.fingerprint, agent.instance_id)

    def abandon(self) -> None:
        """The store went away: stop the processes started here (their registry is gone)."""
        self.pool.abandon()
        self.servers.abandon()

    def close(self, session_id: str, stop_started: bool, grace: float) -> None:
        """Let drain watchers record their stops (`grace` seconds), stop the processes and
        model servers started here when `stop_started`, and reap every child."""
        self.pool.join_watchers(grace)
        if stop_started:
            for entry in self.pool.live_entries():
                if entry.instance_id in self.pool.started_here:
                    self.pool.stop(
                        entry,
                        {"session_id": session_id, "worker_id": entry.worker_id},
                        reason="orchestrator closed",
                    )
            for server in self.servers.stoppable():
                if server.instance_id in self.servers.started_here:
                    self.servers.stop(
                        server, {"session_id": session_id}, reason="orchestrator closed"
                    )
        self.servers.reap_children()
        self.agent.agents.clear()
        self.pool.reap_children()
