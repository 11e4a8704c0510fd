"""The act side's processes for one orchestrator: the worker pool (server workers, over the
shared device registry), the in-process agents, and the managed model servers.

The task runner runs tasks on them and the session reads from them (is a worker running?
the registry's view); nothing else holds them. The views read them through
`orchestrator.views.ViewContext`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from events.catalogue import Event
from events.projections import RegistryState
from events.store import EventLog
from events.streams import StreamView
from orchestrator.backends import Backend, Lease, StopResult, WorkerProcess
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

    def cancel_anywhere(self, worker_id: str, task_id: str) -> None:
        """Interrupt a task another orchestrator serves, wherever a backend can reach it."""
        for backend in self.by_kind.values():
            backend.cancel_anywhere(worker_id, task_id)

    def stop(self, worker_id: str, ids: dict[str, Any]) -> StopResult:
        """Stop the worker's processes on this host, then its in-process agent."""
        results = [self.server.stop(worker_id, ids), self.agent.stop(worker_id, ids)]
        return StopResult(
            [i for r in results for i in r.stopped], [i for r in results for i in r.exited]
        )

    def warm(self, model: str, ids: dict[str, Any]) -> None:
        """Start (or find) a managed model's server now, so no task waits for it."""
        self.servers.warm(model, ids)

    def processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes on every backend: its in-process agent, then the
        processes on this host recorded as running."""
        return [p for backend in self.by_kind.values() for p in backend.processes(worker_id)]

    def release(
        self,
        held: tuple[Backend, Lease] | None,
        record: Callable[..., object] | None,
        *events: Event,
        task_id: str | None = None,
    ) -> None:
        """A task is done with its lease (`held`: the backend and lease, if it got one):
        record `events` (the task's end, if any) with the registry facts the lease still
        owes and, given the `task_id`, those of the model server it used, in one write
        through `record`. `record` None: there is nowhere to record them (the store moved),
        and they are dropped."""
        facts = held[0].release(held[1]) if held is not None else ()
        if task_id is not None:
            facts = (*facts, *self.servers.take_deferred(task_id))
        if record is not None and (events or facts):
            record(*events, *facts)

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
