"""The agent backend: a worker that runs inside this orchestrator and dies with it."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from events.catalogue import Event
from orchestrator.backends import (
    Lease,
    PromptRequest,
    StopResult,
    WorkerProcess,
    interruptible,
)
from orchestrator.backends.spec import WorkerSpec
from orchestrator.config import BackendKind, OrchestratorConfig
from orchestrator.providers import Completion, complete, credentials_for, with_base_url
from orchestrator.transport import Transport


class AgentBackend:
    """In-process workers, one per worker id, replaced when the fingerprint changes."""

    kind: BackendKind = "agent"

    def __init__(
        self,
        config: OrchestratorConfig,
        environ: Callable[[], Mapping[str, str]],
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self._transport = transport
        self._environ = environ
        self._lock = threading.Lock()
        self.agents: dict[str, Lease] = {}

    def acquire(
        self, spec: WorkerSpec, ids: dict[str, Any], force_new: bool, spawn: bool = True
    ) -> Lease:
        """The in-process worker for a spec: reused while its fingerprint matches."""
        with self._lock:
            agent = self.agents.get(spec.worker_id)
            if agent is not None and agent.fingerprint == spec.fingerprint and not force_new:
                return agent
            new = Lease(
                worker_id=spec.worker_id,
                instance_id=f"agent-{spec.worker_id}-{uuid.uuid4().hex[:8]}",
                pid=os.getpid(),
                url=None,
                fingerprint=spec.fingerprint,
                model=spec.model,
                model_policy=spec.model_policy,
                reused=False,
                reason="in-process agent worker",
            )
            # The next acquire of the same fingerprint reuses it.
            self.agents[spec.worker_id] = Lease(**{**new.__dict__, "reused": True})
            return new

    def prompt(self, lease: Lease, request: PromptRequest, cancel: threading.Event) -> Completion:
        """Call the provider from this process, with credentials read now."""
        credentials = credentials_for(self.config.providers, request.model, self._environ())
        return interruptible(
            lambda: complete(
                with_base_url(self.config.providers, request.model, request.base_url),
                request.model,
                request.text,
                request.system_prompt,
                credentials=credentials,
                tools=request.tools,
                max_reply=self.config.limits.max_reply,
                messages=request.messages,
                transport=self._transport,
            ),
            cancel,
        )

    def release(self, lease: Lease) -> tuple[Event, ...]:
        """Nothing to record: an in-process agent is not in the registry."""
        return ()

    def cancel(self, lease: Lease, task_id: str) -> None:
        """Nothing to tell anyone: `prompt` stops waiting as soon as the cancel event is set."""

    def cancel_anywhere(self, worker_id: str, task_id: str) -> None:
        """Nothing to reach: another orchestrator's agents run inside it."""

    def respawn(
        self, spec: WorkerSpec, ids: dict[str, Any], ready: Callable[[Lease], None]
    ) -> bool:
        """Replace the in-process worker unless it has the spec's fingerprint already
        (then False); `ready` gets the one serving the worker either way."""
        current = self.agents.get(spec.worker_id)
        if current is not None and current.fingerprint == spec.fingerprint:
            ready(current)
            return False
        ready(self.acquire(spec, ids, force_new=True))
        return True

    def stop(self, worker_id: str, ids: dict[str, Any]) -> StopResult:
        """Drop the in-process worker."""
        with self._lock:
            agent = self.agents.pop(worker_id, None)
        return StopResult([agent.instance_id] if agent else [], [])

    def running(self, worker_id: str) -> bool:
        """Is there an in-process worker for this id?"""
        return worker_id in self.agents

    def processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's in-process agent, if there is one."""
        agent = self.agents.get(worker_id)
        if agent is None:
            return []
        return [WorkerProcess("agent", agent.instance_id, agent.fingerprint, "running")]
