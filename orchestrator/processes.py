"""The outside world of worker processes: pids, start times, tokens and environments."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import socket
from collections.abc import Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

from events.store import state_path

# psutil is imported where it is used: a command that only reads the log never needs it.

ProcessState = Literal["alive", "gone", "recycled"]

# psutil reports start times rounded to the clock tick; anything closer is the same process.
START_TIME_TOLERANCE = 0.05


def host_id() -> str:
    """This machine's name in the registry (`ORCHESTRATOR_HOST_ID` overrides it)."""
    return os.environ.get("ORCHESTRATOR_HOST_ID") or socket.gethostname()


def start_time(pid: int) -> float:
    """The process's start time as the OS reports it."""
    import psutil

    return float(psutil.Process(pid).create_time())


@cache
def own_identity() -> tuple[int, float]:
    """(pid, start time) of this process, used to sign spawn claims."""
    pid = os.getpid()
    return pid, start_time(pid)


def process_state(pid: int, started_at: float) -> ProcessState:
    """Is the recorded process still the one running at `pid`?"""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "gone"
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return "gone"
    except psutil.AccessDenied:
        return "alive"  # it exists; only its owner can say more, and ours would not deny us
    return "alive" if abs(created - started_at) <= START_TIME_TOLERANCE else "recycled"


def settled_state(pid: int, started_at: float, within: float) -> ProcessState:
    """`process_state`, giving a process that may be exiting up to `within` seconds to be
    gone: a process killed mid-request closes its sockets a moment before it is gone."""
    import time

    deadline = time.monotonic() + within
    while True:
        state = process_state(pid, started_at)
        if state != "alive" or time.monotonic() >= deadline:
            return state
        time.sleep(0.02)


@lru_cache(maxsize=16)
def _host_key(state: Path) -> bytes:
    """The host key of a state directory, created on first use."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / "worker.key"
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    # Written whole under a temporary name, then linked into place: a reader sees no key
    # file or the whole key, never an empty one; of two racing creators the first link wins.
    tmp = path.with_name(f".worker.key.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink()
    return _read_key(path)


KEY_BYTES = 32


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise OSError(f"{path} is damaged ({len(key)} bytes, expected {KEY_BYTES}); remove it")
    return key


def worker_token(instance_id: str) -> str:
    """The bearer token of one worker process, derivable only by this user on this host."""
    return _token(state_path(), instance_id)


# A worker's token is fixed at its spawn: the key is read once per state directory, not
# once per request (a file read and an HMAC cost ~70 us of every task).
@lru_cache(maxsize=1024)
def _token(state: Path, instance_id: str) -> str:
    return hmac.new(_host_key(state), instance_id.encode(), hashlib.sha256).hexdigest()


# What a worker process may inherit: enough to run Python and find its state directory.
# Everything else (API keys above all) stays with the orchestrator, which sends the
# credentials a request needs with that request.
_ENV_KEEP = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
_ENV_KEEP_PREFIXES = ("LC_", "XDG_")


def worker_environment(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker process starts with: an allow-list, plus `extra`."""
    env = {k: v for k, v in environ.items() if k in _ENV_KEEP or k.startswith(_ENV_KEEP_PREFIXES)}
    env.update(extra)
    return env


def terminate(pid: int, started_at: float, timeout: float = 5.0) -> bool:
    """Stop the process at `pid` if it is still the one that started at `started_at`
    (never the new owner of a recycled pid). True when it is gone afterwards."""
    import psutil

    if process_state(pid, started_at) != "alive":
        return True
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return True
    except (psutil.AccessDenied, psutil.TimeoutExpired):
        return False
    return True
