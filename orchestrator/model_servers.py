"""Managed model servers (ADR-0012): one server process per model of a managed provider,
started on first use, reused by every worker, session and orchestrator process of the host.

Two parts, like the worker pool:

- the decision, pure (`plan`, `room`): a function of the registry state, the request and
  what probes said about each server (alive, busy, last used), as `orchestrator.reuse` is
  for worker processes;
- the I/O (`ModelServers`): probing, launching through the supervisor
  (`model_server_supervisor.py`), polling the ready path, leasing and stopping.

A request in flight holds a shared `flock` on the server's `inflight.lock` for as long as it
runs; an eviction, an idle stop or `stop` takes the lock exclusively (non-blocking for an
eviction or idle stop), so nothing stops a server that serves a request, across threads and
processes, and a lock whose holder dies is released by the kernel. The mtime of `used` is the
server's last use; the file `exit` says why it ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from events.catalogue import (
    REGISTRY_STREAM,
    Event,
    ModelServerExited,
    ModelServerReady,
    ModelServerReused,
    ModelServerReuseRejected,
    ModelServerStarted,
    ModelServerStartFailed,
    ModelServerStartRequested,
    ModelServerStopped,
    StopReason,
)
from events.projections import ModelServerEntry, RegistryState, ServerClaim
from events.store import EventLog, StreamConflict
from events.streams import StreamView
from orchestrator.backends import TaskError
from orchestrator.config import (
    ConfigError,
    OrchestratorConfig,
    model_values,
    server_problems,
)
from orchestrator.fingerprint import identity_diff
from orchestrator.processes import (
    ProcessState,
    host_id,
    own_identity,
    process_state,
    start_time,
    terminate,
    worker_environment,
)
from orchestrator.providers import split_model

SUPERVISOR = Path(__file__).with_name("model_server_supervisor.py")
# A claim outlives its start_timeout by this much only when its claimant is gone.
CLAIM_MARGIN = 30.0
WAIT_POLL = 0.05
# How long a start waits for a busy server to become evictable before it fails.
ROOM_WAIT = 60.0
# A server whose ready path answered this recently is trusted on its pid and start time.
PROOF_LEASE = 30.0
HEALTH_TIMEOUT = 5.0
LOG_TAIL = 10


class ModelServerError(TaskError):
    """A managed model server could not be started or used; the message says why, with
    its exit status and last log lines when it failed to start."""

    def __init__(self, message: str, exit_status: int | None = None, stopped: bool = False):
        super().__init__(message)
        self.exit_status = exit_status
        self.stopped = stopped


# --- what a server is --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """Everything needed to start (or recognise) the server of one managed model."""

    model: str  # provider/model
    command: tuple[str, ...]  # `{port}` left in place
    env: tuple[tuple[str, str], ...]
    ready_path: str
    start_timeout: float
    memory_mb: int
    identity: Mapping[str, Any]
    fingerprint: str

    def argv(self, port: int) -> list[str]:
        """The command with its port."""
        return [w.replace("{port}", str(port)) for w in self.command]

    def environ(self, port: int) -> dict[str, str]:
        """The extra environment with its port."""
        return {k: v.replace("{port}", str(port)) for k, v in self.env}


def _substitute(word: str, values: Mapping[str, str]) -> str:
    # Every placeholder but `{port}` (known only at start), `{{`/`}}` made literal.
    out = []
    for literal, name, _, _ in string.Formatter().parse(word):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            out.append("{port}" if name == "port" else values[name].replace("{", "{{"))
    return "".join(out).replace("{{", "{").replace("}}", "}")


def server_spec(config: OrchestratorConfig, model: str) -> ServerSpec | None:
    """The server a `provider/model` is served by, or None when its provider is not
    managed. Raises `ConfigError` for a configuration built in code whose command is bad
    (a file or dict is checked at load)."""
    provider_id, name = split_model(model)
    provider = config.providers.get(provider_id)
    if provider is None or provider.server is None or name not in provider.models:
        return None
    problems = server_problems(config)
    if problems:
        raise ConfigError("config: " + problems[0])
    server = provider.server
    values = model_values(provider_id, name, provider.models[name])
    command = tuple(_substitute(w, values) for w in server.command)
    env = tuple(sorted((k, _substitute(v, values)) for k, v in server.env.items()))
    ident = {
        "model": model,
        "command": list(command),
        "env": dict(env),
        "ready_path": server.ready_path,
        "provider": {
            "id": provider_id,
            "kind": provider.kind,
            "api_key_env": provider.api_key_env,
            "timeout": provider.timeout,
            "max_retries": provider.max_retries,
        },
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ServerSpec(
        model=model,
        command=command,
        env=env,
        ready_path=server.ready_path,
        start_timeout=server.start_timeout,
        memory_mb=provider.models[name].memory_mb,
        identity=ident,
        fingerprint=f"ms-{digest[:16]}",
    )


def managed_commands(config: OrchestratorConfig) -> list[str]:
    """One line per managed model: the command its server would run (`config check`)."""
    lines = []
    for provider_id, provider in config.providers.items():
        if provider.server is None:
            continue
        for name in provider.models:
            spec = server_spec(config, f"{provider_id}/{name}")
            assert spec is not None
            shown = " ".join(_quote(w) for w in spec.command)
            lines.append(f"server {spec.model}: {shown} (ready: GET {spec.ready_path})")
    return lines


def _quote(word: str) -> str:
    return word if word and not re.search(r"[\s'\"\\$`]", word) else json.dumps(word)


# --- the decision (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerRequest:
    """What a caller asks for: the server of one model with one fingerprint, on a host."""

    model: str
    fingerprint: str
    host: str
    memory_mb: int = 0
    start_timeout: float = 300.0
    identity: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerProbe:
    """What the outside world said about one server just now."""

    process: ProcessState
    busy: bool = False  # a request holds its in-flight lock
    last_used: float | None = None  # epoch seconds of its last use
    healthy: bool | None = None  # None: not asked (gone, busy, or proven recently)
    detail: str = ""
    exit_reason: str | None = None  # what its supervisor left in `exit`
    exit_status: int | None = None
    killed: bool = False  # ours, alive and not answering: it has been stopped


@dataclass
class ServerPlan:
    """The decision: events to append at the registry version it was made on, and what
    to do: reuse a server, wait for another's claim, or start one."""

    events: list[Event] = field(default_factory=list)
    reuse: ModelServerEntry | None = None
    wait_for: ServerClaim | None = None
    start: bool = False
    unprobed: list[str] = field(default_factory=list)
    claim_id: str | None = None  # set by the I/O part: the claim it appended


