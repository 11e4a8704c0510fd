"""The root of the one exception tree: every error the project raises on purpose derives
from `OrchestratorError`; any other exception is a bug.

It imports nothing, so the lightest module (a worker process, the event store) can derive
from it; `from orchestrator import OrchestratorError` is the public spelling.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """An error the orchestrator raises on purpose; its message is one line for a user."""
