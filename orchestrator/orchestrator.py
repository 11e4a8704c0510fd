"""The Orchestrator: the Task API over one session of the event log."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson

from events.catalogue import (
    ConfigRecorded,
    Event,
    ModelAttemptFailed,
    ModelCooledDown,
    ModelResolved,
    SessionOpened,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskQueued,
    TaskStarted,
    utcnow,
)
from events.logs import get_logger
from events.projections import (
    ModelsState,
    Override,
    Owner,
    TaskRecord,
    apply_models,
)
from events.reads import CONFIG_STREAM, last_config, overrides_at
from events.store import EventLog, Filter, StoreError, StoreMoved, StreamConflict, record_from
from events.streams import (
    MEMORY_STREAM,
    MODELS_STREAM,
    StreamTail,
    StreamView,
    append_together,
    session_view,
)
from orchestrator import conversation, ops, telemetry, views
from orchestrator.api import (
    InvalidTaskArgs,
    TaskHandle,
    TaskStartArgs,
    check_limits,
    check_session_id,
    check_task_id,
    parse_task_args,
    round_cost,
)
from orchestrator.backends import (
    Backend,
    Cancelled,
    Lease,
    PromptRequest,
    TaskError,
)
from orchestrator.backends.agent import AgentBackend
from orchestrator.backends.server import DRAINING_RETRIES, Draining, ServerBackend
from orchestrator.config import OrchestratorConfig, ProfileConfig, did_you_mean, load_config
from orchestrator.conversation import ConversationError, Parent
from orchestrator.explain import OverrideCause
from orchestrator.fingerprint import fingerprint, identity
from orchestrator.history import recorded_config
from orchestrator.model_servers import ModelServers
from orchestrator.pool import REGISTRY_STREAM, SpawnError, WorkerPool, WorkerSpec
from orchestrator.processes import host_id, own_identity, process_state
from orchestrator.providers import Completion, ProviderError, internal_error
from orchestrator.resolver import (
    CatalogueModel,
    ModelDecision,
    ResolutionError,
    attempt_chain,
    build_catalogue,
    check_worker,
    decide_model,
)

_T = TypeVar("_T")
AWAIT_POLL = 0.05
# Each retry means another writer's decision landed first; this many in a row means a storm.
MAX_REDECIDE = 200
MAX_ARGS_BYTES = 1024 * 1024  # one task's arguments, encoded (ADR-0006)
# Drain watchers get this long at close to record their stops; later finders record the rest.
CLOSE_GRACE = 2.0
_log = get_logger("orchestrator")

# Failures that end a task `failed` with their own message.
TASK_ERRORS = (ProviderError, ResolutionError, TaskError, SpawnError)


class Orchestrator:
    """One session's view of the pool, driven only through the Task API."""

    def __init__(
        self, config: OrchestratorConfig, log: EventLog, session_id: str, owns_log: bool
    ) -> None:
        self.config = config
        self.log = log
        self.session_id = session_id
        self._owns_log = owns_log
        self.host = host_id()
        self.session = session_view(log, session_id)
        self.memory = StreamTail(log, MEMORY_STREAM)  # written to, never folded here
        self.pool = WorkerPool(log, log.private_dir("workers"))
        log.hold_host_lease(self.host)
        self.agent = AgentBackend(config, lambda: os.environ)
        self.server = ServerBackend(self.pool, config, lambda: os.environ)
        # Managed model servers share the registry stream (and its view) with the workers.
        self.servers = ModelServers(
            log, self.pool.registry, config, lambda: log.private_dir("model_servers")
        )
        self.backends: dict[str, Backend] = {"agent": self.agent, "server": self.server}
        slots = config.pool.max_concurrency
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="task")
        self._slots = slots
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._done: dict[str, threading.Event] = {}
        self._cancels: dict[str, threading.Event] = {}
        self._leases: dict[str, tuple[Backend, Lease]] = {}
        self.models = StreamView(log, MODELS_STREAM, ModelsState, apply_models)
        self._failures: dict[str, list[datetime]] = {}
        self._failures_lock = threading.Lock()
        # task id -> (log position of its start, the override in force): for its span
        self._traced: dict[str, tuple[int, Override | None]] = {}
        self._closed = False
        self._opened_recorded = False
        self._config_stream = StreamTail(log, CONFIG_STREAM)
        self._catalogues: dict[tuple[bool, ...], list[CatalogueModel]] = {}
        self._configs: dict[tuple[str, ...], tuple[str, dict[str, Any]]] = {}
        self._recorded_digest: str | None = None  # the newest ConfigRecorded, once read
        self._moved: StoreMoved | None = None  # the store file went away under us
        self._end_hooks: list[Callable[[str], None]] = []

    @classmethod
    def open(
        cls,
        config: OrchestratorConfig | dict[str, Any] | str | Path | None = None,
        store: str | EventLog | None = None,
        session_id: str | None = None,
    ) -> Orchestrator:
        """Open a session on a store: a new one (`session_id=None`) or a resumed one."""
        sid = check_session_id(session_id) if session_id else f"s-{uuid.uuid4().hex[:10]}"
        cfg = load_config(config)
        log = store if isinstance(store, EventLog) else EventLog(store)
        return cls(cfg, log, sid, owns_log=not isinstance(store, EventLog))

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, stop_workers: bool = False) -> None:
        """Finish running tasks and release the store. Server workers keep running for
        reuse unless `stop_workers`, or unless this orchestrator opened an in-memory store
        (nobody else could ever find them); agent workers end here."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self.pool.join_watchers(CLOSE_GRACE)
        if stop_workers or (self._owns_log and self.log.kind == "memory"):
            for entry in self.pool.live_entries():
                if entry.instance_id in self.pool.started_here:
                    self.pool.stop(
                        entry,
                        {"session_id": self.session_id, "worker_id": entry.worker_id},
                        reason="orchestrator closed",
                    )
            for server in self.servers.stoppable():
                if server.instance_id in self.servers.started_here:
                    self.servers.stop(
                        server, {"session_id": self.session_id}, reason="orchestrator closed"
                    )
        self.servers.reap_children()
        self.agent.agents.clear()
        self.pool.reap_children()
        if self._owns_log:
            self.log.close()

    # --- the log ---------------------------------------------------------------------------

    def record(
        self,
        *events: Event,
        memory: Sequence[Event] = (),
        registry: Sequence[Event] = (),
        elsewhere: Mapping[str, Sequence[Event]] | None = None,
        decided: int | None = None,
    ) -> list[int]:
        """Append facts to this session's stream (and the memory, registry and other
        sessions' streams) in one transaction, retrying past other writers. The first write
        of this orchestrator also records `SessionOpened`, so merely looking (views, CLI
        inspection) leaves the log unchanged; a decision made under a configuration the log
        has not recorded last brings its `ConfigRecorded`.

        `decided`: the batch is a decision on this session's state at that stream version,
        so any other append to the session since raises `StreamConflict` (see `decide`)
        instead of being retried past."""
        batch = list(events)
        configs = self._config_events(batch)
        others = [
            (StreamTail(self.log, f"session:{sid}"), list(evs))
            for sid, evs in (elsewhere or {}).items()
        ]
        with self.session.lock:
            if not self._opened_recorded:
                self.session.refresh()
                opened = SessionOpened(
                    session_id=self.session_id,
                    resumed=self.session.version > 0,
                    host=self.host,
                    pid=os.getpid(),
                )
                batch.insert(0, opened)
                self._opened_recorded = True
            try:
                positions = append_together(
                    (self.session, batch),
                    (self.memory, list(memory)),
                    (self.pool.registry, list(registry)),
                    (self._config_stream, configs),
                    *others,
                    decided_on=None if decided is None else (self.session, decided),
                )
            except StreamConflict:
                if batch and isinstance(batch[0], SessionOpened):
                    self._opened_recorded = False  # it did not land: the next write brings it
                raise
            except StoreMoved as exc:
                self._store_moved(exc)
                raise
        self._recorded_digest = next(
            (e.config_digest for e in reversed(configs) if isinstance(e, ConfigRecorded)),
            self._recorded_digest,
        )
        return positions

    def _store_moved(self, exc: StoreMoved) -> None:
        """The store file was deleted or replaced: stop the processes started here (their
        registry is unreachable) and refuse every later call with the same one line."""
        if self._moved is None:
            self._moved = exc
            _log.error("store moved", error=str(exc))
            self.pool.abandon()
            self.servers.abandon()

    def _check_moved(self) -> None:
        if self._moved is not None:
            raise StoreMoved(str(self._moved))

    def decide(self, attempt: Callable[[int], _T]) -> _T:
        """Run `attempt(version)` (decide on the session as of `version`, then
        `record(..., decided=version)`) until no other writer, thread or process, has moved
        the session between the read and the append: a decision is recorded against the
        state it was decided on, never a stale one. No lock is held while deciding."""
        for _ in range(MAX_REDECIDE):
            self.session.refresh()
            version = self.session.version
            try:
                return attempt(version)
            except StreamConflict:
                continue
        raise StoreError(
            f"session {self.session_id} kept changing under {MAX_REDECIDE} decisions in a "
            "row; try again"
        )

    def config_digest(self, catalogue: list[CatalogueModel]) -> str:
        """The digest of this configuration as a decision with `catalogue` sees it."""
        return self._config_record(catalogue)[0]

    def _config_record(self, catalogue: list[CatalogueModel]) -> tuple[str, dict[str, Any]]:
        usable = tuple(sorted({row.provider for row in catalogue if row.usable}))
        found = self._configs.get(usable)
        if found is None:
            found = self._configs[usable] = recorded_config(self.config, catalogue)
        return found

    def _config_events(self, batch: Sequence[Event]) -> list[Event]:
        """`ConfigRecorded` for the configuration of the decisions in `batch`, unless it is
        the one the log recorded last (read from the store once per orchestrator)."""
        digest = next(
            (e.config_digest for e in batch if isinstance(e, ModelResolved) and e.config_digest),
            None,
        )
        if digest is None or digest == self._recorded_digest:
            return []
        if self._recorded_digest is None:
            self._recorded_digest = last_config(self.log)
            if digest == self._recorded_digest:
                return []
        payload = next(p for d, p in self._configs.values() if d == digest)
        return [ConfigRecorded(session_id=self.session_id, config_digest=digest, **payload)]

    def catalogue(self) -> list[CatalogueModel]:
        """The model catalogue, with usability read from the environment now (built once
        per set of providers whose key is present; do not change the rows)."""
        keys = tuple(
            bool(p.api_key_env and os.environ.get(p.api_key_env))
            for p in self.config.providers.values()
        )
        found = self._catalogues.get(keys)
        if found is None:
            found = self._catalogues[keys] = build_catalogue(self.config, os.environ)
        return found

    # --- Task API --------------------------------------------------------------------------

    def task_start(self, **payload: Any) -> TaskHandle:
        """Start a task. Schema errors raise `InvalidTaskArgs`; everything else ends as a
        task (completed or failed) in the log."""
        self._check_moved()
        args = parse_task_args(payload)
        check_limits(args, self.config.limits.max_text)
        recorded = args.model_dump(mode="json", exclude_none=True)
        encoded = len(orjson.dumps(recorded))  # what TaskStarted will hold, dumped once
        if encoded > MAX_ARGS_BYTES:
            raise InvalidTaskArgs(
                f"Invalid task_start arguments: arguments: {encoded:,} bytes once encoded; "
                f"the limit for one task is {MAX_ARGS_BYTES:,} (see docs/task-api.md)."
            )
        task_id = f"t-{uuid.uuid4().hex[:12]}"
        worker_id = args.worker_id if args.kind == "worker" else _op_worker(args)
        pid, started_at = own_identity()
        # Recorded together with the first decision about the task, never alone.
        started = TaskStarted(
            session_id=self.session_id,
            task_id=task_id,
            worker_id=worker_id,
            kind=args.kind,
            op=args.op,
            args=recorded,
            host=self.host,
            pid=pid,
            pid_started_at=started_at,
        )
        if args.kind == "op":
            # An op ends before task_start returns: nobody can be waiting to be woken.
            self._run_op(task_id, args, started)
        else:
            self._done[task_id] = threading.Event()
            self._start_worker_task(task_id, args, started)
        # Our own appends are folded already: no read needed for the status.
        task = self.session.state.task(task_id)
        return TaskHandle(task_id=task_id, status=task.status if task else "completed")

    def task_peek(self, task_id: str) -> TaskRecord:
        """The task's record now, whatever session started it; never blocks. A task left
        running by an orchestrator process that is gone is ended `failed` here, naming that
        process."""
        self._check_moved()
        check_task_id(task_id)
        state = self.session.state
        task = state.task(task_id)
        if task is None or task.status == "running":
            # Only a running or unknown task can have changed: a finished one never does.
            state = self.session.refresh()
            task = state.task(task_id)
        if task is None:
            return views.foreign_task(self, task_id)
        owner = state.owners.get(task_id)
        if task.status == "running" and self.settle(self.session_id, task_id, owner):
            return self.task_peek(task_id)
        return task.model_copy()

    def settle(self, session_id: str, task_id: str, owner: Owner | None) -> bool:
        """End a running task whose owning orchestrator process is gone; True if it did."""
        if owner is None or self._owner_alive(owner):
            return False
        error = (
            f"The orchestrator process that ran this task (pid {owner.pid} on host "
            f"{owner.host}) is gone; the task was ended failed by pid {os.getpid()}. "
            "Start it again."
        )
        self._record_in(session_id, TaskFailed(session_id=session_id, task_id=task_id, error=error))
        return True

    def _owner_alive(self, owner: Owner) -> bool:
        if (owner.pid, owner.pid_started_at) == own_identity() and owner.host == self.host:
            return True
        if owner.host == self.host:
            return process_state(owner.pid, owner.pid_started_at) == "alive"
        return self.log.host_alive(owner.host)

    def task_await(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Block until the task finishes or `timeout` seconds pass; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._done.get(task_id)
        if done is not None:  # ours: woken when it ends or is cancelled, no polling
            done.wait(timeout)
        while True:
            rec = self.task_peek(task_id)
            if rec.status != "running":
                return rec
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return rec
            wait = AWAIT_POLL if left is None else min(AWAIT_POLL, left)
            if done is not None:
                done.wait(wait)
            else:
                time.sleep(wait)

    def task_cancel(self, task_id: str) -> TaskRecord:
        """Cancel a running task: its provider request is interrupted and a late reply is
        dropped. A finished task is returned unchanged."""
        rec = self.task_peek(task_id)
        if rec.status == "running":
            self._record_in(
                rec.session_id,
                TaskCancelled(session_id=rec.session_id, task_id=task_id, worker_id=rec.worker_id),
            )
            cancel = self._cancels.get(task_id)
            if cancel is not None:  # ours: stop waiting, and tell its process if it has one
                cancel.set()
                leased = self._leases.get(task_id)
                if leased is not None:
                    backend, lease = leased
                    backend.cancel(lease, task_id)
            elif rec.kind == "worker" and rec.worker_id is not None:
                # Another orchestrator's task: its request is interrupted where it runs.
                self.server.cancel_anywhere(str(rec.worker_id), task_id)
            self._wake(task_id)
        return self.task_peek(task_id)

    def task_list(self, view: str = "tasks", **filters: Any) -> list[Any]:
        """Rows of a view: tasks, workers, registry, models, profiles, memory, events."""
        handler = views.VIEWS.get(view)
        if handler is None:
            raise InvalidTaskArgs(
                f'Invalid task_list arguments: view: unknown view "{view}".'
                + did_you_mean(view, views.VIEWS)
            )
        allowed = views.filters_of(handler)
        for name in filters:
            if name not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise InvalidTaskArgs(
                    f'Invalid task_list arguments: {name}: the {view} view has no filter "{name}"'
                    f" (its filters: {known})." + did_you_mean(name, allowed)
                )
        return handler(self, **filters)

    # --- what deciders read (ops.OpContext) --------------------------------------------------

    def profile(self, worker_id: str) -> ProfileConfig:
        """The profile of a known worker id (raises `ResolutionError` with suggestions)."""
        return check_worker(worker_id, self.config)

    def override(self, worker_id: str) -> Override | None:
        """This session's override for a worker, if any."""
        return self.session.refresh().overrides.get(worker_id)

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running (on its backend)?"""
        return self._backend(worker_id).running(worker_id)

    def in_registry(self, worker_id: str) -> bool:
        """Has the device registry ever recorded a process of the worker (one indexed row)?"""
        where = Filter(stream=REGISTRY_STREAM, worker_id=worker_id)
        return any(True for _ in self.log.select(where, limit=1))

    def overrides_at(self, session_id: str, position: int) -> dict[str, Override] | None:
        """A session's overrides as of a log position; None if it had no events by then."""
        return overrides_at(self.log, session_id, position)

    def head(self) -> int:
        """The newest log position."""
        return self.log.head()

    def session_decision(self, worker_id: str) -> ModelDecision:
        """The model this session's worker uses when a task names none."""
        return decide_model(
            worker_id, None, self.override(worker_id), self.config, self.catalogue()
        )

    def worker_spec(self, worker_id: str, decision: ModelDecision) -> WorkerSpec:
        """The process a session-level decision asks for."""
        profile = self.profile(worker_id)
        ident = identity(
            worker_id,
            profile.backend,
            decision.resolved_model,
            decision.model_policy,
            profile,
            self.config,
        )
        return WorkerSpec(
            worker_id=worker_id,
            model=decision.resolved_model,
            model_policy=decision.model_policy,
            fingerprint=fingerprint(ident),
            identity=ident,
            system_prompt=profile.system_prompt,
            config=self.config,
        )

    # --- what op steps may do (ops.Workers) ---------------------------------------------------

    def spawn(self, worker_id: str, task_id: str, force_new: bool) -> ops.Result:
        """Get (reuse) or start the worker's process for this session's model."""
        spec = self.worker_spec(worker_id, self.session_decision(worker_id))
        lease = self._acquire(spec, self._ids(task_id, worker_id), force_new, True)
        assert lease is not None
        self.pool.registry.append(list(lease.deferred))
        return {
            "worker_id": worker_id,
            "instance_id": lease.instance_id,
            "pid": lease.pid,
            "url": lease.url,
            "fingerprint": spec.fingerprint,
            "model": spec.model,
            "model_policy": spec.model_policy,
            "reused": lease.reused,
            "reason": lease.reason,
        }

    def stop(self, worker_id: str, task_id: str) -> ops.Result:
        """Stop the worker's processes on this host, and its in-process agent."""
        ids = self._ids(task_id, worker_id)
        # Its processes found gone are recorded first, and listed as already gone.
        found = self.pool.settle_host(self.session_id, worker_id)
        server = self.server.stop(worker_id, ids)
        agent = self.agent.stop(worker_id, ids)
        return {
            "worker_id": worker_id,
            "stopped": server.stopped + agent.stopped,
            "exited": [e.instance_id for e in found] + server.exited,
        }

    def respawn(self, worker_id: str, task_id: str) -> bool:
        """Start now the process the session's (new) model asks for, then retire the process
        this session used before, unless another session has used it (ADR-0003, "Respawn")."""
        spec = self.worker_spec(worker_id, self.session_decision(worker_id))
        ids = self._ids(task_id, worker_id)
        if self.profile(worker_id).backend == "agent":
            self.servers.warm(spec.model, ids)  # a managed model's server, so no task waits
            agent = self.agent.agents.get(worker_id)
            if agent is not None and agent.fingerprint == spec.fingerprint:
                return False
            self.agent.acquire(spec, ids, force_new=True)
            return True
        before = [
            e
            for e in self.pool.live_entries(worker_id)
            if e.status == "ready"
            and self.session_id in e.sessions
            and e.fingerprint != spec.fingerprint
        ]
        lease = self._acquire(spec, ids, force_new=False, spawn=True)
        assert lease is not None
        self.pool.registry.append(list(lease.deferred))
        self.servers.warm(spec.model, ids)  # a managed model's server, so no task waits
        for entry in before:
            if set(entry.sessions) <= {self.session_id}:
                self.pool.retire(
                    entry, ids, detail=f"replaced by {lease.instance_id} for {spec.model}"
                )
        return True

    # --- worker tasks ----------------------------------------------------------------------

    def _ids(self, task_id: str | None, worker_id: str | None) -> dict[str, Any]:
        return {"session_id": self.session_id, "task_id": task_id, "worker_id": worker_id}

    def _start_worker_task(self, task_id: str, args: TaskStartArgs, started: TaskStarted) -> None:
        worker_id = str(args.worker_id)
        ids = self._ids(task_id, worker_id)
        parent: Parent | None = None
        if args.continue_from is not None:
            try:
                parent = conversation.read_parent(self.log, args.continue_from)
                results = [r.model_dump() for r in args.tool_results or ()]
                conversation.check_tool_results(parent, results)
            except ConversationError as exc:
                failed = self.record(started, TaskFailed(**ids, error=str(exc)))
                if telemetry.enabled():
                    self._emit_span(task_id, min(failed), None)
                self._wake(task_id)
                return
            # The turns before this one, by id: its history is read back through the index.
            started = started.model_copy(update={"conversation": parent.chain})
        catalogue = self.catalogue()

        def attempt(
            version: int,
        ) -> tuple[ModelDecision, WorkerSpec, Override | None, list[int]] | None:
            try:
                override = self.override(worker_id)
                # The process is chosen by the session-level model; a task's own model only
                # travels with its message.
                session_level = decide_model(worker_id, None, override, self.config, catalogue)
                decision = (
                    decide_model(worker_id, args.model, override, self.config, catalogue)
                    if args.model
                    else session_level
                )
                spec = self.worker_spec(worker_id, session_level)
            except ResolutionError as exc:
                failed = self.record(started, TaskFailed(**ids, error=str(exc)), decided=version)
                if telemetry.enabled():  # no model was chosen, but the task still has its span
                    self._emit_span(task_id, min(failed), None)
                return None
            resolved = ModelResolved(
                **ids,
                **decision.model_dump(),
                fingerprint=spec.fingerprint,
                config_digest=self.config_digest(catalogue),
            )
            positions = self.record(started, resolved, *extra, decided=version)
            return decision, spec, override, positions

        queued = self._take_slot()
        extra: list[Event] = []
        if queued is not None:
            extra.append(TaskQueued(**ids, slots=self._slots, ahead=queued))
        decided = self.decide(attempt)
        if decided is None:
            with self._busy_lock:
                self._busy -= 1
            self._wake(task_id)
            return
        decision, spec, override, positions = decided
        if telemetry.enabled():
            self._traced[task_id] = (min(positions), override)
        self._cancels[task_id] = threading.Event()
        self._submit(task_id, lambda: self._serve(task_id, args, decision, spec, catalogue, parent))

    def _wake(self, task_id: str) -> None:
        """The task ended (its end is in the log): wake whoever awaits it, and the hooks.
        The wake-up is dropped here, so a task that is only peeked leaves nothing behind."""
        done = self._done.pop(task_id, None)
        if done is not None:
            done.set()
        for hook in self._end_hooks:
            hook(task_id)

    def on_task_end(self, hook: Callable[[str], None]) -> None:
        """Call `hook(task_id)` (from the thread that ended it) whenever a task of this
        orchestrator ends; how `AsyncOrchestrator` wakes its awaits without a thread each."""
        self._end_hooks.append(hook)

    def owns(self, task_id: str) -> bool:
        """Is the task running in this orchestrator (so its end wakes the hooks)?"""
        return task_id in self._done

    def _take_slot(self) -> int | None:
        """Count a task in; the number of tasks ahead of it when every slot is busy."""
        with self._busy_lock:
            self._busy += 1
            ahead = self._busy - self._slots
        return ahead if ahead > 0 else None

    def _submit(self, task_id: str, work: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                work()
            except StoreMoved:
                pass  # nowhere to record it: every later call says so (`_check_moved`)
            except Exception as exc:  # noqa: BLE001 - a bug must still end the task, visibly
                # One line: a traceback's frames (or its message) may hold a credential.
                error = internal_error(exc)
                _log.error("task crashed", task_id=task_id, error=error)
                self._finish(
                    task_id,
                    TaskFailed(session_id=self.session_id, task_id=task_id, error=error),
                )
            finally:
                with self._busy_lock:
                    self._busy -= 1
                self._cancels.pop(task_id, None)
                self._leases.pop(task_id, None)
                self._wake(task_id)

        self._executor.submit(telemetry.in_callers_context(guarded))

    def _serve(
        self,
        task_id: str,
        args: TaskStartArgs,
        decision: ModelDecision,
        spec: WorkerSpec,
        catalogue: list[CatalogueModel],
        parent: Parent | None = None,
    ) -> None:
        """Serve a worker task on the catalogue its model was decided with (one build per
        task: fallbacks and the price come from the same one). A continued conversation's
        history is read from the log here, and fitted to each model tried."""
        ids = self._ids(task_id, spec.worker_id)
        cancel = self._cancels[task_id]
        chain, skipped = attempt_chain(
            decision,
            self.profile(spec.worker_id),
            self.config,
            catalogue,
            self.models.refresh().cooled,
            utcnow(),
        )
        if not chain:
            error = "Every model for this task is cooling down: " + "; ".join(skipped)
            self._finish(task_id, TaskFailed(**ids, error=error))
            return
        request = PromptRequest(
            task_id=task_id,
            text=args.task or "",
            model=chain[0],
            system_prompt=spec.system_prompt,
            attachments=list(args.attachments),
            tools=args.tools,
        )
        try:
            shape = self._shaper(request, ids, catalogue, args, parent)
            lease, served, completion = self._serve_chain(spec, ids, args, shape, chain, cancel)
        except Cancelled:
            return  # recorded by task_cancel; the late reply, if any, is dropped
        except TASK_ERRORS as exc:
            self._finish(task_id, TaskFailed(**ids, error=str(exc)))
            return
        if lease is None:
            self._finish(task_id, TaskFailed(**ids, error=_no_process(spec)))
            return
        limit = self.config.limits.max_reply
        if len(completion.text) > limit:
            error = (
                f"The reply of {served} is {len(completion.text):,} characters; the limit is "
                f"{limit:,}. Ask for a shorter answer."
            )
            self._finish(task_id, TaskFailed(**ids, error=error))
            return
        self._finish(
            task_id,
            TaskCompleted(
                **ids,
                model=served,
                response=completion.text,
                instance_id=lease.instance_id,
                pid=lease.pid,
                reused=lease.reused,
                usage=_usage(catalogue, served, completion),
                tool_calls=completion.tool_calls,
            ),
        )

    def _shaper(
        self,
        request: PromptRequest,
        ids: dict[str, Any],
        catalogue: list[CatalogueModel],
        args: TaskStartArgs,
        parent: Parent | None,
    ) -> Callable[[str], PromptRequest]:
        """The request for each model tried: a conversation's history (read from the log
        once) fitted to that model's context, a `ConversationTrimmed` when turns are left
        out. Fallbacks keep the history."""
        if parent is None:
            return lambda model: replace(request, model=model)
        turns = conversation.history(self.log, parent)
        new = conversation.new_messages(args.model_dump(mode="json", exclude_none=True))
        tools = len(orjson.dumps(args.tools)) // conversation.CHARS_PER_TOKEN if args.tools else 0
        contexts = {m.model: m.context for m in catalogue}

        def shape(model: str) -> PromptRequest:
            context = contexts.get(model)
            if context is None:
                messages = [m for t in turns for m in t.messages] + new
                return replace(request, model=model, messages=messages)
            fitted = conversation.fit(request.system_prompt, turns, new, context, tools)
            if fitted.dropped:
                self.record(conversation.trimmed_event(ids, model, context, fitted))
            return replace(request, model=model, messages=fitted.messages)

        return shape

    def _serve_chain(
        self,
        spec: WorkerSpec,
        ids: dict[str, Any],
        args: TaskStartArgs,
        shape: Callable[[str], PromptRequest],
        chain: list[str],
        cancel: threading.Event,
    ) -> tuple[Lease | None, str, Completion]:
        """Try the models in order on one process: a retryable failure moves on to the next
        (each recorded `ModelAttemptFailed`), any other ends the task."""
        backend = self._backend(spec.worker_id)
        last: ProviderError | None = None
        for model in chain:
            request = shape(model)
            for _ in range(DRAINING_RETRIES):
                lease = backend.acquire(spec, ids, args.force_new, args.auto_spawn)
                if lease is None:
                    return None, model, Completion(text="")
                self._leases[request.task_id] = (backend, lease)
                if cancel.is_set():
                    raise Cancelled()
                try:
                    # A managed model's server is held (never evicted) while the request runs.
                    with contextlib.ExitStack() as held:
                        server = self.servers.acquire(model, ids)
                        base_url = None
                        if server is not None:
                            held.enter_context(server)
                            base_url = server.base_url
                        completion = backend.prompt(
                            lease, replace(request, base_url=base_url), cancel
                        )
                except Draining:
                    continue  # a respawn retired it just now: take (or start) its successor
                except ProviderError as exc:
                    self._attempt_failed(ids, model, exc)
                    last = exc
                    break
                return lease, model, completion
            else:
                raise TaskError(f'Worker "{spec.worker_id}" kept draining; run the task again.')
            if not last.retryable:
                raise last
        assert last is not None
        if len(chain) > 1:
            raise ProviderError(f"All {len(chain)} models failed; the last said: {last}")
        raise last

    def _attempt_failed(self, ids: dict[str, Any], model: str, exc: ProviderError) -> None:
        """Record a failed attempt; cool the model down when it keeps failing retryably."""
        events: list[Event] = [
            ModelAttemptFailed(**ids, model=model, error=str(exc), retryable=exc.retryable)
        ]
        self.record(*events)
        if not exc.retryable:
            return
        pool = self.config.pool
        now = utcnow()
        with self._failures_lock:
            recent = [
                t
                for t in self._failures.get(model, [])
                if (now - t).total_seconds() < pool.cooldown_window
            ]
            recent.append(now)
            self._failures[model] = recent
            if len(recent) < pool.cooldown_after:
                return
            self._failures[model] = []
        until = now + timedelta(seconds=pool.cooldown_for)
        reason = (
            f"{len(recent)} retryable failures within {pool.cooldown_window:g} s; the last: {exc}"
        )
        self.models.append(
            [ModelCooledDown(session_id=self.session_id, model=model, until=until, reason=reason)]
        )

    def _backend(self, worker_id: str) -> Backend:
        """Where the worker's tasks run (its profile's backend)."""
        return self.backends[self.profile(worker_id).backend]

    def _acquire(
        self, spec: WorkerSpec, ids: dict[str, Any], force_new: bool, spawn: bool
    ) -> Lease | None:
        return self._backend(spec.worker_id).acquire(spec, ids, force_new, spawn)

    def _finish(self, task_id: str, event: Event) -> None:
        """Record a task's end with the registry facts of the process that served it. A task
        cancelled meanwhile keeps its cancel: the fold lets the first terminal event win, so
        a late result (even one racing a cancel from another process) changes nothing."""
        leased = self._leases.pop(task_id, None)
        deferred = (*(leased[1].deferred if leased else ()), *self.servers.take_deferred(task_id))
        traced = self._traced.pop(task_id, None)
        cancel = self._cancels.get(task_id)
        if cancel is not None and cancel.is_set():
            if deferred:
                self.pool.registry.append(list(deferred))
            return
        self.record(event, registry=deferred)
        if traced is not None:
            self._emit_span(task_id, *traced)

    def _emit_span(self, task_id: str, since: int, override: Override | None) -> None:
        """The task's span, built from its events in the log since it started (the same
        builder `export-otel` uses, so live and exported spans agree)."""
        chain = [record_from(*e) for e in self.log.select(Filter(task_id=task_id), after=since - 1)]
        cause = None
        if override is not None:
            cause = OverrideCause(
                position=0,
                timestamp=override.set_at,
                session_id=self.session_id,
                model_ref=override.model_ref,
                resolved_model=override.resolved_model,
                model_policy=override.model_policy,
                reason=override.reason,
            )
        span = telemetry.task_span(chain, cause)
        if span is not None:
            telemetry.emit([span])

    # --- ops -------------------------------------------------------------------------------

    def _run_op(self, task_id: str, args: TaskStartArgs, started: TaskStarted) -> None:
        ids = self._ids(task_id, _op_worker(args))

        def attempt(version: int) -> ops.Decision | None:
            try:
                decision = ops.decide(self, task_id, args)
            except (ResolutionError, ops.OpError) as exc:
                self.record(started, TaskFailed(**ids, error=str(exc)), decided=version)
                return None
            if decision.act is None:  # a pure decision: one atomic append says it all
                self.record(
                    started,
                    *decision.events,
                    TaskCompleted(**ids, result=decision.result),
                    memory=decision.memory,
                    elsewhere=decision.elsewhere,
                    decided=version,
                )
                return None
            # Side effects (processes) follow the decision, so the log shows it first.
            self.record(started, *decision.events, memory=decision.memory, decided=version)
            return decision

        try:
            decision = self.decide(attempt)
            if decision is None or decision.act is None:
                return
            try:
                result = decision.act(self)
            except TASK_ERRORS as exc:
                self.record(TaskFailed(**ids, error=str(exc)))
                return
            except Exception as exc:  # noqa: BLE001 - a bug must end the op task, visibly
                error = internal_error(exc)
                _log.error("op crashed", task_id=task_id, error=error)
                self.record(TaskFailed(**ids, error=error))
                return
            self.record(TaskCompleted(**ids, result=result))
        finally:
            self._wake(task_id)

    def _record_in(self, session_id: str, event: Event) -> None:
        if session_id == self.session_id:
            self.record(event)
            return
        append_together((StreamTail(self.log, f"session:{session_id}"), [event]))


def _op_worker(args: TaskStartArgs) -> str | None:
    return args.worker.worker_id if args.worker else None


def _no_process(spec: WorkerSpec) -> str:
    return (
        f'Worker "{spec.worker_id}" has no running process for this session\'s model '
        f"{spec.model} and auto_spawn is false: start one with the worker.spawn op, "
        "or pass auto_spawn=true."
    )


def _usage(
    catalogue: list[CatalogueModel], model: str, completion: Completion
) -> dict[str, Any] | None:
    """The reported usage, priced with the catalogue's per-million-token costs."""
    if completion.usage is None:
        return None
    price = next((m for m in catalogue if m.model == model), None)
    cost = None
    if price is not None and (price.cost_input or price.cost_output):
        cost = round_cost(
            (
                completion.usage["input_tokens"] * price.cost_input
                + completion.usage["output_tokens"] * price.cost_output
            )
            / 1_000_000
        )
    return {**completion.usage, "cost_usd": cost}