def candidates(state: RegistryState, request: ServerRequest) -> list[ModelServerEntry]:
    """Servers of the requested model on the host recorded ready, newest first."""
    rows = [
        s
        for s in state.servers.values()
        if s.model == request.model and s.host == request.host and s.status == "ready"
    ]
    return sorted(rows, key=lambda s: s.started_at, reverse=True)


def plan(
    state: RegistryState,
    request: ServerRequest,
    probes: Mapping[str, ServerProbe],
    claimants: Mapping[str, ProcessState],
    now: datetime,
    ids: Mapping[str, Any],
) -> ServerPlan:
    """Decide one request. `probes` are keyed by instance id, `claimants` by claim id (the
    state of a same-host claimant's process). Servers that need a probe and have none are
    listed in `unprobed`, and nothing else is decided."""
    out = ServerPlan()
    found = candidates(state, request)
    out.unprobed = [s.instance_id for s in found if s.instance_id not in probes]
    if out.unprobed:
        return out
    for server in found:
        probe = probes[server.instance_id]
        if probe.process != "alive" or probe.killed:
            out.events.append(gone_event(server, probe, ids))
            continue
        if server.fingerprint != request.fingerprint:
            if request.fingerprint not in server.rejected_for:
                diff = identity_diff(server.identity, dict(request.identity))
                out.events.append(
                    ModelServerReuseRejected(
                        **ids,
                        instance_id=server.instance_id,
                        reason="provider_mismatch",
                        detail=diff or "another fingerprint",
                        fingerprint=server.fingerprint,
                        requested_fingerprint=request.fingerprint,
                    )
                )
            continue
        out.events.append(
            ModelServerReused(**ids, instance_id=server.instance_id, fingerprint=server.fingerprint)
        )
        out.reuse = server
        return out
    claim = pending_claim(state, request)
    if claim is not None and not claim_abandoned(claim, claimants, request.host, now):
        out.wait_for = claim
        return out
    if claim is not None:
        out.events.append(
            ModelServerStartFailed(
                **ids,
                claim_id=claim.claim_id,
                instance_id=claim.instance_id,
                error=f"claimant pid {claim.claimant_pid} died or gave up before the server "
                "was ready; this request takes the start over",
            )
        )
    out.start = True
    return out


