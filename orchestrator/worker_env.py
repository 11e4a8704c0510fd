"""What a spawner hands its worker process through the environment (never argv).

A module of its own so the spawner names these without importing the worker's HTTP server.
"""

from __future__ import annotations

SPEC_ENV = "ORCHESTRATOR_WORKER_SPEC"
TOKEN_ENV = "ORCHESTRATOR_WORKER_TOKEN"
