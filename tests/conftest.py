"""Shared fixtures: isolated state dirs, the store matrix, and no worker left behind."""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from psycopg import sql

from events.store import EventLog
from orchestrator import Orchestrator
from tests.chat import ChatServer
from tests.chat import chat_server as serve_chat

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

STORES = ["memory", "sqlite", "postgresql"]
POSTGRES_URL = os.environ.get(
    "ORCHESTRATOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@functools.cache
def postgres_unavailable() -> str | None:
    """Why the test PostgreSQL cannot be used, or None when it answers."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            f"no PostgreSQL at {POSTGRES_URL} ({first}); start one or set "
            "ORCHESTRATOR_TEST_POSTGRES_URL to enable these tests"
        )


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A store URL on a schema of its own, dropped afterwards (skips without a server)."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}schema={schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def processes_under(state_home: Path, matches: Callable[[list[str]], bool]) -> list[psutil.Process]:
    """Processes whose command line `matches`, started under a given state dir (so by one
    test)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if not matches(proc.info["cmdline"] or []):
            continue
        try:
            if proc.environ().get("XDG_STATE_HOME") == str(state_home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def worker_processes(state_home: Path) -> list[psutil.Process]:
    """Worker processes started under a given state dir (so by one test)."""
    return processes_under(state_home, lambda cmd: "orchestrator.worker" in cmd)


def kill_all(stragglers: list[psutil.Process]) -> None:
    """Kill what a test left running, and wait (a few seconds at most) for it to go."""
    for proc in stragglers:
        proc.kill()
    psutil.wait_procs(stragglers, timeout=5)


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own state dir (key file, worker logs); its workers die with it."""
    home = tmp_path / "state"
    home.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    monkeypatch.delenv("ORCHESTRATOR_STORE", raising=False)
    monkeypatch.delenv("ORCHESTRATOR_HOST_ID", raising=False)
    yield home
    kill_all(worker_processes(home))


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog | str]:
    """The same behaviour on every store: an in-memory log object, or a store URL."""
    if request.param == "memory":
        log = EventLog("memory")
        yield log
        log.close()
    elif request.param == "postgresql":
        with postgres_schema() as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'events.db'}"


OpenOrch = Callable[..., Orchestrator]


@pytest.fixture
def open_orch(store: EventLog | str) -> Iterator[OpenOrch]:
    """Open orchestrators on the test's store; all are closed (workers stopped) at the end."""
    opened: list[Orchestrator] = []

    def _open(**kwargs: Any) -> Orchestrator:
        orch = Orchestrator.open(store=store, **kwargs)
        opened.append(orch)
        return orch

    yield _open
    for orch in opened:
        orch.close(stop_workers=True)


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    """A running chat-completions server on loopback (set `.delay` to make it slow)."""
    with serve_chat() as server:
        yield server


@pytest.fixture
def chat_server_b() -> Iterator[ChatServer]:
    """A second, independent chat-completions server."""
    with serve_chat() as server:
        yield server