def gone_event(server: ModelServerEntry, probe: ServerProbe, ids: Mapping[str, Any]) -> Event:
    """What became of a server found unusable: stopped on purpose (idle, unhealthy), or
    found dead."""
    iid = server.instance_id
    if probe.killed:
        return ModelServerStopped(**ids, instance_id=iid, reason="unhealthy", detail=probe.detail)
    if probe.exit_reason == "idle":
        return ModelServerStopped(
            **ids, instance_id=iid, reason="idle", detail="stopped by its supervisor"
        )
    if probe.process == "recycled":
        detail = f"pid {server.pid} now belongs to another process"
    elif probe.exit_status is not None:
        detail = f"pid {server.pid} exited with status {probe.exit_status}"
    else:
        detail = f"pid {server.pid} no longer exists"
    if probe.exit_reason and probe.exit_reason != "exited":
        detail += f" ({probe.exit_reason})"
    return ModelServerExited(**ids, instance_id=iid, detail=detail, exit_status=probe.exit_status)


def pending_claim(state: RegistryState, request: ServerRequest) -> ServerClaim | None:
    """An open claim that will produce the server this request wants, if any."""
    for claim in state.server_claims.values():
        if claim.fingerprint == request.fingerprint and claim.host == request.host:
            return claim
    return None


def claim_abandoned(
    claim: ServerClaim, claimants: Mapping[str, ProcessState], host: str, now: datetime
) -> bool:
    """A claim older than its start may take is abandoned wherever its claimant runs; on
    this host, so is one whose claimant process is gone."""
    if now - claim.claimed_at > timedelta(seconds=claim.start_timeout + CLAIM_MARGIN):
        return True
    return claim.host == host and claimants.get(claim.claim_id, "alive") != "alive"


@dataclass(frozen=True)
class Room:
    """Whether a start fits: the idle servers to evict first (least recently used first),
    or why it must wait (every candidate busy or starting) or cannot ever fit."""

    evict: list[ModelServerEntry] = field(default_factory=list)
    wait: str | None = None
    impossible: str | None = None
    gone: list[ModelServerEntry] = field(default_factory=list)  # found dead meanwhile


def room(
    state: RegistryState,
    request: ServerRequest,
    probes: Mapping[str, ServerProbe],
    max_servers: int,
    memory_limit: int | None,
    claim_id: str | None = None,
) -> Room:
    """Which servers a start of `request` must evict to stay within `max_servers` live
    servers and `memory_limit` MB on its host. Servers starting and other open claims
    count; only ready servers with no request in flight are evicted, least recently used
    first. Servers of the host must all be probed (`probes`)."""
    if memory_limit is not None and request.memory_mb > memory_limit:
        return Room(
            impossible=f"{request.model} needs {request.memory_mb} MB; [pool] memory_mb is "
            f"{memory_limit}"
        )
    live = [s for s in state.servers.values() if s.host == request.host and s.live]
    gone = [s for s in live if s.instance_id in probes and probes[s.instance_id].process != "alive"]
    live = [s for s in live if s not in gone]
    others = [
        c
        for c in state.server_claims.values()
        if c.host == request.host and c.claim_id != claim_id and c.instance_id is None
    ]
    count = len(live) + len(others) + 1
    memory = sum(s.memory_mb for s in live) + request.memory_mb
    idle = sorted(
        (
            s
            for s in live
            if s.status == "ready"
            and s.claim_id != claim_id
            and not probes.get(s.instance_id, ServerProbe("alive", busy=True)).busy
        ),
        key=lambda s: _last_used(s, probes),
    )
    evict: list[ModelServerEntry] = []
    while count > max_servers or (memory_limit is not None and memory > memory_limit):
        if not idle:
            why = (
                f"max_model_servers ({max_servers})"
                if count > max_servers
                else f"[pool] memory_mb ({memory_limit} MB)"
            )
            return Room(wait=f"{why} reached and every other model server is busy", gone=gone)
        victim = idle.pop(0)
        evict.append(victim)
        count -= 1
        memory -= victim.memory_mb
    return Room(evict=evict, gone=gone)


def _last_used(server: ModelServerEntry, probes: Mapping[str, ServerProbe]) -> float:
    probe = probes.get(server.instance_id)
    if probe is not None and probe.last_used is not None:
        return probe.last_used
    return (server.last_used_at or server.started_at).timestamp()


