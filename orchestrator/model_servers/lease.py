"""Holding a server for one request: a shared `flock` on its `inflight.lock` from the
moment it is acquired until the reply is in (ADR-0012). An eviction or idle stop takes the
lock exclusively and writes `exit` before signalling, so a lease taken checks `exit` and
the pid after it holds the lock."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from events.projections import ModelServerEntry
from orchestrator.model_servers.files import open_inflight, touch, try_lock
from orchestrator.processes import process_state


class ServerLease:
    """The server serving one request: its base_url, held (shared lock) until released."""

    def __init__(
        self, entry: ModelServerEntry, fd: int, started: bool, on_release: Callable[[], None]
    ) -> None:
        self.entry = entry
        self.base_url = entry.url
        self.started = started
        self._fd: int | None = fd
        self._on_release = on_release

    def release(self) -> None:
        """The request ended: mark the server used now and let go of it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            touch(Path(self.entry.log_path).parent / "used")
        finally:
            os.close(fd)  # drops the shared lock
            self._on_release()

    def __enter__(self) -> ServerLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take_lease(
    server: ModelServerEntry, started: bool, on_release: Callable[[], None]
) -> ServerLease | None:
    """Take the server's shared in-flight lock, then make sure nobody stopped it
    meanwhile (an evictor or idle stop writes `exit` while it holds the lock
    exclusively). None when it is being stopped or is gone."""
    directory = Path(server.log_path).parent
    try:
        fd = open_inflight(directory)
    except OSError:
        return None
    if not try_lock(fd, fcntl.LOCK_SH):
        os.close(fd)
        return None
    if (directory / "exit").exists() or process_state(server.pid, server.pid_started_at) != "alive":
        os.close(fd)
        return None
    touch(directory / "used")
    return ServerLease(server, fd, started, on_release)
