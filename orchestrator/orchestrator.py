"""The Orchestrator: the Task API over one session of the event log.

A thin facade over two parts with one job each (ADR-0013): the `Session`
(`orchestrator.session`: the log, the configuration, the session's streams; it decides and
records) and the `TaskRunner` (`orchestrator.runner`: runs tasks on the backends,
`orchestrator.backends.bundle`). Calls go down, never back up into this module.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from events.catalogue import Event, TaskStarted
from events.projections import Owner, SessionState, TaskRecord
from events.reads import read_task
from events.store import EventLog
from events.streams import StreamView
from orchestrator import views
from orchestrator.api import (
    InvalidTaskArgs,
    TaskHandle,
    TaskStartArgs,
    check_limits,
    check_session_id,
    check_task_id,
    parse_task_args,
)
from orchestrator.backends.agent import AgentBackend
from orchestrator.backends.bundle import Backends
from orchestrator.backends.server import ServerBackend
from orchestrator.backends.spec import WorkerSpec
from orchestrator.config import OrchestratorConfig, did_you_mean, load_config
from orchestrator.model_servers import ModelServers
from orchestrator.pool import WorkerPool
from orchestrator.processes import own_identity
from orchestrator.resolver import ModelDecision
from orchestrator.runner import TaskRunner
from orchestrator.session import Session
from orchestrator.transport import Transport

AWAIT_POLL = 0.05
MAX_ARGS_BYTES = 1024 * 1024  # one task's arguments, encoded (ADR-0006)
# Drain watchers get this long at close to record their stops; later finders record the rest.
CLOSE_GRACE = 2.0


class Orchestrator:
    """One session's view of the pool, driven only through the Task API."""

    def __init__(
        self,
        config: OrchestratorConfig,
        log: EventLog,
        session_id: str,
        owns_log: bool,
        transport: Transport | None = None,
    ) -> None:
        self.session_id = session_id
        self._owns_log = owns_log
        self.backends = Backends(config, log, transport)
        self.state = Session(config, log, session_id, self.backends)
        log.hold_host_lease(self.state.host)
        self.runner = TaskRunner(self.state, self.backends)
        self._closed = False

    @classmethod
    def open(
        cls,
        config: OrchestratorConfig | dict[str, Any] | str | Path | None = None,
        store: str | EventLog | None = None,
        session_id: str | None = None,
        transport: Transport | None = None,
    ) -> Orchestrator:
        """Open a session on a store: a new one (`session_id=None`) or a resumed one.
        `transport` (an `orchestrator.transport.Transport`) carries this orchestrator's HTTP
        requests to providers and worker processes instead of sockets (for tests)."""
        sid = check_session_id(session_id) if session_id else f"s-{uuid.uuid4().hex[:10]}"
        cfg = load_config(config)
        log = store if isinstance(store, EventLog) else EventLog(store)
        return cls(cfg, log, sid, owns_log=not isinstance(store, EventLog), transport=transport)

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
        self.runner.close()
        stop = stop_workers or (self._owns_log and self.log.kind == "memory")
        self.backends.close(self.session_id, stop, CLOSE_GRACE)
        if self._owns_log:
            self.log.close()

    # --- the parts, for the CLI, the front ends and the tests -----------------------------

    @property
    def config(self) -> OrchestratorConfig:
        """This orchestrator's configuration."""
        return self.state.config

    @property
    def log(self) -> EventLog:
        """The event log."""
        return self.state.log

    @property
    def host(self) -> str:
        """This host's id."""
        return self.state.host

    @property
    def session(self) -> StreamView[SessionState]:
        """This session's stream, folded."""
        return self.state.view

    @property
    def pool(self) -> WorkerPool:
        """The server workers' pool."""
        return self.backends.pool

    @property
    def agent(self) -> AgentBackend:
        """The in-process agents."""
        return self.backends.agent

    @property
    def server(self) -> ServerBackend:
        """The server-worker backend."""
        return self.backends.server

    @property
    def servers(self) -> ModelServers:
        """The managed model servers."""
        return self.backends.servers

    def record(self, *events: Event, decided: int | None = None) -> list[int]:
        """Append facts, each to its own stream (`Session.record`)."""
        return self.state.record(*events, decided=decided)

    def session_decision(self, worker_id: str) -> ModelDecision:
        """The model this session's worker uses when a task names none."""
        return self.state.session_decision(worker_id)

    def worker_spec(self, worker_id: str, decision: ModelDecision) -> WorkerSpec:
        """The process a session-level decision asks for."""
        return self.state.worker_spec(worker_id, decision)

    # --- Task API --------------------------------------------------------------------------

    def task_start(self, **payload: Any) -> TaskHandle:
        """Start a task. Schema errors raise `InvalidTaskArgs`; everything else ends as a
        task (completed or failed) in the log."""
        self.state.check_moved()
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
        pid, started_at = own_identity()
        # Recorded together with the first decision about the task, never alone.
        started = TaskStarted(
            session_id=self.session_id,
            task_id=task_id,
            worker_id=args.worker_id if args.kind == "worker" else _op_worker(args),
            kind=args.kind,
            op=args.op,
            args=recorded,
            host=self.host,
            pid=pid,
            pid_started_at=started_at,
        )
        if args.kind == "op":
            self.runner.run_op(args, started)  # ends before task_start returns
        else:
            self.runner.start_worker(args, started)
        # Our own appends are folded already: no read needed for the status.
        task = self.session.state.task(task_id)
        return TaskHandle(task_id=task_id, status=task.status if task else "completed")

    def task_peek(self, task_id: str) -> TaskRecord:
        """The task's record now, whatever session started it; never blocks. A task left
        running by an orchestrator process that is gone is ended `failed` here, naming that
        process."""
        self.state.check_moved()
        check_task_id(task_id)
        state = self.session.state
        task = state.task(task_id)
        if task is None or task.status == "running":
            # Only a running or unknown task can have changed: a finished one never does.
            state = self.session.refresh()
            task = state.task(task_id)
        if task is None:
            return self._foreign_task(task_id)
        owner = state.owners.get(task_id)
        if task.status == "running" and self.settle(self.session_id, task_id, owner):
            return self.task_peek(task_id)
        return task.model_copy()

    def _foreign_task(self, task_id: str) -> TaskRecord:
        """A task of another session (or an old one of this session), read through the
        index; one left running by a dead orchestrator is ended first."""
        found = read_task(self.log, task_id)
        if found is None:
            raise InvalidTaskArgs(
                f'Unknown task "{task_id}".' + views.known_tasks(self.state, task_id)
            )
        task, owner = found
        if owner is not None and self.settle(task.session_id, task_id, owner):
            found = read_task(self.log, task_id)
            assert found is not None
            task = found[0]
        return task

    def settle(self, session_id: str, task_id: str, owner: Owner | None) -> bool:
        """End a running task whose owning orchestrator process is gone; True if it did."""
        return self.state.settle(session_id, task_id, owner)

    def settle_workers(self) -> None:
        """Record this host's worker processes found gone (before a view shows them)."""
        self.pool.settle_host(self.session_id)

    def settle_servers(self) -> None:
        """Record what became of this host's managed model servers."""
        self.servers.sweep({"session_id": self.session_id})

    def task_await(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Block until the task finishes or `timeout` seconds pass; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.runner.done_event(task_id)
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
            (done or threading.Event()).wait(wait)

    def task_cancel(self, task_id: str) -> TaskRecord:
        """Cancel a running task: its provider request is interrupted and a late reply is
        dropped. A finished task is returned unchanged."""
        rec = self.task_peek(task_id)
        if rec.status == "running":
            self.runner.cancel(rec)
        return self.task_peek(task_id)

    def task_list(self, view: str = "tasks", **filters: Any) -> list[Any]:
        """Rows of a view: tasks, workers, registry, models, profiles, memory, events..."""
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
        return handler(self.state, self, **filters)

    # --- how AsyncOrchestrator wakes its awaits ------------------------------------------------

    def on_task_end(self, hook: Callable[[str], None]) -> None:
        """Call `hook(task_id)` (from the thread that ended it) whenever a task of this
        orchestrator ends; how `AsyncOrchestrator` wakes its awaits without a thread each."""
        self.runner.on_task_end(hook)

    def owns(self, task_id: str) -> bool:
        """Is the task running in this orchestrator (so its end wakes the hooks)?"""
        return self.runner.owns(task_id)


def _op_worker(args: TaskStartArgs) -> str | None:
    return args.worker.worker_id if args.worker else None