# --- the I/O -----------------------------------------------------------------------------------


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
            _touch(Path(self.entry.log_path).parent / "used")
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
        busy = _busy(directory)
        last_used = _mtime(directory / "used")
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
            reason, status = _exit_marker(directory)
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
            fd = os.open(directory / "inflight.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        if (directory / "exit").exists() or process_state(
            server.pid, server.pid_started_at
        ) != "alive":
            os.close(fd)
            return None
        _touch(directory / "used")
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
            launched = self._launch(spec, directory, log_path, port, claim_id, ids)
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
                self._stop_launched(sup, directory, pid, pid_started)
                return None
            self._wait_ready(spec, instance_id, sup, directory, log_path, port, began)
            ready = ModelServerReady(
                **ids,
                claim_id=claim_id,
                instance_id=instance_id,
                ready_seconds=round(time.monotonic() - began, 4),
            )
            _touch(directory / "used")
            (directory / "adopted").touch(mode=0o600)  # the supervisor stops watching us
            if not self._fenced(claim_id, [ready]):
                self._stop_launched(sup, directory, pid, pid_started)
                return None
        except ModelServerError as exc:
            self._end_claim(claim_id, ids, exc, launched, directory, instance_id)
            raise
        except Exception as exc:
            error = ModelServerError(
                f"cannot start the model server of {spec.model}: {_first_line(exc)}"
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
            status = self._stop_launched(sup, directory, pid, pid_started)
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

    def _launch(
        self,
        spec: ServerSpec,
        directory: Path,
        log_path: Path,
        port: int,
        claim_id: str,
        ids: dict[str, Any],
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
            "idle_timeout": self.config.pool.idle_timeout,
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
            raise _start_failed(spec, f"could not be started: {what}", log_path, 127)
        pid = int(line.split()[1])
        try:
            started = start_time(pid)
        except Exception:  # noqa: BLE001 - gone already: its exit status is in `exit`
            started = 0.0
        return sup, pid, started

    def _wait_ready(
        self,
        spec: ServerSpec,
        instance_id: str,
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
                _, status = _exit_marker(directory)
                raise _start_failed(
                    spec, f"exited with status {status} before it was ready", log_path, status
                )
            if time.monotonic() > deadline:
                status = self._stop_launched(sup, directory)
                raise _start_failed(
                    spec,
                    f"was not ready within {spec.start_timeout:g} s (GET {spec.ready_path} "
                    f"on port {port}); it was stopped (exit status {status})",
                    log_path,
                    status,
                    stopped=True,
                )
            time.sleep(pause)
            pause = min(0.1, pause * 1.25)

    def _stop_launched(
        self,
        sup: subprocess.Popen[bytes],
        directory: Path,
        pid: int | None = None,
        pid_started: float | None = None,
    ) -> int | None:
        """Stop a server we launched (through its supervisor) and return its exit status."""
        if sup.poll() is None:
            sup.terminate()
            try:
                sup.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait(timeout=5)
        if pid is not None and pid_started:
            terminate(pid, pid_started)  # should its supervisor have failed to
        return _exit_marker(directory)[1]

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
        fd = os.open(directory / "inflight.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _lock_exclusive(fd, 0.0 if not wait else 5.0) and not wait:
                return False
            if process_state(server.pid, server.pid_started_at) != "alive":
                reason_left, status = self._last_word(server, directory)
                probe = ServerProbe("gone", exit_reason=reason_left, exit_status=status)
                self._record_gone(server, probe, ids)
                return True
            _write_exit(directory, reason, detail)
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
        _write_exit(directory, "unhealthy", "its ready path did not answer")
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


def _start_failed(
    spec: ServerSpec, what: str, log_path: Path, status: int | None, stopped: bool = False
) -> ModelServerError:
    tail = read_log_tail(log_path, LOG_TAIL)
    shown = "\n".join(f"  {line}" for line in tail) or "  (empty)"
    return ModelServerError(
        f"The model server of {spec.model} ({spec.command[0]}) {what}. "
        f"Last log lines of {log_path}:\n{shown}",
        exit_status=status,
        stopped=stopped,
    )


def _exit_marker(directory: Path) -> tuple[str | None, int | None]:
    try:
        data = json.loads((directory / "exit").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    status = data.get("exit_status")
    return str(data.get("reason") or ""), status if isinstance(status, int) else None


def _write_exit(directory: Path, reason: str, detail: str) -> None:
    """Say why a server is being stopped, before it is (the supervisor keeps the first)."""
    path = directory / "exit"
    if path.exists():
        return
    tmp = directory / f"exit.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps({"reason": reason, "exit_status": None, "detail": detail}))
    with contextlib.suppress(OSError):
        os.link(tmp, path)  # the first reason wins
    tmp.unlink(missing_ok=True)


def _busy(directory: Path) -> bool:
    """Does a request hold the server's in-flight lock (shared) right now?"""
    try:
        fd = os.open(directory / "inflight.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _lock_exclusive(fd: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.utime(fd)
        finally:
            os.close(fd)


def _mtime(path: Path) -> float | None:
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
        return _first_line(exc)
    finally:
        conn.close()


def free_port() -> int:
    """A loopback port free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:40].strip("-.") or "model"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _evict_detail(server: ModelServerEntry, request: ServerRequest) -> str:
    return f"least recently used idle model server; room for {request.model}"
