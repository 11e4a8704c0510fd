"""The outside world of worker processes: pids, start times, tokens and their HTTP endpoints."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import ssl
from functools import cache
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil

from events.store import state_dir

ProcessState = Literal["alive", "gone", "recycled"]

# psutil reports start times rounded to the clock tick; anything closer is the same process.
START_TIME_TOLERANCE = 0.05


def host_id() -> str:
    """This machine's name in the registry (`ORCHESTRATOR_HOST_ID` overrides it)."""
    return os.environ.get("ORCHESTRATOR_HOST_ID") or socket.gethostname()


def start_time(pid: int) -> float:
    """The process's start time as the OS reports it."""
    return float(psutil.Process(pid).create_time())


@cache
def own_identity() -> tuple[int, float]:
    """(pid, start time) of this process, used to sign spawn claims."""
    pid = os.getpid()
    return pid, start_time(pid)


def process_state(pid: int, started_at: float) -> ProcessState:
    """Is the recorded process still the one running at `pid`?"""
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


def _host_key() -> bytes:
    path = state_dir() / "worker.key"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return Path(path).read_bytes()
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def worker_token(instance_id: str) -> str:
    """The bearer token of one worker process, derivable only by this user on this host."""
    return hmac.new(_host_key(), instance_id.encode(), hashlib.sha256).hexdigest()


class WorkerUnreachable(RuntimeError):
    """The worker process did not answer on its url."""


class WorkerReplyError(RuntimeError):
    """The worker process answered with an error (bad token, provider failure, ...)."""


@cache
def _client() -> httpx.Client:
    # Workers speak plain HTTP on 127.0.0.1. An empty trust store skips loading the CA bundle
    # (~40 ms per client) and refuses any TLS peer; trust_env=False keeps proxy variables from
    # routing loopback traffic elsewhere. One client per process, shared by threads.
    return httpx.Client(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), trust_env=False)


def worker_call(
    url: str,
    instance_id: str,
    method: Literal["GET", "POST"],
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """One authenticated request to a worker process."""
    headers = {"Authorization": f"Bearer {worker_token(instance_id)}"}
    try:
        resp = _client().request(method, url + path, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise WorkerUnreachable(f"{url}{path}: {exc}") from exc
    if resp.status_code >= 400:
        try:
            detail = str(resp.json().get("error", resp.text))
        except ValueError:
            detail = resp.text
        raise WorkerReplyError(detail or f"{url}{path} answered HTTP {resp.status_code}")
    data: dict[str, Any] = resp.json()
    return data
