"""OS processes started here. `Launcher` owns them once started: it collects the exit
statuses of those that ended (no zombies), kills one nobody will use, waits for one to go,
stops one, and stops them all when the store is gone. `WorkerLauncher` adds the worker's
launch (start it and read its READY line); the model servers' supervisors are launched by
`orchestrator.model_servers.launch` and owned by a `Launcher` all the same. What the
registry records about either is their owners' business (`orchestrator.pool`,
`orchestrator.model_servers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.backends.spec import WorkerSpec
from orchestrator.errors import OrchestratorError
from orchestrator.processes import terminate, worker_environment, worker_token
from orchestrator.worker_env import SPEC_ENV, TOKEN_ENV

READY_TIMEOUT = 30.0
# How long a killed child gets to go. One still there after it (stuck in the kernel, say) is
# kept here, process-wide as `Launcher.kill` is, and collected by a later `reap_children`
# once it has gone: no zombie, and no TimeoutExpired for the caller that wanted it gone.
KILL_WAIT = 5.0
_killed_unreaped: list[subprocess.Popen[bytes]] = []


class SpawnError(OrchestratorError, RuntimeError):
    """A worker process could not be started; the message says why."""


class Launcher:
    """The processes this orchestrator started and keeps, by instance id. `grace`: how long
    a process asked to stop gets before it is killed; with `kill_lingering` False one that
    outlasts it when all are abandoned is left to go by itself (a supervisor killed outright
    would leave its server running unwatched)."""

    def __init__(self, grace: float = 5.0, kill_lingering: bool = True) -> None:
        self.grace = grace
        self.kill_lingering = kill_lingering
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def keep(self, instance_id: str, proc: subprocess.Popen[bytes]) -> None:
        """A launched process is ours to collect when it ends (and to stop on `abandon`)."""
        self._children[instance_id] = proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], grace: float = 0.0) -> None:
        """Stop a launched process nobody will use, and collect it: at once, or with `grace`
        seconds to go after SIGTERM first."""
        if proc.poll() is not None:
            return
        if grace > 0:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                return
        proc.kill()
        _collect_killed(proc)

    def wait_gone(self, instance_id: str, pid: int, started_at: float) -> None:
        """Wait (`grace` seconds at most) for a process asked to go to exit; terminate it if
        it lingers (only while `pid` is still the process started at `started_at`)."""
        import psutil

        child = self._children.get(instance_id)
        try:
            if child is not None:
                child.wait(timeout=self.grace)
                return
            psutil.Process(pid).wait(timeout=self.grace)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            terminate(pid, started_at)
        except psutil.NoSuchProcess:
            return

    def stop(self, instance_id: str, pid: int, started_at: float) -> None:
        """Terminate the process at `pid` now if it is still the one started at
        `started_at` (killed after `grace` seconds), and collect it if it is ours."""
        terminate(pid, started_at, timeout=self.grace)
        child = self._children.get(instance_id)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        self.reap(instance_id)

    def reap(self, instance_id: str) -> None:
        """Collect the exit status of a process started here, if it has ended."""
        child = self._children.get(instance_id)
        if child is not None and child.poll() is not None:
            self._children.pop(instance_id, None)  # another thread may have reaped it too

    def reap_children(self) -> None:
        """Collect the exit statuses of every process started here that ended (and of
        those killed that had not gone at once)."""
        for instance_id in list(self._children):
            self.reap(instance_id)
        for proc in list(_killed_unreaped):
            if proc.poll() is not None:
                with contextlib.suppress(ValueError):  # another thread collected it first
                    _killed_unreaped.remove(proc)

    def abandon(self) -> None:
        """Stop every process started here at once: SIGTERM to all, then `grace` seconds
        each (then SIGKILL, with `kill_lingering`)."""
        for child in list(self._children.values()):
            with contextlib.suppress(OSError):
                child.terminate()
        for instance_id, child in list(self._children.items()):
            try:
                child.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                if self.kill_lingering:
                    child.kill()
                    _collect_killed(child)
            self._children.pop(instance_id, None)


class WorkerLauncher(Launcher):
    """Worker processes, launched with their logs in `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.log_dir = log_dir

    def launch(
        self, spec: WorkerSpec, instance_id: str, idle_timeout: float
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start the worker process of `spec` and wait for its READY line: the process and
        its url. Not kept yet: `keep` it once registered, or `kill` it."""
        worker_spec = {
            "worker_id": spec.worker_id,
            "instance_id": instance_id,
            "fingerprint": spec.fingerprint,
            "model": spec.model,
            "model_policy": spec.model_policy,
            "system_prompt": spec.system_prompt,
            "idle_timeout": idle_timeout,
            "spawner_pid": os.getpid(),
            "log_dir": str(self.log_dir),
            "providers": {pid: p.identity() for pid, p in spec.config.providers.items()},
        }
        env = worker_environment(
            os.environ, {SPEC_ENV: json.dumps(worker_spec), TOKEN_ENV: worker_token(instance_id)}
        )
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = self.log_dir / f"{instance_id}.log"
        log_fd = os.open(log_path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.worker"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                env=env,
                start_new_session=True,  # outlives this orchestrator, for reuse
            )
        except OSError as exc:
            raise SpawnError(f"cannot start worker process: {exc}") from exc
        finally:
            os.close(log_fd)
        assert proc.stdout is not None
        line = _read_line(proc, READY_TIMEOUT)
        proc.stdout.close()
        if not line.startswith("READY "):
            self.kill(proc)
            raise SpawnError(
                f'worker "{spec.worker_id}" (pid {proc.pid}) did not print READY within '
                f"{READY_TIMEOUT:.0f}s; see {log_path}"
            )
        try:
            url = json.loads(line[len("READY ") :])["url"]
            if not isinstance(url, str):
                raise TypeError("url is not a string")
        except (ValueError, LookupError, TypeError):
            self.kill(proc)  # started here and unusable: not left running on its own
            raise SpawnError(
                f'worker "{spec.worker_id}" (pid {proc.pid}) printed a malformed READY line '
                f"{line[:120]!r} (expected READY and a JSON object with a url); see {log_path}"
            ) from None
        return proc, url


def _collect_killed(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a killed child to go, or keep it to collect later (see `KILL_WAIT`)."""
    try:
        proc.wait(timeout=KILL_WAIT)
    except subprocess.TimeoutExpired:
        _killed_unreaped.append(proc)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()
