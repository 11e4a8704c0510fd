"""The model fingerprint: a stable digest of what defines a worker process."""

from __future__ import annotations

import hashlib
import json

from events.catalogue import ModelPolicy
from orchestrator.config import Backend, ProfileConfig


def fingerprint(
    worker_id: str,
    backend: Backend,
    model: str,
    model_policy: ModelPolicy,
    profile: ProfileConfig,
) -> str:
    """Digest of worker id, backend, default model, policy and prompt-affecting settings.

    Two requests with equal fingerprints may share a process; anything that would make the
    process answer differently must be in here (ADR-0003).
    """
    payload = {
        "worker_id": worker_id,
        "backend": backend,
        "model": model,
        "model_policy": model_policy,
        "system_prompt": profile.system_prompt,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"fp-{digest[:16]}"
