"""Launching one server through its supervisor (`supervisor.py`, run as a plain script),
polling its ready path, and stopping a server this process launched."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.launcher import Launcher
from orchestrator.model_servers.decision import CLAIM_MARGIN
from orchestrator.model_servers.files import exit_marker, read_log_tail, ready_probe
from orchestrator.model_servers.spec import ModelServerError, ServerSpec
from orchestrator.processes import start_time, terminate, worker_environment

SUPERVISOR = Path(__file__).with_name("supervisor.py")
LOG_TAIL = 10
# A supervisor asked to stop gets this long to stop its server's group (its own grace is
# 5 s per signal) before it is killed.
SUPERVISOR_GRACE = 15.0


def launch(
    spec: ServerSpec, directory: Path, log_path: Path, port: int, idle_timeout: float
) -> tuple[subprocess.Popen[bytes], int, float]:
    """Start the supervisor, which starts the command; the server's pid and start time."""
    env = worker_environment(os.environ, spec.environ(port))
    os.close(os.open(log_path, os.O_CREAT | os.O_WRONLY, 0o600))
    sup_spec = {
        "command": spec.argv(port),
        "env": env,
        "dir": str(directory),
        "log": str(log_path),
        "spawner_pid": os.getpid(),
        "idle_timeout": idle_timeout,
        "adopt_timeout": spec.start_timeout + CLAIM_MARGIN,
    }
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    try:
        sup = subprocess.Popen(
            [sys.executable, "-I", "-S", str(SUPERVISOR)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_fd,
            start_new_session=True,  # outlives this orchestrator, for reuse
        )
    finally:
        os.close(log_fd)
    assert sup.stdin is not None and sup.stdout is not None
    with contextlib.suppress(BrokenPipeError):
        sup.stdin.write(json.dumps(sup_spec).encode())
    sup.stdin.close()
    line = sup.stdout.readline().decode(errors="replace").strip()
    sup.stdout.close()
    if not line.startswith("STARTED "):
        sup.wait(timeout=10)
        what = line.removeprefix("FAILED ") or "its supervisor did not start it"
        raise start_failed(spec, f"could not be started: {what}", log_path, 127)
    pid = int(line.split()[1])
    try:
        started = start_time(pid)
    except Exception:  # noqa: BLE001 - gone already: its exit status is in `exit`
        started = 0.0
    return sup, pid, started


def wait_ready(
    spec: ServerSpec,
    sup: subprocess.Popen[bytes],
    directory: Path,
    log_path: Path,
    port: int,
    began: float,
) -> None:
    """Poll the ready path until it answers 200; a server that exits first or is not
    ready within `start_timeout` fails the start (and is stopped)."""
    deadline = began + spec.start_timeout
    pause = 0.005
    while True:
        if ready_probe(port, spec.ready_path, 1.0) is None:
            return
        if sup.poll() is not None:
            _, status = exit_marker(directory)
            raise start_failed(
                spec, f"exited with status {status} before it was ready", log_path, status
            )
        if time.monotonic() > deadline:
            status = stop_launched(sup, directory)
            raise start_failed(
                spec,
                f"was not ready within {spec.start_timeout:g} s (GET {spec.ready_path} "
                f"on port {port}); it was stopped (exit status {status})",
                log_path,
                status,
                stopped=True,
            )
        time.sleep(pause)
        pause = min(0.1, pause * 1.25)


def stop_launched(
    sup: subprocess.Popen[bytes],
    directory: Path,
    pid: int | None = None,
    pid_started: float | None = None,
) -> int | None:
    """Stop a server we launched (through its supervisor) and return its exit status."""
    Launcher.kill(sup, grace=SUPERVISOR_GRACE)
    if pid is not None and pid_started:
        terminate(pid, pid_started)  # should its supervisor have failed to
    return exit_marker(directory)[1]


def start_failed(
    spec: ServerSpec, what: str, log_path: Path, status: int | None, stopped: bool = False
) -> ModelServerError:
    """The error of a start that failed: what happened and the last lines of its log."""
    tail = read_log_tail(log_path, LOG_TAIL)
    shown = "\n".join(f"  {line}" for line in tail) or "  (empty)"
    return ModelServerError(
        f"The model server of {spec.model} ({spec.command[0]}) {what}. "
        f"Last log lines of {log_path}:\n{shown}",
        exit_status=status,
        stopped=stopped,
    )
