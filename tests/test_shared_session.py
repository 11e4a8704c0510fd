"""Many orchestrator processes writing to one session: every decision is recorded against
the state it was decided on, so `replay --check` passes and no task is served by a model an
override committed before its decision would have changed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from events import EventLog
from events.catalogue import ModelResolved, TaskCompleted
from events.reads import overrides_at
from events.store import Filter
from orchestrator.history import check
from tests.conftest import postgres_schema

SESSION = "shared"
MODELS = ["local/echo-small", "local/echo-vision", "local/echo-large"]
DEFAULT = "local/echo-large"  # what `coder` (tag auto) means without an override

# One writer: a random mix of sticky sets, resets and worker tasks on one session.
WRITER = """
import random, sys
from orchestrator import Orchestrator
from tests.helpers import config_with, reset_model, run, set_model
store, seed, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
models = {models!r}
with Orchestrator.open(config=config_with("agent"), store=store, session_id={session!r}) as orch:
    print("started", flush=True)
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.3:
            set_model(orch, "coder", rng.choice(models))
        elif roll < 0.45:
            reset_model(orch, "coder")
        else:
            run(orch, "coder", "hi")
"""


def _writers(store: str, count: int, steps: int, root: Path) -> list[subprocess.Popen[str]]:
    code = WRITER.format(models=MODELS, session=SESSION)
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, store, str(seed), str(steps)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(count)
    ]


def _served_as_decided(log: EventLog) -> list[str]:
    """Each worker task whose model differs from the override in force at its decision."""
    wrong = []
    decided: dict[str, tuple[int, str]] = {}
    for position, event in log.select(Filter(session_id=SESSION)):
        if isinstance(event, ModelResolved) and event.task_id:
            decided[event.task_id] = (position, event.resolved_model)
        if isinstance(event, TaskCompleted) and event.task_id in decided and event.model:
            at, model = decided[event.task_id]
            override = (overrides_at(log, SESSION, at - 1) or {}).get("coder")
            expected = override.resolved_model if override else DEFAULT
            if model != expected or event.model != expected:
                wrong.append(f"{event.task_id} at {at}: {event.model}, expected {expected}")
    return wrong


def _drive(store: str, tmp_path: Path, kill_one: bool) -> None:
    root = Path(__file__).parent.parent
    procs = _writers(store, count=4, steps=40, root=root)
    try:
        for proc in procs:  # every writer has opened the store before any is killed
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "started", proc.stderr
        if kill_one:
            procs[0].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 150
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        for proc in procs[1 if kill_one else 0 :]:
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    log = EventLog(store)
    try:
        report = check(log)
        assert report.checked > 20, report
        assert report.ok, [d.detail for d in report.differences]
        assert _served_as_decided(log) == []
    finally:
        log.close()
    out = subprocess.run(
        [str(Path(sys.executable).parent / "orchestrator"), "--store", store, "replay", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: "), out.stdout


def test_writers_on_one_sqlite_session_record_what_they_decided(tmp_path: Path) -> None:
    _drive(f"sqlite:///{tmp_path / 'events.db'}", tmp_path, kill_one=True)


def test_writers_on_one_postgres_session_record_what_they_decided(tmp_path: Path) -> None:
    with postgres_schema() as url:
        _drive(url, tmp_path, kill_one=False)
