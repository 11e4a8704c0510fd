"""LiteLLM's proxy as a managed model server: the orchestrator starts one proxy per model
from a `command` with a per-model config file, reuses it, and with `max_model_servers = 1`
evicts one model's proxy to start the other's; the log says so."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from events.catalogue import (
    ModelServerReady,
    ModelServerReused,
    ModelServerStarted,
    ModelServerStopped,
)
from events.store import Filter
from interop.conftest import OpenOrch
from interop.peers import peer_command

KEY_ENV = "INTEROP_MANAGED_LITELLM_KEY"
MODELS = {"alpha": "alpha answers", "beta": "beta answers"}


def _proxy_file(workdir: Path, model: str, answer: str) -> Path:
    """One model's proxy config (JSON is YAML): the model name the orchestrator asks for."""
    path = workdir / f"{model}.yaml"
    params = {"model": f"openai/{model}", "api_key": "unused", "mock_response": answer}
    path.write_text(
        json.dumps(
            {
                "model_list": [{"model_name": model, "litellm_params": params}],
                "litellm_settings": {"num_retries": 0},
            }
        )
    )
    return path


def _config(litellm: Path, workdir: Path, key: str) -> dict[str, Any]:
    return {
        "model": "managed/alpha",
        "pool": {"max_model_servers": 1},
        "providers": {
            "managed": {
                "kind": "openai",
                "api_key_env": KEY_ENV,
                "max_retries": 0,
                "timeout": 60,
                "server": {
                    "command": [
                        str(litellm),
                        "--config",
                        "{config}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                    ],
                    "ready_path": "/health/liveliness",
                    "start_timeout": 180,
                    # The proxy's own key (it refuses to start without one); clients send it.
                    "env": {
                        "LITELLM_MASTER_KEY": key,
                        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                    },
                },
                "models": {
                    name: {"config": str(_proxy_file(workdir, name, answer))}
                    for name, answer in MODELS.items()
                },
            }
        },
        "profiles": {"coder": {"model": "managed/alpha", "backend": "server"}},
    }


@pytest.mark.parametrize("backend", ["server", "agent"])
def test_one_proxy_per_model_started_reused_and_evicted(
    open_orch: OpenOrch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    litellm = peer_command("litellm")
    key = f"sk-{secrets.token_hex(16)}"
    monkeypatch.setenv(KEY_ENV, key)
    cfg = _config(litellm, tmp_path, key)
    cfg["profiles"]["coder"]["backend"] = backend
    orch = open_orch(config=cfg)
    try:
        _run_three(orch)
    finally:  # the proxies are ours to stop, whatever happened
        orch.servers.stop_matching(None, {"session_id": orch.session_id})


def _run_three(orch: Any) -> None:
    served = []
    for model in ("alpha", "alpha", "beta"):
        handle = orch.task_start(
            kind="worker", worker_id="coder", task="hi", model=f"managed/{model}"
        )
        rec = orch.task_await(handle.task_id, timeout=240)
        assert rec.status == "completed", rec.error
        assert rec.response == MODELS[model]
        served.append(rec.model)
    assert served == ["managed/alpha", "managed/alpha", "managed/beta"]

    events = [e for _, e in orch.log.select(Filter(stream="registry"))]
    started = [e.model for e in events if isinstance(e, ModelServerStarted)]
    assert started == ["managed/alpha", "managed/beta"]
    assert sum(isinstance(e, ModelServerReady) for e in events) == 2
    assert any(isinstance(e, ModelServerReused) for e in events)
    stops = [e for e in events if isinstance(e, ModelServerStopped)]
    assert [s.reason for s in stops] == ["evicted"]

    servers = [r for r in orch.task_list(view="registry") if r.kind == "model_server"]
    status = {r.model: r.status for r in servers}
    assert status == {"managed/alpha": "stopped", "managed/beta": "ready"}
