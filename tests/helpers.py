"""Small helpers the tests share."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from events.catalogue import WorkerSpawned
from orchestrator import Orchestrator
from orchestrator.config import BackendKind, OrchestratorConfig, default_config


def config_with(backend: BackendKind = "agent", **changes: Any) -> OrchestratorConfig:
    """The built-in default config, every profile on `backend`, with top-level changes."""
    cfg = default_config()
    for profile in cfg.profiles.values():
        profile.backend = backend
    return cfg.model_copy(update=changes)


def lab_config(
    port: int, backend: BackendKind = "server", models: tuple[str, ...] = ("slow",), **provider: Any
) -> OrchestratorConfig:
    """A config whose one provider, `lab`, speaks the OpenAI protocol on a local port."""
    return OrchestratorConfig.model_validate(
        {
            "model": f"lab/{models[0]}",
            "small_model": f"lab/{models[-1]}",
            "providers": {
                "lab": {
                    "kind": "openai",
                    "base_url": f"http://127.0.0.1:{port}/v1",
                    "models": {m: {} for m in models},
                    **provider,
                }
            },
            "profiles": {"coder": {"backend": backend}},
        }
    )


def lab_settings(port: int, models: dict[str, Any], **config: Any) -> dict[str, Any]:
    """A config as written (no built-in providers): its one provider `lab` speaks the OpenAI
    protocol on a local port without retries and serves `models`; `lab/big` is the model,
    `lab/small` the small one. `config` adds top-level keys (`profiles`, ...)."""
    return {
        "extends": "none",
        "model": "lab/big",
        "small_model": "lab/small",
        "providers": {
            "lab": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{port}/v1",
                "max_retries": 0,
                "models": models,
            }
        },
        **config,
    }


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def weather_call(number: int, city: str) -> dict[str, Any]:
    """The tool call `call_<number>` a model answers with: `get_weather` for `city`."""
    return {
        "id": f"call_{number}",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


def run_command(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (within `timeout` seconds), its output captured as text; a
    failing exit does not raise: the test asserts what it expects of it."""
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False
    )


def run(orch: Orchestrator, worker_id: str, text: str, **kwargs: Any) -> Any:
    """Start a worker task and wait for its record."""
    handle = orch.task_start(kind="worker", worker_id=worker_id, task=text, **kwargs)
    return orch.task_await(handle.task_id, timeout=60)


def op(orch: Orchestrator, name: str, **payload: Any) -> Any:
    """Run an op task and return its finished record."""
    handle = orch.task_start(kind="op", op=name, **payload)
    return orch.task_await(handle.task_id, timeout=60)


def set_model(orch: Orchestrator, worker_id: str, model: str, **extra: Any) -> Any:
    """`worker.model.set` for one worker."""
    return op(orch, "worker.model.set", worker={"worker_id": worker_id, "model": model, **extra})


def reset_model(orch: Orchestrator, worker_id: str, **extra: Any) -> Any:
    """`worker.model.reset` for one worker."""
    return op(orch, "worker.model.reset", worker={"worker_id": worker_id, **extra})


def assert_replay_view_matches(orchs: Iterable[Orchestrator]) -> None:
    """The `replay` view of the whole log equals the live registry, tasks and overrides."""
    orchs = list(orchs)
    # The registry view first: reading it records processes found gone, replay reads after.
    registry = orchs[0].task_list(view="registry")
    view = orchs[0].task_list(view="replay")[0]
    assert view.registry == registry
    for orch in orchs:
        sid = orch.session_id
        assert [t for t in view.tasks if t.session_id == sid] == orch.task_list(view="tasks")
        live = {
            w.worker_id: (w.model_ref, w.model_policy)
            for w in orch.task_list(view="workers")
            if w.reason.startswith("session override")
        }
        replayed = {
            o.worker_id: (o.model_ref, o.model_policy)
            for o in view.overrides
            if o.session_id == sid
        }
        assert replayed == live


def wait_for(check: Callable[[], Any], timeout: float = 20.0, every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(every)


def fake_spawned(
    session_id: str, worker_id: str, instance_id: str, pid: int, model: str
) -> WorkerSpawned:
    """A `WorkerSpawned` of a process that never ran (host "h", port 9): registry history
    for folds and views that read it, never probed."""
    return WorkerSpawned(
        session_id=session_id,
        worker_id=worker_id,
        instance_id=instance_id,
        backend="server",
        host="h",
        pid=pid,
        pid_started_at=0.0,
        url="http://127.0.0.1:9",
        fingerprint="fp",
        model=model,
        model_policy="dynamic",
    )
