"""`orchestrator demo`: the whole story, offline, with real worker processes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.config import default_config
from orchestrator.orchestrator import Orchestrator


def run_demo(out: Console, store: str | None = None) -> None:
    """Walk through set/reset, reuse across sessions, refusal, force_new, log and explain."""
    with tempfile.TemporaryDirectory(prefix="orchestrator-demo-") as tmp:
        url = store or f"sqlite:///{Path(tmp) / 'events.db'}"
        out.rule("orchestrator demo")
        out.print(f"store: {url}  (offline: echo provider, built-in profiles)\n")
        opened: list[Orchestrator] = []

        def session(session_id: str, **config_changes: Any) -> Orchestrator:
            cfg = default_config().model_copy(update=config_changes)
            orch = Orchestrator.open(config=cfg, store=url, session_id=session_id)
            opened.append(orch)
            return orch

        try:
            _story(out, session)
            _log_and_explain(out, opened[0], opened[1])
        finally:
            _stop_everything(out, opened)


def _task(out: Console, orch: Orchestrator, text: str, **kwargs: Any) -> str:
    handle = orch.task_start(kind="worker", worker_id="coder", task=text, **kwargs)
    rec = orch.task_await(handle.task_id, timeout=60)
    pid = _served_pid(orch, rec.task_id)
    out.print(
        f"  [{orch.session_id}] coder <- {text!r}: {rec.response!r}  "
        f"(task {rec.task_id}, pid {pid})",
        markup=False,
    )
    if rec.status != "completed":
        raise RuntimeError(f"demo task failed: {rec.error}")
    return rec.task_id


def _served_pid(orch: Orchestrator, task_id: str) -> int | None:
    done = orch.task_list(view="events", type="TaskCompleted", task_id=task_id)
    return done[0].data.get("pid") if done else None


def _op(out: Console, orch: Orchestrator, op: str, **worker: Any) -> dict[str, Any]:
    handle = orch.task_start(kind="op", op=op, worker={"worker_id": "coder", **worker})
    rec = orch.task_await(handle.task_id, timeout=60)
    out.print(f"  [{orch.session_id}] {op}: {json.dumps(rec.result)}", markup=False)
    return rec.result or {}


def _story(out: Console, session: Any) -> None:
    a = session("demo-a")
    out.print("1. A task is served by the profile's default model (a worker process spawns):")
    _task(out, a, "hello")

    out.print("\n2. worker.model.set (sticky) pins another model for this session:")
    _op(out, a, "worker.model.set", model="local/echo-small")
    _task(out, a, "after set")

    out.print("\n3. A second session on the same store reuses the default-model process:")
    b = session("demo-b")
    _task(out, b, "from another session")

    out.print("\n4. worker.model.reset restores the default; the running process is reused:")
    _op(out, a, "worker.model.reset")
    _task(out, a, "after reset")

    out.print("\n5. A config whose default is another model refuses reuse and spawns:")
    c = session("demo-c", model="local/echo-vision")
    _task(out, c, "other config")

    out.print("\n6. force_new spawns even though a matching process runs:")
    _task(out, b, "fresh please", force_new=True)


def _log_and_explain(out: Console, a: Orchestrator, b: Orchestrator) -> None:
    out.print("\n7. The event log (every decision above):")
    table = Table("pos", "type", "session", "worker", "task", "detail")
    for e in a.task_list(view="events"):
        detail = e.data.get("reason") or e.data.get("model") or e.data.get("resolved_model") or ""
        table.add_row(
            str(e.position),
            e.type,
            e.session_id or "",
            e.worker_id or "",
            e.task_id or "",
            str(detail),
        )
    out.print(table)
    tasks = a.task_list(view="tasks")
    second = next(t for t in tasks if t.kind == "worker" and t.model == "local/echo-small")
    out.print(f"\n8. explain task {second.task_id}:")
    for line in a.task_list(view="explain", task_id=second.task_id)[0].summary:
        out.print(f"  - {line}", markup=False)
    reused = next(t for t in b.task_list(view="tasks") if t.kind == "worker")
    out.print(f"\n   explain task {reused.task_id}:")
    for line in b.task_list(view="explain", task_id=reused.task_id)[0].summary:
        out.print(f"  - {line}", markup=False)


def _stop_everything(out: Console, opened: list[Orchestrator]) -> None:
    if not opened:
        return
    stopped = _op(out, opened[0], "worker.stop").get("stopped", [])
    for orch in opened:
        orch.close()
    out.print(f"\nstopped {len(stopped)} worker processes; done.")
