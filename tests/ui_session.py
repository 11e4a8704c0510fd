"""A recorded session for the inspector's tests: a set, a reuse, a refused reuse, a
fallback and a cancelled task, on real worker processes and a local chat server."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import Orchestrator, views
from tests.chat import ChatServer, Reply
from tests.helpers import lab_settings, op, reset_model, run, set_model, wait_for

if TYPE_CHECKING:
    from starlette.testclient import TestClient

    from orchestrator.config import OrchestratorConfig
    from orchestrator.ui.data import Inspector

TOKEN = "t0ken-for-tests"

SESSION = "rec"


def lab_config(port: int) -> dict[str, Any]:
    """Provider `lab` (big, small; priced) on a local port; coder on server processes,
    falling back to small."""
    models = {
        "big": {"cost_input": 2.0, "cost_output": 10.0},
        "small": {"cost_input": 0.5, "cost_output": 1.0},
    }
    profiles = {"coder": {"backend": "server", "fallback_models": ["lab/small"]}}
    return lab_settings(port, models, profiles=profiles)


@dataclass
class Recorded:
    """What the recording did, by task id."""

    url: str
    config: dict[str, Any]
    first: str  # spawned a process on lab/big
    after_set: str  # lab/small under the override: big refused, small spawned
    set_position: int  # the WorkerModelSet
    after_reset: str  # big reused
    fallback: str  # big answered 500, small served
    cancelled: str


def record(url: str, server: ChatServer) -> Recorded:
    """Record the session on `url`; its worker processes are stopped at the end."""
    config = lab_config(server.port)
    orch = Orchestrator.open(config=config, store=url, session_id=SESSION)
    try:
        first = run(orch, "coder", "hello").task_id
        op(orch, "memory.put", memory={"key": "plan", "value": "look", "tags": ["ui"]})
        set_model(orch, "coder", "lab/small")
        set_at = orch.task_list(view="events", session_id=SESSION, type="WorkerModelSet")
        after_set = run(orch, "coder", "under the override").task_id
        reset_model(orch, "coder")
        after_reset = run(orch, "coder", "back to big").task_id
        server.script = [Reply(status=500, error="big is down")]
        fallback = run(orch, "coder", "fall back please").task_id
        server.script = [Reply(delay=30)]
        slow = orch.task_start(kind="worker", worker_id="coder", task="too slow").task_id
        wait_for(lambda: len(server.requests) >= 6, timeout=30)
        orch.task_cancel(slow)
        orch.task_await(slow, timeout=30)
        return Recorded(
            url,
            config,
            first,
            after_set,
            set_at[0].position,
            after_reset,
            fallback,
            slow,
        )
    finally:
        orch.close(stop_workers=True)


def start_task_elsewhere(url: str, session_id: str = SESSION) -> str:
    """Start (and finish) an op task on the session from another process; its task id."""
    code = textwrap.dedent(
        f"""
        from orchestrator import Orchestrator, views
        with Orchestrator.open(store={url!r}, session_id={session_id!r}) as o:
            h = o.task_start(kind="op", op="memory.put", memory={{"key": "k", "value": "v"}})
            o.task_await(h.task_id, timeout=30)
            print(h.task_id)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def view_queries(rec: Recorded, whatif_file: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every view of `views.VIEWS` (checked), with filters that make it answer something on
    the recorded session: what the API and the bare-log reader are compared on."""
    queries: list[tuple[str, dict[str, Any]]] = [
        ("tasks", {}),
        ("workers", {}),
        ("registry", {}),
        ("models", {}),
        ("profiles", {}),
        ("memory", {}),
        ("events", {}),
        ("events", {"session_id": SESSION, "type": "TaskStarted", "since": 3, "limit": 4}),
        ("events", {"task_id": rec.fallback}),
        ("replay", {"until": rec.set_position}),
        ("explain", {"task_id": rec.after_set}),
        ("explain", {"worker_id": "coder"}),
        ("usage", {}),
        ("usage", {"session_id": None}),
        ("whatif", {"config": str(whatif_file)}),
        ("whatif", {"config": str(whatif_file), "session_id": SESSION}),
        ("diff", {"since": 2, "until": rec.set_position + 5}),
        ("conversation", {"task_id": rec.after_set}),
    ]
    assert {view for view, _ in queries} == set(views.VIEWS)
    return queries


@contextlib.contextmanager
def inspecting(url: str, config: OrchestratorConfig | None) -> Iterator[Inspector]:
    """The inspector's data over a store, caught up with it, closed afterwards."""
    from orchestrator.ui.data import Inspector

    data = Inspector(url, config)
    try:
        while data.catch_up():
            pass
        yield data
    finally:
        data.close()


@contextlib.contextmanager
def api_client(inspector: Inspector, **options: Any) -> Iterator[TestClient]:
    """A client of the inspector's app that sends the token (options: TestClient's)."""
    from starlette.testclient import TestClient

    from orchestrator.ui.app import create_app

    with TestClient(create_app(inspector, TOKEN), **options) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client
