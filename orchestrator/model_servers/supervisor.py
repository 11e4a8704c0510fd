"""The supervisor of one managed model server (ADR-0012), run as a plain script.

`python -I -S supervisor.py`, its spec as JSON on stdin: starts the server's
command in a process group of its own with stdout and stderr appended to its log file, prints
`STARTED <pid>` (or `FAILED <why>`), then watches until the server is gone:

- until its starter registers it (the file `adopted` appears in its directory), the starter
  dying (this process is re-parented) or `adopt_timeout` passing stops the server: a server
  whose starter dies before registering it is never left behind;
- once adopted, a server unused for `idle_timeout` seconds (the mtime of `used`) with no
  request in flight (nobody holds the shared lock on `inflight.lock`) is stopped;
- SIGTERM stops the server (SIGTERM to its group, SIGKILL after a grace period).

Whatever ends it, the file `exit` says why as JSON `{reason, exit_status, detail}`, for
whoever finds the server gone. Standard library only, no package imports: it starts in
a few milliseconds, so the orchestrator adds little to the server's own start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time

POLL = 0.1
GRACE = 5.0


def _write_exit(directory: str, reason: str, status: int | None, detail: str = "") -> None:
    path = os.path.join(directory, "exit")
    if os.path.exists(path):
        return  # whoever stopped it on purpose said why first
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"reason": reason, "exit_status": status, "detail": detail}, fh)
    os.replace(tmp, path)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _reap(pid: int) -> int | None:
    """The server's exit status if it has ended, else None."""
    try:
        done, raw = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    return _status(raw) if done else None


def _stop(pid: int) -> int:
    """Stop the server's process group: SIGTERM, then SIGKILL after GRACE seconds."""
    for sig, wait in ((signal.SIGTERM, GRACE), (signal.SIGKILL, GRACE)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            status = _reap(pid)
            if status is not None:
                return status
            time.sleep(0.02)
    return -int(signal.SIGKILL)


def _idle(directory: str, idle_timeout: float) -> bool:
    """Unused for `idle_timeout` and nothing in flight: then the exclusive lock is taken
    and kept until this process exits, so no request starts on a server being stopped."""
    try:
        unused = time.time() - os.stat(os.path.join(directory, "used")).st_mtime
    except OSError:
        return False
    if unused <= idle_timeout:
        return False
    fd = os.open(os.path.join(directory, "inflight.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    return True  # the fd stays open: the lock is held until exit


def main() -> None:
    """Start the server, announce it, watch it."""
    spec = json.loads(sys.stdin.read())
    directory = spec["dir"]
    log_fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawnp(
            spec["command"][0],
            spec["command"],
            spec["env"],
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null_fd, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setpgroup=0,
        )
    except OSError as exc:
        detail = f"cannot run {spec['command'][0]!r}: {exc.strerror or exc}"
        os.write(log_fd, f"{detail}\n".encode())
        _write_exit(directory, "failed", 127, detail)
        sys.stdout.write(f"FAILED {detail}\n")
        sys.stdout.flush()
        return
    os.close(null_fd)
    os.close(log_fd)
    try:
        os.write(1, f"STARTED {pid}\n".encode())
    except BrokenPipeError:
        # Its starter died before reading this: nobody will register the server.
        _write_exit(directory, "spawner gone", _stop(pid), "its starter died first")
        return
    finally:
        os.close(1)  # nobody reads further: the starter closes its end
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    began = time.monotonic()
    adopted = os.path.join(directory, "adopted")
    while True:
        status = _reap(pid)
        if status is not None:
            _write_exit(directory, "exited", status, f"the server exited with status {status}")
            return
        if stopping:
            _write_exit(directory, "terminated", _stop(pid), "stopped by SIGTERM")
            return
        if not os.path.exists(adopted):
            if os.getppid() != spec["spawner_pid"]:
                _write_exit(directory, "spawner gone", _stop(pid), "its starter died first")
                return
            if time.monotonic() - began > spec["adopt_timeout"]:
                _write_exit(directory, "never registered", _stop(pid), "never registered")
                return
        elif _idle(directory, spec["idle_timeout"]):
            _write_exit(directory, "idle", None, f"idle for {spec['idle_timeout']:g} s")
            _stop(pid)
            return
        time.sleep(POLL)


if __name__ == "__main__":
    main()
