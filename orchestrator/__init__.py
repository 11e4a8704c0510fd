"""Event-sourced LLM worker orchestrator.

`from orchestrator import Orchestrator, InvalidTaskArgs`. The names load lazily so that a
worker process (`python -m orchestrator.worker`) starts without the store and CLI layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.api import InvalidTaskArgs, TaskHandle, TaskStartArgs
    from orchestrator.config import OrchestratorConfig
    from orchestrator.orchestrator import Orchestrator

__all__ = ["InvalidTaskArgs", "Orchestrator", "OrchestratorConfig", "TaskHandle", "TaskStartArgs"]

_HOMES = {
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
