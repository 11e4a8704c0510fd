"""What a backend is asked for: the worker process (or in-process agent) one task needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from events.catalogue import ModelPolicy
from orchestrator.config import OrchestratorConfig
from orchestrator.reuse import Request


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start (or recognise) one worker process."""

    worker_id: str
    model: str
    model_policy: ModelPolicy
    fingerprint: str
    identity: dict[str, Any]
    system_prompt: str
    config: OrchestratorConfig

    def request(self, host: str, force_new: bool = False) -> Request:
        """The pool request this spec makes."""
        return Request(
            self.worker_id,
            self.fingerprint,
            self.model,
            self.model_policy,
            host,
            force_new,
            self.identity,
        )
