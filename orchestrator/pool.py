"""The worker pool: get or spawn server worker processes through the device registry.

Every decision is appended to the `registry` stream at the version it was made on. Two
requesters (threads, processes or hosts) that decide at once cannot both win: the second
append conflicts, and it decides again on the newer state, where it finds the first one's
claim and waits for the process that claim produces (ADR-0003).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil

from events.catalogue import (
    Event,
    ModelPolicy,
    RejectReason,
    WorkerExited,
    WorkerReady,
    WorkerReused,
    WorkerReuseRejected,
    WorkerSpawned,
    WorkerSpawnFailed,
    WorkerSpawnRequested,
    WorkerStopped,
)
from events.projections import Claim, RegistryEntry, RegistryState, apply_registry
from events.store import EventLog, StreamConflict, state_dir
from events.streams import StreamView
from orchestrator.config import OrchestratorConfig
from orchestrator.processes import (
    WorkerReplyError,
    WorkerUnreachable,
    host_id,
    own_identity,
    process_state,
    start_time,
    worker_call,
    worker_token,
)
from orchestrator.reuse import (
    CLAIM_TIMEOUT,
    Request,
    candidates,
    claim_expired,
    pending_claim,
    static_rejection,
)
from orchestrator.worker import SPEC_ENV, TOKEN_ENV

REGISTRY_STREAM = "registry"
READY_TIMEOUT = 30.0
WAIT_POLL = 0.05


class SpawnError(RuntimeError):
    """A worker process could not be started; the message says why."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start (or recognise) one worker process."""

    worker_id: str
    model: str
    model_policy: ModelPolicy
    fingerprint: str
    system_prompt: str
    config: OrchestratorConfig
    idle_timeout: float = 3600.0


@dataclass(frozen=True)
class Acquired:
    """The process that will serve a request, and how it was obtained."""

    entry: RegistryEntry
    reused: bool
    reason: str


