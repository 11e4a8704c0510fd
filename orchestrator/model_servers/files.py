"""A server's directory and port, as files and sockets: the `exit` marker, the in-flight lock,
the mtime of `used`, its log's tail, the ready probe and a free port."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path


def read_log_tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a log (reading at most its last 64 KiB per 100 lines)."""
    limit = max(1, lines) * 640
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read()
    except OSError:
        return []
    text = data.decode(errors="replace").splitlines()
    if size > limit and text:
        text = text[1:]  # a partial first line
    return text[-lines:] if lines else text


def exit_marker(directory: Path) -> tuple[str | None, int | None]:
    """Why a server ended and its exit status, as the file `exit` says (None when unsaid)."""
    try:
        data = json.loads((directory / "exit").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    status = data.get("exit_status")
    return str(data.get("reason") or ""), status if isinstance(status, int) else None


def write_exit(directory: Path, reason: str, detail: str) -> None:
    """Say why a server is being stopped, before it is (the supervisor keeps the first)."""
    path = directory / "exit"
    if path.exists():
        return
    tmp = directory / f"exit.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps({"reason": reason, "exit_status": None, "detail": detail}))
    with contextlib.suppress(OSError):
        os.link(tmp, path)  # the first reason wins
    tmp.unlink(missing_ok=True)


def open_inflight(directory: Path) -> int:
    """The server's in-flight lock file, opened (created if need be): the caller closes the
    descriptor, which drops any lock taken on it. Raises OSError."""
    return os.open(directory / "inflight.lock", os.O_RDWR | os.O_CREAT, 0o600)


def try_lock(fd: int, operation: int) -> bool:
    """Take `fcntl.LOCK_SH` or `fcntl.LOCK_EX` on `fd` without waiting: was it taken?"""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def is_busy(directory: Path) -> bool:
    """Does a request hold the server's in-flight lock (shared) right now?"""
    try:
        fd = open_inflight(directory)
    except OSError:
        return False
    try:
        return not try_lock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


def lock_exclusive(fd: int, wait: float) -> bool:
    """Take the in-flight lock exclusively, trying for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while not try_lock(fd, fcntl.LOCK_EX):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def touch(path: Path) -> None:
    """Create `path` or set its mtime to now (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.utime(fd)
        finally:
            os.close(fd)


def mtime(path: Path) -> float | None:
    """`path`'s mtime, or None when it is not there."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def ready_probe(port: int, path: str, timeout: float) -> str | None:
    """GET `path` on a loopback port: None when it answers 200, else what happened."""
    import http.client  # it loads ssl: only a command that talks to a server pays for it

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read(64 * 1024)
        return None if resp.status == 200 else f"HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        return first_line(exc)
    finally:
        conn.close()


def free_port() -> int:
    """A loopback port free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
