"""A SQLite store deleted or replaced under a running orchestrator: the next write says so in
one line, nothing is written anywhere else, and the processes it started are stopped."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from events.store import StoreError, StoreMoved
from orchestrator import Orchestrator
from tests.helpers import config_with, run, wait_for


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_moved_store_fails_the_next_write_and_stops_its_workers(tmp_path: Path, how: str) -> None:
    db = tmp_path / "events.db"
    orch = Orchestrator.open(config=config_with("server"), store=f"sqlite:///{db}")
    try:
        first = run(orch, "coder", "hello")
        assert first.status == "completed", first.error
        worker = orch.task_list(view="workers")
        pid = next(w.pid for w in worker if w.worker_id == "coder")
        assert pid is not None and psutil.pid_exists(pid)
        if how == "deleted":
            db.unlink()
        else:
            other = tmp_path / "other.db"
            other.write_bytes(b"")
            os.replace(other, db)
        with pytest.raises(StoreMoved) as raised:
            orch.task_start(kind="worker", worker_id="coder", task="lost?")
        message = str(raised.value)
        assert "deleted or replaced" in message and "\n" not in message
        assert isinstance(raised.value, StoreError)
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
        with pytest.raises(StoreMoved):  # every later call says the same
            orch.task_peek(first.task_id)
    finally:
        orch.close()
    if how == "deleted":
        assert not db.exists(), "nothing is written anywhere else"
    else:
        assert db.read_bytes() == b""