class WorkerPool:
    """Server workers of one orchestrator, backed by the shared registry stream."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.host = host_id()
        self.registry: StreamView[RegistryState] = StreamView(
            log, REGISTRY_STREAM, RegistryState, apply_registry
        )
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.started_here: set[str] = set()

    # --- the decision ----------------------------------------------------------------------

    def get_or_spawn(
        self,
        spec: WorkerSpec,
        session_id: str,
        task_id: str | None = None,
        force_new: bool = False,
        spawn: bool = True,
    ) -> Acquired | None:
        """Reuse a matching live process, or spawn exactly one. None if `spawn` is False
        and nothing matches."""
        request = Request(
            spec.worker_id, spec.fingerprint, spec.model, spec.model_policy, self.host, force_new
        )
        ids = {"session_id": session_id, "worker_id": spec.worker_id, "task_id": task_id}
        # Outlast an abandoned claim's expiry, so a waiter takes it over instead of failing.
        deadline = time.monotonic() + CLAIM_TIMEOUT.total_seconds() + READY_TIMEOUT
        while True:
            try:
                outcome = self._decide(request, ids, spawn)
            except StreamConflict:
                continue  # someone else decided first: look again at what they did
            if isinstance(outcome, Acquired) or outcome is None:
                return outcome
            if isinstance(outcome, str):
                return self._spawn(spec, outcome, ids, force_new)
            if time.monotonic() > deadline:
                raise SpawnError(
                    f'Timed out waiting for another process to spawn worker "{spec.worker_id}".'
                )
            time.sleep(WAIT_POLL)

    def _decide(
        self, request: Request, ids: dict[str, Any], spawn: bool
    ) -> Acquired | str | Claim | None:
        """One look at the registry: an Acquired, a claim id we now own, a claim to wait
        for, or None (nothing to reuse and spawning not allowed)."""
        with self.registry.lock:
            state = self.registry.refresh()
            version = self.registry.version
            events: list[Event] = []
            exits: list[Event] = []
            for entry in candidates(state, request.worker_id):
                reason, detail = self._judge(entry, request)
                if reason is None:
                    events.append(
                        WorkerReused(
                            **ids, instance_id=entry.instance_id, fingerprint=entry.fingerprint
                        )
                    )
                    self.log.append(REGISTRY_STREAM, events, version)
                    return Acquired(entry, True, _reuse_reason(entry))
                rejected = WorkerReuseRejected(
                    **ids,
                    instance_id=entry.instance_id,
                    reason=reason,
                    detail=detail,
                    fingerprint=entry.fingerprint,
                    requested_fingerprint=request.fingerprint,
                )
                events.append(rejected)
                if reason in ("process_gone", "pid_recycled", "health_failed"):
                    exit_event = WorkerExited(**ids, instance_id=entry.instance_id, detail=detail)
                    events.append(exit_event)
                    exits += [rejected, exit_event]
            if not spawn:
                if events:
                    self.log.append(REGISTRY_STREAM, events, version)
                return None
            claim = None if request.force_new else pending_claim(state, request)
            if claim is not None and not self._claim_abandoned(claim):
                if exits:  # dead entries leave the candidates now; mismatches are told later
                    self.log.append(REGISTRY_STREAM, exits, version)
                return claim
            if claim is not None:
                events.append(
                    WorkerSpawnFailed(
                        **ids,
                        claim_id=claim.claim_id,
                        error=f"claimant pid {claim.claimant_pid} on {claim.host} "
                        "died or gave up before its worker was ready",
                    )
                )
            claim_id = uuid.uuid4().hex
            pid, started = own_identity()
            events.append(
                WorkerSpawnRequested(
                    **ids,
                    claim_id=claim_id,
                    fingerprint=request.fingerprint,
                    model=request.model,
                    model_policy=request.model_policy,
                    host=self.host,
                    claimant_pid=pid,
                    claimant_started_at=started,
                    force_new=request.force_new,
                )
            )
            self.log.append(REGISTRY_STREAM, events, version)
            return claim_id

    def _judge(self, entry: RegistryEntry, request: Request) -> tuple[RejectReason | None, str]:
        reason = static_rejection(entry, request)
        if reason is not None:
            return reason, _static_detail(reason, entry, request)
        proc = process_state(entry.pid, entry.pid_started_at)
        if proc == "gone":
            return "process_gone", f"pid {entry.pid} no longer exists"
        if proc == "recycled":
            return "pid_recycled", f"pid {entry.pid} now belongs to another process"
        try:
            health = worker_call(str(entry.url), entry.instance_id, "GET", "/health", timeout=2.0)
        except (WorkerUnreachable, WorkerReplyError) as exc:
            return "health_failed", f"/health did not answer: {exc}"
        if health.get("instance_id") != entry.instance_id:
            return "health_failed", (
                f"/health answered instance {health.get('instance_id')}, "
                f"recorded {entry.instance_id}"
            )
        if health.get("fingerprint") != entry.fingerprint:
            return "health_failed", (
                f"/health answered fingerprint {health.get('fingerprint')}, "
                f"recorded {entry.fingerprint}"
            )
        return None, ""

    def _claim_abandoned(self, claim: Claim) -> bool:
        if claim_expired(claim, datetime.now(UTC)):
            return True
        if claim.host != self.host:
            return False
        return process_state(claim.claimant_pid, claim.claimant_started_at) != "alive"

    # --- acting ----------------------------------------------------------------------------

    def _spawn(
        self, spec: WorkerSpec, claim_id: str, ids: dict[str, Any], force_new: bool
    ) -> Acquired:
        instance_id = f"{spec.worker_id}-{uuid.uuid4().hex[:12]}"
        try:
            proc, url = self._launch(spec, instance_id)
        except SpawnError as exc:
            self._record(WorkerSpawnFailed(**ids, claim_id=claim_id, error=str(exc)))
            raise
        self._children[instance_id] = proc
        self.started_here.add(instance_id)
        spawned = WorkerSpawned(
            **ids,
            claim_id=claim_id,
            instance_id=instance_id,
            backend="server",
            host=self.host,
            pid=proc.pid,
            pid_started_at=start_time(proc.pid),
            url=url,
            fingerprint=spec.fingerprint,
            model=spec.model,
            model_policy=spec.model_policy,
        )
        self._record(spawned, WorkerReady(**ids, instance_id=instance_id))
        entry = self.registry.refresh().entries[instance_id]
        why = "force_new requested" if force_new else "no running process matched"
        return Acquired(
            entry, False, f"spawned {instance_id}: {why} (fingerprint {spec.fingerprint})"
        )

    def _launch(self, spec: WorkerSpec, instance_id: str) -> tuple[subprocess.Popen[bytes], str]:
        worker_spec = {
            "worker_id": spec.worker_id,
            "instance_id": instance_id,
            "fingerprint": spec.fingerprint,
            "model": spec.model,
            "model_policy": spec.model_policy,
            "system_prompt": spec.system_prompt,
            "idle_timeout": spec.idle_timeout,
            "config": spec.config.model_dump(mode="json"),
        }
        env = dict(os.environ)
        env[SPEC_ENV] = json.dumps(worker_spec)
        env[TOKEN_ENV] = worker_token(instance_id)
        logs = state_dir() / "workers"
        logs.mkdir(mode=0o700, exist_ok=True)
        log_fd = os.open(logs / f"{instance_id}.log", os.O_CREAT | os.O_WRONLY, 0o600)
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
            _kill(proc)
            raise SpawnError(
                f'worker "{spec.worker_id}" (pid {proc.pid}) did not print READY within '
                f"{READY_TIMEOUT:.0f}s; see {logs / (instance_id + '.log')}"
            )
        return proc, str(json.loads(line[len("READY ") :])["url"])

    def _record(self, *events: Event) -> None:
        self.registry.append(list(events))

    def mark_exited(self, entry: RegistryEntry, ids: dict[str, Any], detail: str) -> None:
        """Record that a process was found dead."""
        self._reap(entry.instance_id)
        self._record(WorkerExited(**ids, instance_id=entry.instance_id, detail=detail))

    def live_entries(self, worker_id: str | None = None) -> list[RegistryEntry]:
        """Processes on this host recorded as running (optionally of one worker id)."""
        state = self.registry.refresh()
        return [
            e
            for e in state.entries.values()
            if e.live and e.host == self.host and worker_id in (None, e.worker_id)
        ]

    def stop(self, entry: RegistryEntry, ids: dict[str, Any], reason: str = "requested") -> bool:
        """Ask a process to shut down, make sure it is gone, and record it. Returns False
        (and records `WorkerExited`) when it had already died."""
        if process_state(entry.pid, entry.pid_started_at) != "alive":
            self.mark_exited(entry, ids, "found dead when asked to stop")
            return False
        with contextlib.suppress(WorkerUnreachable, WorkerReplyError):
            worker_call(str(entry.url), entry.instance_id, "POST", "/shutdown", timeout=2.0)
        self._wait_gone(entry)
        self._reap(entry.instance_id)
        self._record(WorkerStopped(**ids, instance_id=entry.instance_id, reason=reason))
        return True

    def _wait_gone(self, entry: RegistryEntry) -> None:
        child = self._children.get(entry.instance_id)
        try:
            if child is not None:
                child.wait(timeout=5)
                return
            psutil.Process(entry.pid).wait(timeout=5)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            if process_state(entry.pid, entry.pid_started_at) == "alive":
                psutil.Process(entry.pid).kill()
        except psutil.NoSuchProcess:
            return

    def _reap(self, instance_id: str) -> None:
        child = self._children.pop(instance_id, None)
        if child is not None:
            child.poll()

    def reap_children(self) -> None:
        """Collect exit statuses of our children that ended (no zombies left behind)."""
        for instance_id, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[instance_id]


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


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=5)


def _reuse_reason(entry: RegistryEntry) -> str:
    return (
        f"reused {entry.instance_id} (pid {entry.pid}): fingerprint {entry.fingerprint} "
        "matches, pid start time matches, /health confirmed"
    )


def _static_detail(reason: RejectReason, entry: RegistryEntry, request: Request) -> str:
    if reason == "model_mismatch":
        return f"runs {entry.model}, requested {request.model}"
    if reason == "policy_mismatch":
        return f"runs with policy {entry.model_policy}, requested {request.model_policy}"
    if reason == "other_host":
        return f"runs on host {entry.host}, this is {request.host}"
    if reason == "force_new":
        return "force_new requested"
    return f"fingerprint {entry.fingerprint} differs from requested {request.fingerprint}"
