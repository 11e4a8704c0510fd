"""The I/O of managed model servers (`ModelServers`): probing, launching, polling the ready
path, leasing and stopping, over the shared registry.

A request in flight holds a shared `flock` on the server's `inflight.lock` for as long as it
runs; an eviction, an idle stop or `stop` takes the lock exclusively (non-blocking for an
eviction or idle stop), so nothing stops a server that serves a request, across threads and
processes, and a lock whose holder dies is released by the kernel. The mtime of `used` is the
server's last use; the file `exit` says why it ended.

It stays one module over 400 lines because `ModelServers` is one class whose acquiring,
starting, probing and stopping share its state (the registry lock and claim fencing, the
supervisors it launched, the servers proven healthy); what needs none of that lives beside
it (`decision`, `spec`, `launch`, `files`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from events.catalogue import (
    REGISTRY_STREAM,
    Event,
    ModelServerReady,
    ModelServerReused,
    ModelServerStarted,
    ModelServerStartFailed,
    ModelServerStartRequested,
    ModelServerStopped,
    StopReason,
)
from events.projections import ModelServerEntry, RegistryState, ServerClaim
from events.store import EventLog, StreamConflict
from events.streams import StreamView
from orchestrator.config import OrchestratorConfig
from orchestrator.model_servers.decision import (
    CLAIM_MARGIN,
    ServerPlan,
    ServerProbe,
    ServerRequest,
    candidates,
    gone_event,
    plan,
    room,
)
from orchestrator.model_servers.files import (
    exit_marker,
    first_line,
    free_port,
    is_busy,
    lock_exclusive,
    mtime,
    open_inflight,
    ready_probe,
    touch,
    try_lock,
    write_exit,
)
from orchestrator.model_servers.launch import launch, stop_launched, wait_ready
from orchestrator.model_servers.spec import ModelServerError, ServerSpec, server_spec
from orchestrator.processes import (
    ProcessState,
    host_id,
    own_identity,
    process_state,
    start_time,
    terminate,
)
from orchestrator.providers import split_model

WAIT_POLL = 0.05
# How long a start waits for a busy server to become evictable before it fails.
ROOM_WAIT = 60.0
# A server whose ready path answered this recently is trusted on its pid and start time.
PROOF_LEASE = 30.0
HEALTH_TIMEOUT = 5.0


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


class ModelServers:
    """The managed model servers of one orchestrator, backed by the shared registry."""

    def __init__(
        self,
        log: EventLog,
        registry: StreamView[RegistryState],
        config: OrchestratorConfig,
        run_dir: Callable[[], Path],
    ) -> None:
        self.log = log
        self.registry = registry
        self.config = config
        self.host = host_id()
        self._run_dir = run_dir
        self._specs: dict[str, ServerSpec | None] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._proven: dict[str, float] = {}
        self._deferred: dict[str, list[Event]] = {}
        self._lock = threading.Lock()
        self.started_here: set[str] = set()

    # --- what a model needs ----------------------------------------------------------------

    def spec(self, model: str) -> ServerSpec | None:
        """The server `model` is served by, or None when its provider is not managed."""
        if model not in self._specs:
            self._specs[model] = server_spec(self.config, model)
        return self._specs[model]

    def take_deferred(self, task_id: str) -> list[Event]:
        """Registry facts of a task recorded with its end (a plain reuse)."""
        with self._lock:
            return self._deferred.pop(task_id, [])

    # --- getting a server ------------------------------------------------------------------

    def acquire(self, model: str, ids: dict[str, Any]) -> ServerLease | None:
        """The server of a managed `model`, reused or started (None if not managed), held
        until the lease is released. Raises `ModelServerError` when it cannot start."""
        spec = self.spec(model)
        if spec is None:
            return None
        request = ServerRequest(
            model=spec.model,
            fingerprint=spec.fingerprint,
            host=self.host,
            memory_mb=spec.memory_mb,
            start_timeout=spec.start_timeout,
            identity=spec.identity,
        )
        deadline = time.monotonic() + spec.start_timeout + CLAIM_MARGIN + ROOM_WAIT
        probes: dict[str, ServerProbe] = {}
        while True:
            with self.registry.lock:
                state = self.registry.state
                looked = [s.model_copy() for s in candidates(state, request)]
                claims = [c.model_copy() for c in state.server_claims.values()]
            probes.update(self._probe_all(looked, probes))
            decided = self._decide(request, ids, probes, self._claimants(claims))
            if decided is None:
                continue
            if decided.reuse is not None:
                lease = self._lease(decided.reuse, started=False)
                if lease is None:  # stopped between the decision and the lock: look again
                    probes.clear()
                    time.sleep(WAIT_POLL / 5)
                    continue
                self._defer(ids, decided.events)
                return lease
            if decided.claim_id is not None:
                lease = self._start(spec, request, decided.claim_id, ids)
                if lease is not None:
                    return lease
                probes.clear()  # fenced: our claim was taken over; look again
                continue
            if time.monotonic() > deadline:
                raise ModelServerError(
                    f"Timed out waiting for another process to start the model server of "
                    f"{spec.model}."
                )
            time.sleep(WAIT_POLL)
            probes.clear()

    def warm(self, model: str, ids: dict[str, Any]) -> ServerLease | None:
        """Start (or find) a managed model's server now and let go of it at once."""
        lease = self.acquire(model, ids)
        if lease is not None:
            lease.release()
            self._flush(ids)
        return lease

    def _defer(self, ids: Mapping[str, Any], events: list[Event]) -> None:
        task_id = ids.get("task_id")
        only_reuse = all(isinstance(e, ModelServerReused) for e in events)
        if task_id and only_reuse:
            with self._lock:
                self._deferred.setdefault(str(task_id), []).extend(events)
        elif events:
            self.registry.append(events)

    def _flush(self, ids: Mapping[str, Any]) -> None:
        if ids.get("task_id"):
            found = self.take_deferred(str(ids["task_id"]))
            if found:
                self.registry.append(found)

    def _decide(
        self,
        request: ServerRequest,
        ids: dict[str, Any],
        probes: dict[str, ServerProbe],
        claimants: dict[str, ProcessState],
    ) -> ServerPlan | None:
        """One decision under the registry lock, appended at the version it was made on.
        None when it must be made again (a conflict, or a server not probed yet). A plain
        reuse appends nothing here: it is recorded with the task's end."""
        with self.registry.lock:
            state = self.registry.refresh()
            version = self.registry.version
            decided = plan(state, request, probes, claimants, datetime.now(UTC), ids)
            if decided.unprobed:
                return None
            if decided.start:
                pid, started = own_identity()
                decided.claim_id = uuid.uuid4().hex
                decided.events.append(
                    ModelServerStartRequested(
                        **ids,
                        claim_id=decided.claim_id,
                        fingerprint=request.fingerprint,
                        model=request.model,
                        host=self.host,
                        claimant_pid=pid,
                        claimant_started_at=started,
                        start_timeout=request.start_timeout,
                    )
                )
            now = decided.events
            if decided.reuse is not None:  # the reuse itself is deferred; the rest is not
                now = decided.events[:-1]
                decided.events = decided.events[-1:]
            if now:
                try:
                    self.log.append(REGISTRY_STREAM, now, version)
                except StreamConflict:
                    return None
            return decided

    def _claimants(self, claims: Iterable[ServerClaim]) -> dict[str, ProcessState]:
        return {
            c.claim_id: process_state(c.claimant_pid, c.claimant_started_at)
            for c in claims
            if c.host == self.host
        }

    # --- probing -----------------------------------------------------------------------------

    def _probe_all(
        self, servers: Iterable[ModelServerEntry], known: Mapping[str, ServerProbe]
    ) -> dict[str, ServerProbe]:
        return {s.instance_id: self.probe(s) for s in servers if s.instance_id not in known}

    def probe(self, server: ModelServerEntry, health: bool = True) -> ServerProbe:
        """Is the server's process alive, busy, and (unless proven recently or busy) does
        its ready path answer? One that is ours and does not answer is stopped here."""
        directory = Path(server.log_path).parent
        proc = process_state(server.pid, server.pid_started_at)
        if proc != "alive":
            reason, status = self._last_word(server, directory)
            return ServerProbe(proc, exit_reason=reason, exit_status=status)
        busy = is_busy(directory)
        last_used = mtime(directory / "used")
        proven = self._proven.get(server.instance_id)
        if busy or not health or (proven is not None and time.monotonic() - proven < PROOF_LEASE):
            return ServerProbe("alive", busy=busy, last_used=last_used)
        ready_path = str(server.identity.get("ready_path", "/v1/models"))
        problem = ready_probe(server.port, ready_path, HEALTH_TIMEOUT)
        if problem is None:
            self._proven[server.instance_id] = time.monotonic()
            return ServerProbe("alive", busy=busy, last_used=last_used, healthy=True)
        detail = f"GET {ready_path} on port {server.port}: {problem}"
        killed = self._kill(server)
        return ServerProbe("alive", healthy=False, detail=detail, killed=killed)

    def _last_word(
        self, server: ModelServerEntry, directory: Path
    ) -> tuple[str | None, int | None]:
        """Why a server that is gone ended, as its supervisor wrote it: the supervisor
        reaps the server, then writes, so a supervisor still running gets a moment."""
        deadline = time.monotonic() + 1.0
        while True:
            reason, status = exit_marker(directory)
            sup = process_state(server.supervisor_pid, server.supervisor_started_at)
            if reason is not None or sup != "alive" or time.monotonic() > deadline:
                self._reap(server.instance_id)
                return reason, status
            time.sleep(0.02)

    # --- leasing -----------------------------------------------------------------------------

    def _lease(self, server: ModelServerEntry, started: bool) -> ServerLease | None:
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
        if (directory / "exit").exists() or process_state(
            server.pid, server.pid_started_at
        ) != "alive":
            os.close(fd)
            return None
        touch(directory / "used")
        return ServerLease(
            server,
            fd,
            started,
            lambda: self._proven.__setitem__(server.instance_id, time.monotonic()),
        )

    # --- starting ----------------------------------------------------------------------------

    def _start(
        self, spec: ServerSpec, request: ServerRequest, claim_id: str, ids: dict[str, Any]
    ) -> ServerLease | None:
        """Make room, launch, register while the claim stands, wait until ready. None when
        the claim was taken over meanwhile (its late server is stopped)."""
        provider, name = split_model(spec.model)
        instance_id = f"{provider}-{_slug(name)}-{uuid.uuid4().hex[:10]}"
        directory = self._run_dir() / instance_id
        launched: tuple[subprocess.Popen[bytes], int, float] | None = None
        try:
            self._make_room(request, claim_id, ids)
            directory.mkdir(mode=0o700)
            log_path = directory / "server.log"
            port = free_port()
            began = time.monotonic()
            launched = launch(spec, directory, log_path, port, self.config.pool.idle_timeout)
            sup, pid, pid_started = launched
            url = f"http://127.0.0.1:{port}/v1"
            started_event = ModelServerStarted(
                **ids,
                claim_id=claim_id,
                instance_id=instance_id,
                model=spec.model,
                host=self.host,
                pid=pid,
                pid_started_at=pid_started,
                supervisor_pid=sup.pid,
                supervisor_started_at=start_time(sup.pid),
                port=port,
                url=url,
                fingerprint=spec.fingerprint,
                identity=dict(spec.identity),
                command=spec.argv(port),
                memory_mb=spec.memory_mb,
                log_path=str(log_path),
                idle_timeout=self.config.pool.idle_timeout,
            )
            self._children[instance_id] = sup
            if not self._fenced(claim_id, [started_event]):
                stop_launched(sup, directory, pid, pid_started)
                return None
            wait_ready(spec, sup, directory, log_path, port, began)
            ready = ModelServerReady(
                **ids,
                claim_id=claim_id,
                instance_id=instance_id,
                ready_seconds=round(time.monotonic() - began, 4),
            )
            touch(directory / "used")
            (directory / "adopted").touch(mode=0o600)  # the supervisor stops watching us
            if not self._fenced(claim_id, [ready]):
                stop_launched(sup, directory, pid, pid_started)
                return None
        except ModelServerError as exc:
            self._end_claim(claim_id, ids, exc, launched, directory, instance_id)
            raise
        except Exception as exc:
            error = ModelServerError(
                f"cannot start the model server of {spec.model}: {first_line(exc)}"
            )
            self._end_claim(claim_id, ids, error, launched, directory, instance_id)
            raise error from exc
        self.started_here.add(instance_id)
        entry = self.registry.refresh().servers[instance_id]
        lease = self._lease(entry, started=True)
        if lease is None:
            raise ModelServerError(
                f"the model server {instance_id} of {spec.model} was stopped as soon as it "
                "was ready; run the task again"
            )
        return lease

    def _fenced(self, claim_id: str, events: list[Event]) -> bool:
        """Append only while our claim is still open."""
        while True:
            with self.registry.lock:
                state = self.registry.refresh()
                if claim_id not in state.server_claims:
                    return False
                try:
                    self.log.append(REGISTRY_STREAM, events, self.registry.version)
                except StreamConflict:
                    continue
                return True

    def _end_claim(
        self,
        claim_id: str,
        ids: dict[str, Any],
        error: ModelServerError,
        launched: tuple[subprocess.Popen[bytes], int, float] | None,
        directory: Path,
        instance_id: str,
    ) -> None:
        """End our claim failed; whatever we launched for it is stopped first."""
        status = None
        if launched is not None:
            sup, pid, pid_started = launched
            status = stop_launched(sup, directory, pid, pid_started)
        failed = ModelServerStartFailed(
            **ids,
            claim_id=claim_id,
            error=str(error),
            instance_id=instance_id if launched is not None else None,
            exit_status=error.exit_status if error.exit_status is not None else status,
            stopped=error.stopped,
        )
        with self.registry.lock:
            if claim_id in self.registry.refresh().server_claims:
                self.registry.append([failed])

    def _make_room(self, request: ServerRequest, claim_id: str, ids: dict[str, Any]) -> None:
        """Stop the least recently used idle servers until the start fits; wait while the
        servers that would have to go are busy or starting."""
        deadline = time.monotonic() + ROOM_WAIT
        pool = self.config.pool
        while True:
            state = self.registry.refresh()
            live = [
                s.model_copy() for s in state.servers.values() if s.host == self.host and s.live
            ]
            probes = {s.instance_id: self.probe(s, health=False) for s in live}
            decided = room(state, request, probes, pool.max_model_servers, pool.memory_mb, claim_id)
            if decided.impossible:
                raise ModelServerError(f"cannot start the model server: {decided.impossible}")
            for server in decided.gone:
                self._record_gone(server, probes[server.instance_id], ids)
            if decided.wait is None and all(
                self.stop(s, ids, "evicted", _evict_detail(s, request), wait=False)
                for s in decided.evict
            ):
                return
            if time.monotonic() > deadline:
                raise ModelServerError(
                    f"cannot start the model server of {request.model}: "
                    f"{decided.wait or 'the servers to evict stayed busy'} for "
                    f"{ROOM_WAIT:g} s; try again, or raise [pool] max_model_servers"
                )
            time.sleep(0.1)

    # --- stopping and finding the dead ------------------------------------------------------

    def _record_gone(
        self, server: ModelServerEntry, probe: ServerProbe, ids: Mapping[str, Any]
    ) -> None:
        with self.registry.lock:
            now = self.registry.refresh().servers.get(server.instance_id)
            if now is not None and now.live:
                self.registry.append([gone_event(now, probe, ids)])

    def stop(
        self,
        server: ModelServerEntry,
        ids: Mapping[str, Any],
        reason: StopReason = "requested",
        detail: str = "",
        wait: bool = True,
    ) -> bool:
        """Stop a server and record it. With `wait=False` (an eviction) a server with a
        request in flight is left alone and False returned; otherwise its requests get up to
        a few seconds to finish before it is stopped anyway. True when it is gone (a server
        found dead is recorded exited)."""
        directory = Path(server.log_path).parent
        self._proven.pop(server.instance_id, None)
        fd = open_inflight(directory)
        try:
            if not lock_exclusive(fd, 0.0 if not wait else 5.0) and not wait:
                return False
            if process_state(server.pid, server.pid_started_at) != "alive":
                reason_left, status = self._last_word(server, directory)
                probe = ServerProbe("gone", exit_reason=reason_left, exit_status=status)
                self._record_gone(server, probe, ids)
                return True
            write_exit(directory, reason, detail)
            self._terminate(server)
        finally:
            os.close(fd)
        with self.registry.lock:
            now = self.registry.refresh().servers.get(server.instance_id)
            if now is not None and now.live:
                self.registry.append(
                    [
                        ModelServerStopped(
                            **ids, instance_id=server.instance_id, reason=reason, detail=detail
                        )
                    ]
                )
        return True

    def _terminate(self, server: ModelServerEntry) -> None:
        """The supervisor stops the server's group; then make sure both are gone."""
        child = self._children.get(server.instance_id)
        if process_state(server.supervisor_pid, server.supervisor_started_at) == "alive":
            terminate(server.supervisor_pid, server.supervisor_started_at, timeout=15.0)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        terminate(server.pid, server.pid_started_at)
        self._reap(server.instance_id)

    def _kill(self, server: ModelServerEntry) -> bool:
        directory = Path(server.log_path).parent
        write_exit(directory, "unhealthy", "its ready path did not answer")
        self._terminate(server)
        return process_state(server.pid, server.pid_started_at) != "alive"

    def stoppable(self) -> list[ModelServerEntry]:
        """Servers of this host recorded running or whose process still runs."""
        state = self.registry.refresh()
        return [
            s
            for s in state.servers.values()
            if s.host == self.host and (s.live or process_state(s.pid, s.pid_started_at) == "alive")
        ]

    def stop_matching(
        self, which: str | None, ids: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """Stop this host's servers named by instance id or `provider/model` (every one
        when `which` is None), whatever their recorded status: (stopped, already gone)."""
        stopped: list[str] = []
        gone: list[str] = []
        for server in self.stoppable():
            if which is None or which in (server.instance_id, server.model):
                alive = process_state(server.pid, server.pid_started_at) == "alive"
                self.stop(server, ids)
                (stopped if alive else gone).append(server.instance_id)
        return stopped, gone

    def sweep(self, ids: Mapping[str, Any]) -> None:
        """Record what became of this host's servers that look live: found dead, or
        stopped by their supervisor (idle). The registry tells the truth when read."""
        for server in self.stoppable():
            claim = self.registry.state.server_claims.get(server.claim_id or "")
            if claim is not None and self._claimants([claim]).get(claim.claim_id) == "alive":
                continue  # starting, and its starter is on it
            probe = self.probe(server, health=False)
            if probe.process != "alive":
                self._record_gone(server, probe, ids)

    def _reap(self, instance_id: str) -> None:
        child = self._children.get(instance_id)
        if child is not None and child.poll() is not None:
            del self._children[instance_id]

    def reap_children(self) -> None:
        """Collect the exit statuses of supervisors that ended (no zombies)."""
        for instance_id in list(self._children):
            self._reap(instance_id)

    def abandon(self) -> None:
        """Stop every server this orchestrator started, recording nothing (the store is
        gone: no one could ever find them)."""
        for child in list(self._children.values()):
            with contextlib.suppress(OSError):
                child.terminate()
        for instance_id, child in list(self._children.items()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=15)
            del self._children[instance_id]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:40].strip("-.") or "model"


def _evict_detail(server: ModelServerEntry, request: ServerRequest) -> str:
    return f"least recently used idle model server; room for {request.model}"
