"""Fixtures of the interop tests: each test has its own state dir and SQLite store, and the
worker processes it started die with it. `state_home`, `open_orch` and the reaper mirror the
unit suite's on purpose: interop runs against the installed wheel from a tree without
tests/, so it cannot import them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator import Orchestrator

CLI = str(Path(sys.executable).parent / "orchestrator")


def _workers_under(state_home: Path) -> list[psutil.Process]:
    """Worker processes started under one test's state dir. Not in the shipped package:
    scanning every process on the machine is test scaffolding."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "orchestrator.worker" not in (proc.info["cmdline"] or []):
            continue
        try:
            if proc.environ().get("XDG_STATE_HOME") == str(state_home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test's own state dir; the worker processes started under it are stopped after."""
    home = tmp_path / "state"
    home.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    monkeypatch.delenv("ORCHESTRATOR_STORE", raising=False)
    monkeypatch.delenv("ORCHESTRATOR_SESSION", raising=False)
    yield home
    stragglers = _workers_under(home)
    for proc in stragglers:
        proc.kill()
    psutil.wait_procs(stragglers, timeout=5)


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A SQLite store of the test's own."""
    return f"sqlite:///{tmp_path / 'events.db'}"


OpenOrch = Callable[..., Orchestrator]


@pytest.fixture
def open_orch(store: str) -> Iterator[OpenOrch]:
    """Open orchestrators on the test's store; all are closed, workers stopped, at the end."""
    opened: list[Orchestrator] = []

    def _open(**kwargs: Any) -> Orchestrator:
        orch = Orchestrator.open(store=store, **kwargs)
        opened.append(orch)
        return orch

    yield _open
    for orch in opened:
        orch.close(stop_workers=True)
