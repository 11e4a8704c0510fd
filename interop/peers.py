"""What the interop tests share: where the installed peers are, free ports, and peer servers
started as real processes that are always stopped, each wait with a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

STATUS_ENV = "INTEROP_PEERS"
T = TypeVar("T")


def peer_command(name: str) -> Path:
    """The installed peer's command, or skip the test with the one line that says why not."""
    status = os.environ.get(STATUS_ENV)
    if not status:
        pytest.skip(f"{name}: run through `make interop`, which installs the peers")
    rows = json.loads(Path(status).read_text())
    row = rows.get(name)
    if row is None:
        pytest.skip(f"{name}: not listed in interop/peers.toml")
    if not row["ok"]:
        pytest.skip(f"{name} could not be installed: {row['reason']}")
    return Path(row["command"])


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], T | None], what: str, deadline: float = 30.0) -> T:
    """Poll `check` until it returns something, or fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline:g} s")
        time.sleep(0.25)


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def serving(
    cmd: list[str], env: Mapping[str, str], ready_url: str, log: Path, deadline: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a peer server until the block ends; it must answer `ready_url` within `deadline`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:

        def ready() -> bool | None:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    return True
            return None

        wait_for(ready, f"{Path(cmd[0]).name} answering {ready_url}", deadline)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a peer server and every process it started (its own process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
