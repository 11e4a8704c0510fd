"""Backends: where a worker task runs. One small interface, two implementations.

- `AgentBackend` (`backends.agent`): in-process, never shared across processes.
- `ServerBackend` (`backends.server`): a real OS process per fingerprint, found or spawned
  through the device registry, spoken to with `WorkerClient` (`backends.client`).

The orchestrator only ever calls `acquire`, `prompt`, `release`, `cancel`,
`cancel_anywhere`, `respawn`, `stop`, `running` and `processes` (through
`backends.bundle.Backends`); a backend alone knows what registry facts its leases owe (the
runner hands them its task's end to record them with, in one write), and only a backend's
processes side (`orchestrator.pool`, `orchestrator.model_servers`) appends registry facts.
`task_cancel` sets the task's cancel event and calls `cancel`: the agent backend stops waiting
for its provider call (run on a thread of its own), the server backend tells the worker, which
drops the request and answers at once; either way a late reply is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from events.catalogue import Event
from events.projections import RegistryEntry
from orchestrator.cancellable import Cancelled, interruptible
from orchestrator.config import BackendKind
from orchestrator.errors import OrchestratorError
from orchestrator.providers import Completion

__all__ = [
    "Backend",
    "Cancelled",
    "Lease",
    "PromptRequest",
    "StopResult",
    "TaskError",
    "WorkerProcess",
    "interruptible",
]

if TYPE_CHECKING:
    from orchestrator.backends.spec import WorkerSpec


class TaskError(OrchestratorError, RuntimeError):
    """The task cannot be served; the message says what happened and what to do."""


@dataclass(frozen=True)
class Lease:
    """The process (or in-process agent) that serves one task, and how it was obtained."""

    worker_id: str
    instance_id: str
    pid: int
    url: str | None
    fingerprint: str
    model: str
    model_policy: str
    reused: bool
    reason: str
    deferred: tuple[Event, ...] = ()  # registry facts to record with the task's end


@dataclass(frozen=True)
class PromptRequest:
    """One message for a worker: the model that serves it travels with it."""

    task_id: str
    text: str
    model: str
    system_prompt: str = ""
    attachments: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    # A managed model's server (ADR-0012): where its provider's requests go this time.
    base_url: str | None = None
    # A continued conversation: every message after the system prompt, the new one last
    # (None: `text` alone is the user message).
    messages: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class WorkerProcess:
    """One running process (or in-process agent) of a worker, as the views show it."""

    backend: BackendKind
    instance_id: str
    fingerprint: str
    status: str
    pid: int | None = None
    url: str | None = None


def as_process(entry: RegistryEntry) -> WorkerProcess:
    """A worker process's registry entry, as the views show it."""
    return WorkerProcess(
        entry.backend, entry.instance_id, entry.fingerprint, entry.status, entry.pid, entry.url
    )


@dataclass(frozen=True)
class StopResult:
    """What `stop` did: instances stopped, and those found already dead."""

    stopped: list[str]
    exited: list[str]


class Backend(Protocol):
    """Where a worker's tasks run."""

    kind: BackendKind

    def acquire(
        self, spec: WorkerSpec, ids: dict[str, Any], force_new: bool, spawn: bool
    ) -> Lease | None:
        """A process for `spec`: reused or spawned (None if `spawn` is False and none runs)."""
        ...

    def prompt(self, lease: Lease, request: PromptRequest, cancel: threading.Event) -> Completion:
        """Serve one message; raises `ProviderError`, `TaskError` or `Cancelled`."""
        ...

    def release(self, lease: Lease) -> tuple[Event, ...]:
        """The task is done with `lease`: the registry facts it still owes the log (a
        plain reuse's `WorkerReused`), to be recorded with the task's end."""
        ...

    def cancel(self, lease: Lease, task_id: str) -> None:
        """Interrupt the request of `task_id` in flight on `lease` (from another thread)."""
        ...

    def cancel_anywhere(self, worker_id: str, task_id: str) -> None:
        """Interrupt `task_id` where another orchestrator serves it, if this backend can
        reach it (a process without that task ignores it)."""
        ...

    def respawn(
        self, spec: WorkerSpec, ids: dict[str, Any], ready: Callable[[Lease], None]
    ) -> bool:
        """Have the process `spec` asks for serve the worker now (reused or started), hand
        its lease to `ready` (which records what it owes), then retire what it replaces that
        only this session used (ADR-0003, "Respawn"). False when nothing had to change."""
        ...

    def stop(self, worker_id: str, ids: dict[str, Any]) -> StopResult:
        """Stop every process of the worker this backend can reach; those found gone
        already are recorded so and listed as exited."""
        ...

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker recorded as running?"""
        ...

    def processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes this backend runs (on this host), as the views show them."""
        ...
