"""Getting a managed model server (`ModelServers`): reuse a ready one, wait for one being
started, or claim a start and make room, launch, register it while the claim stands and wait
until it is ready; then hold it for the request (`lease`).

A request in flight holds a shared `flock` on the server's `inflight.lock` for as long as it
runs; an eviction, an idle stop or `stop` takes the lock exclusively (non-blocking for an
eviction or idle stop), so nothing stops a server that serves a request, across threads and
processes, and a lock whose holder dies is released by the kernel. The mtime of `used` is the
server's last use; the file `exit` says why it ended. Probing and stopping the servers the
registry records are `running.RunningServers`'; the registry's write protocol is shared with
the worker pool (`orchestrator.backends.registry_writes`).
"""

from __future__ import annotations

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
    Event,
    ModelServerReady,
    ModelServerReused,
    ModelServerStarted,
    ModelServerStartFailed,
    ModelServerStartRequested,
)
from events.projections import ModelServerEntry, RegistryState
from events.store import EventLog
from events.streams import StreamView
from orchestrator.config import OrchestratorConfig
from orchestrator.model_servers.decision import (
    CLAIM_MARGIN,
    ServerPlan,
    ServerProbe,
    ServerRequest,
    candidates,
    plan,
    room,
)
from orchestrator.model_servers.files import first_line, free_port, touch
from orchestrator.model_servers.launch import launch, stop_launched, wait_ready
from orchestrator.model_servers.lease import ServerLease, take_lease
from orchestrator.model_servers.running import RunningServers
from orchestrator.model_servers.spec import ModelServerError, ServerSpec, server_spec
from orchestrator.processes import ProcessState, start_time
from orchestrator.providers import split_model

WAIT_POLL = 0.05
# How long a start waits for a busy server to become evictable before it fails.
ROOM_WAIT = 60.0


class ModelServers(RunningServers):
    """The managed model servers of one orchestrator, backed by the shared registry."""

    def __init__(
        self,
        log: EventLog,
        registry: StreamView[RegistryState],
        config: OrchestratorConfig,
        run_dir: Callable[[], Path],
    ) -> None:
        super().__init__(log, registry, config, run_dir)
        self._specs: dict[str, ServerSpec | None] = {}
        self._deferred: dict[str, list[Event]] = {}
        self._lock = threading.Lock()

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
            decided = self._decide(request, ids, probes, self.writes.claimants(claims))
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

        def make(state: RegistryState) -> tuple[ServerPlan, list[Event]] | None:
            decided = plan(state, request, probes, claimants, datetime.now(UTC), ids)
            if decided.unprobed:
                return None
            if decided.start:
                claim = self.writes.claim()
                decided.claim_id = claim["claim_id"]
                decided.events.append(
                    ModelServerStartRequested(
                        **ids,
                        **claim,
                        fingerprint=request.fingerprint,
                        model=request.model,
                        start_timeout=request.start_timeout,
                    )
                )
            now = decided.events
            if decided.reuse is not None:  # the reuse itself is deferred; the rest is not
                now = decided.events[:-1]
                decided.events = decided.events[-1:]
            return decided, now

        return self.writes.decide(make)

    def _probe_all(
        self, servers: Iterable[ModelServerEntry], known: Mapping[str, ServerProbe]
    ) -> dict[str, ServerProbe]:
        return {s.instance_id: self.probe(s) for s in servers if s.instance_id not in known}

    def _lease(self, server: ModelServerEntry, started: bool) -> ServerLease | None:
        """Hold the server for one request (`lease.take_lease`); None when it is being
        stopped or is gone. Its release counts as proof that it answers."""
        return take_lease(server, started, lambda: self.proofs.prove(server.instance_id))

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
            self.launcher.keep(instance_id, sup)  # abandoned with the rest, if need be
            if not self.writes.fenced(claim_id, [started_event]):
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
            if not self.writes.fenced(claim_id, [ready]):
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
        self.writes.fenced(claim_id, [failed])  # ends our claim, unless taken over

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


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:40].strip("-.") or "model"


def _evict_detail(server: ModelServerEntry, request: ServerRequest) -> str:
    return f"least recently used idle model server; room for {request.model}"
