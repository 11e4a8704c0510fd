"""Small helpers the tests share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

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
