"""The worker fingerprint: a stable digest of everything that decides what a process does.

`identity()` lists the inputs, `fingerprint()` digests them, and `identity_diff()` says in
words what differs between two identities, which is how a rejected reuse explains itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from events.catalogue import ModelPolicy
from orchestrator.config import BackendKind, OrchestratorConfig, ProfileConfig


def identity(
    worker_id: str,
    backend: BackendKind,
    model: str,
    model_policy: ModelPolicy,
    profile: ProfileConfig,
    config: OrchestratorConfig,
) -> dict[str, Any]:
    """What a process is: worker id, backend, default model and policy, the prompt it adds,
    and every provider it may call (a per-message model may name any of them; never a key).
    """
    return {
        "worker_id": worker_id,
        "backend": backend,
        "model": model,
        "model_policy": model_policy,
        "system_prompt": profile.system_prompt,
        "providers": {pid: p.identity() for pid, p in sorted(config.providers.items())},
    }


def fingerprint(ident: dict[str, Any]) -> str:
    """Digest of an identity: two requests with equal fingerprints may share a process."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"fp-{digest[:16]}"


def identity_diff(recorded: dict[str, Any], requested: dict[str, Any]) -> str:
    """'providers.lab.base_url: http://a -> http://b; ...' for what differs, or ''."""
    changes: list[str] = []
    _diff("", recorded, requested, changes)
    return "; ".join(changes)


def _diff(prefix: str, a: Any, b: Any, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a:
                out.append(f"{path}: added")
            elif key not in b:
                out.append(f"{path}: removed")
            else:
                _diff(path, a[key], b[key], out)
    elif a != b:
        shown = [_short(v) for v in (a, b)]
        out.append(f"{prefix}: {shown[0]} -> {shown[1]}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
