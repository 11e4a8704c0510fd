"""Event-sourced LLM worker orchestrator.

`from orchestrator import Orchestrator, InvalidTaskArgs`. The names load lazily so that a
worker process (`python -m orchestrator.worker`) starts without the store and CLI layers.
"""

from __future__ import annotations

# Not `typing.TYPE_CHECKING`: a worker process imports this package and nothing else of it
# needs `typing` (4 ms of its start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from events.store import StoreError, StoreMoved
    from orchestrator.aio import AsyncOrchestrator
    from orchestrator.api import InvalidTaskArgs, TaskHandle, TaskStartArgs
    from orchestrator.backends import TaskError
    from orchestrator.config import ConfigError, OrchestratorConfig
    from orchestrator.errors import OrchestratorError
    from orchestrator.launcher import SpawnError
    from orchestrator.ops import OpError
    from orchestrator.orchestrator import Orchestrator
    from orchestrator.providers import ProviderError
    from orchestrator.resolver import ResolutionError

__all__ = [
    "AsyncOrchestrator",
    "ConfigError",
    "InvalidTaskArgs",
    "OpError",
    "Orchestrator",
    "OrchestratorConfig",
    "OrchestratorError",
    "ProviderError",
    "ResolutionError",
    "SpawnError",
    "StoreError",
    "StoreMoved",
    "TaskError",
    "TaskHandle",
    "TaskStartArgs",
]

_HOMES = {
    "AsyncOrchestrator": "orchestrator.aio",
    "ConfigError": "orchestrator.config",
    "OpError": "orchestrator.ops",
    "OrchestratorError": "orchestrator.errors",
    "ProviderError": "orchestrator.providers",
    "ResolutionError": "orchestrator.resolver",
    "SpawnError": "orchestrator.launcher",
    "StoreError": "events.store",
    "StoreMoved": "events.store",
    "TaskError": "orchestrator.backends",
    "InvalidTaskArgs": "orchestrator.api",
    "TaskHandle": "orchestrator.api",
    "TaskStartArgs": "orchestrator.api",
    "OrchestratorConfig": "orchestrator.config",
    "Orchestrator": "orchestrator.orchestrator",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
