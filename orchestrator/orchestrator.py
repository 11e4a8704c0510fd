"""The Orchestrator: the Task API over one session of the event log.

A facade that validates and delegates (ADR-0013): the `Session` (`orchestrator.session`:
the log, the configuration, the session's streams; it decides, records and peeks), the
`TaskRunner` (`orchestrator.runner`: starts and runs tasks on the backends,
`orchestrator.backends.bundle`) and the views (`views.run`, reading the Session and
writing through its `SessionWriter`). Calls go down, never back up into this module.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from events.projections import TaskRecord
from events.store import EventLog
from orchestrator import views
from orchestrator.api import TaskHandle, check_session_id, parse_task_args
from orchestrator.backends.bundle import Backends
from orchestrator.config import OrchestratorConfig, load_config
from orchestrator.runner import TaskRunner
from orchestrator.session import Session, SessionWriter
from orchestrator.transport import Transport

AWAIT_POLL = 0.05
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
        # The parts, and the Session's record and reads, for the CLI, front ends and tests.
        self.config, self.log, self.session = config, log, self.state.view
        self.pool, self.server = self.backends.pool, self.backends.server
        self.servers = self.backends.servers
        self.record, self.session_decision = self.state.record, self.state.session_decision
        self.worker_spec = self.state.worker_spec
        self.writer = SessionWriter(self.state, self.pool.settle_host, self.servers.sweep)
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
        owns_log = not isinstance(store, EventLog)
        log = store if isinstance(store, EventLog) else EventLog(store)
        try:
            return cls(cfg, log, sid, owns_log=owns_log, transport=transport)
        except BaseException:
            if owns_log:  # nobody else holds it: its connections (and leases) go with it
                log.close()
            raise

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

    # --- Task API --------------------------------------------------------------------------

    def task_start(self, **payload: Any) -> TaskHandle:
        """Start a task. Schema errors raise `InvalidTaskArgs`; everything else ends as a
        task (completed or failed) in the log."""
        self.state.check_moved()
        return self.runner.start(parse_task_args(payload))

    def task_peek(self, task_id: str) -> TaskRecord:
        """The task's record now, whatever session started it; never blocks. A task left
        running by an orchestrator process that is gone is ended `failed` here, naming that
        process."""
        return self.state.peek(task_id)

    def task_await(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Block until the task finishes or `timeout` seconds pass; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.runner.done_event(task_id)
        if done is not None:  # ours: woken when it ends or is cancelled, no polling
            done.wait(timeout)
        while True:
            rec = self.task_peek(task_id)
            left = None if deadline is None else deadline - time.monotonic()
            if rec.status != "running" or (left is not None and left <= 0):
                return rec
            (done or threading.Event()).wait(AWAIT_POLL if left is None else min(AWAIT_POLL, left))

    def task_cancel(self, task_id: str) -> TaskRecord:
        """Cancel a running task: its provider request is interrupted and a late reply is
        dropped. A finished task is returned unchanged."""
        rec = self.task_peek(task_id)
        if rec.status == "running":
            self.runner.cancel(rec)
        return self.task_peek(task_id)

    def task_list(self, view: str = "tasks", **filters: Any) -> list[Any]:
        """Rows of a view: tasks, workers, registry, models, profiles, memory, events..."""
        return views.run(view, self.state, self.writer, **filters)

    # --- how AsyncOrchestrator wakes its awaits ------------------------------------------------

    def on_task_end(self, hook: Callable[[str], None]) -> None:
        """Call `hook(task_id)` (from the thread that ended it) whenever a task of this
        orchestrator ends; how `AsyncOrchestrator` wakes its awaits without a thread each."""
        self.runner.on_task_end(hook)

    def owns(self, task_id: str) -> bool:
        """Is the task running in this orchestrator (so its end wakes the hooks)?"""
        return self.runner.owns(task_id)
