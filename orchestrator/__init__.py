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
