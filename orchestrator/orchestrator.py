"""The Orchestrator: the Task API over one session of the event log."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from events.catalogue import (
    Event,
    ModelResolved,
    SessionOpened,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
)
from events.logs import get_logger
from events.projections import (
    MemoryState,
    SessionState,
    TaskRecord,
    apply_memory,
    apply_session,
)
from events.store import EventLog
from events.streams import StreamView, append_together
from orchestrator import ops, views
from orchestrator.api import InvalidTaskArgs, TaskHandle, TaskStartArgs, parse_task_args
from orchestrator.config import OrchestratorConfig, ProfileConfig, load_config
from orchestrator.fingerprint import fingerprint
from orchestrator.pool import WorkerPool, WorkerSpec
from orchestrator.processes import WorkerReplyError, WorkerUnreachable, host_id, worker_call
from orchestrator.providers import ProviderError, complete
from orchestrator.resolver import (
    CatalogueModel,
    ModelDecision,
    ResolutionError,
    build_catalogue,
    check_worker,
    decide_model,
    did_you_mean,
)

AWAIT_POLL = 0.05
_log = get_logger("orchestrator")


class AgentWorker(BaseModel):
    """An in-process worker: lives and dies with this orchestrator."""

    worker_id: str
    instance_id: str
    fingerprint: str
    model: str


class Orchestrator:
    """One session's view of the pool, driven only through the Task API."""

    def __init__(
        self, config: OrchestratorConfig, log: EventLog, session_id: str, owns_log: bool
    ) -> None:
        self.config = config
        self.log = log
        self.session_id = session_id
        self._owns_log = owns_log
        self.session = session_view(log, session_id)
        self.memory = StreamView(log, MEMORY_STREAM, MemoryState, apply_memory)
        self.pool = WorkerPool(log)
        self.agents: dict[str, AgentWorker] = {}
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="task")
        self._futures: dict[str, Future[None]] = {}
        self._closed = False
        self._opened_recorded = False

    @classmethod
    def open(
        cls,
        config: OrchestratorConfig | dict[str, Any] | str | Path | None = None,
        store: str | EventLog | None = None,
        session_id: str | None = None,
    ) -> Orchestrator:
        """Open a session on a store: a new one (`session_id=None`) or a resumed one."""
        cfg = load_config(config)
        log = store if isinstance(store, EventLog) else EventLog(store)
        sid = session_id or f"s-{uuid.uuid4().hex[:10]}"
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
        reuse unless `stop_workers`; agent workers end here."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        if stop_workers:
            for entry in self.pool.live_entries():
                if entry.instance_id in self.pool.started_here:
                    self.pool.stop(
                        entry,
                        {"session_id": self.session_id, "worker_id": entry.worker_id},
                        reason="orchestrator closed",
                    )
        self.agents.clear()
        self.pool.reap_children()
        if self._owns_log:
            self.log.close()

    # --- the log ---------------------------------------------------------------------------

    def record(self, *events: Event, memory: Sequence[Event] = ()) -> None:
        """Append facts to this session's stream (and the memory stream) in one transaction,
        retrying past other writers. The first write of this orchestrator also records
        `SessionOpened`, so merely looking (views, CLI inspection) leaves the log unchanged."""
        batch = list(events)
        with self.session.lock:
            if not self._opened_recorded:
                self.session.refresh()
                opened = SessionOpened(
                    session_id=self.session_id,
                    resumed=self.session.version > 0,
                    host=host_id(),
                    pid=os.getpid(),
                )
                batch.insert(0, opened)
                self._opened_recorded = True
            append_together((self.session, batch), (self.memory, list(memory)))

    def catalogue(self) -> list[CatalogueModel]:
        """The model catalogue, with usability read from the environment now."""
        return build_catalogue(self.config, os.environ)

    # --- Task API --------------------------------------------------------------------------

    def task_start(self, **payload: Any) -> TaskHandle:
        """Start a task. Schema errors raise `InvalidTaskArgs`; everything else ends as a
        task (completed or failed) in the log."""
        args = parse_task_args(payload)
        task_id = f"t-{uuid.uuid4().hex[:12]}"
        worker_id = args.worker_id if args.kind == "worker" else _op_worker(args)
        # Recorded together with the first decision about the task, never alone.
        started = TaskStarted(
            session_id=self.session_id,
            task_id=task_id,
            worker_id=worker_id,
            kind=args.kind,
            op=args.op,
            args=args.model_dump(mode="json", exclude_none=True),
        )
        if args.kind == "op":
            self._run_op(task_id, args, started)
        else:
            self._start_worker_task(task_id, args, started)
        return TaskHandle(task_id=task_id, status=self.task_peek(task_id).status)

    def task_peek(self, task_id: str) -> TaskRecord:
        """The task's record now; never blocks."""
        task = self.session.refresh().tasks.get(task_id)
        if task is not None:
            return task.model_copy()
        return views.foreign_task(self, task_id)

    def task_await(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Block until the task finishes or `timeout` seconds pass; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        future = self._futures.get(task_id)
        if future is not None:
            wait([future], timeout=timeout)  # returns on time-out; the task's errors are logged
        while True:
            rec = self.task_peek(task_id)
            if rec.status != "running" or (deadline is not None and time.monotonic() >= deadline):
                return rec
            time.sleep(AWAIT_POLL)

    def task_cancel(self, task_id: str) -> TaskRecord:
        """Cancel a running task; a finished one is returned unchanged."""
        rec = self.task_peek(task_id)
        if rec.status == "running":
            self._record_other_session(
                rec.session_id,
                TaskCancelled(session_id=rec.session_id, task_id=task_id, worker_id=rec.worker_id),
            )
        return self.task_peek(task_id)

    def task_list(self, view: str = "tasks", **filters: Any) -> list[Any]:
        """Rows of a view: tasks, workers, registry, models, profiles, memory, events."""
        handler = views.VIEWS.get(view)
        if handler is None:
            raise InvalidTaskArgs(
                f'Invalid task_list arguments: view: unknown view "{view}".'
                + did_you_mean(view, views.VIEWS)
            )
        return handler(self, **filters)

    # --- worker tasks ----------------------------------------------------------------------

    def profile(self, worker_id: str) -> ProfileConfig:
        """The profile of a known worker id (raises `ResolutionError` with suggestions)."""
        return check_worker(worker_id, self.config)

    def session_decision(self, worker_id: str) -> ModelDecision:
        """The model this session's worker uses when a task names none."""
        override = self.session.refresh().overrides.get(worker_id)
        return decide_model(worker_id, None, override, self.config, self.catalogue())

    def worker_spec(self, worker_id: str, decision: ModelDecision) -> WorkerSpec:
        """The process a session-level decision asks for."""
        profile = self.profile(worker_id)
        return WorkerSpec(
            worker_id=worker_id,
            model=decision.resolved_model,
            model_policy=decision.model_policy,
            fingerprint=fingerprint(
                worker_id, profile.backend, decision.resolved_model, decision.model_policy, profile
            ),
            system_prompt=profile.system_prompt,
            config=self.config,
        )

    def _start_worker_task(self, task_id: str, args: TaskStartArgs, started: TaskStarted) -> None:
        worker_id = str(args.worker_id)
        ids = {"session_id": self.session_id, "task_id": task_id, "worker_id": worker_id}
        catalogue = self.catalogue()
        try:
            override = self.session.refresh().overrides.get(worker_id)
            # The process is chosen by the session-level model; a task's own model only
            # travels with its message.
            task_level = (
                decide_model(worker_id, args.model, override, self.config, catalogue)
                if args.model
                else None
            )
            session_level = decide_model(worker_id, None, override, self.config, catalogue)
            decision = task_level or session_level
            spec = self.worker_spec(worker_id, session_level)
        except ResolutionError as exc:
            self.record(started, TaskFailed(**ids, error=str(exc)))
            return
        self.record(
            started, ModelResolved(**ids, **decision.model_dump(), fingerprint=spec.fingerprint)
        )
        self._submit(task_id, lambda: self._serve(task_id, args, decision, spec))

    def _submit(self, task_id: str, work: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - a bug must still end the task, visibly
                _log.exception("task crashed", task_id=task_id)
                self._finish(
                    task_id,
                    TaskFailed(
                        session_id=self.session_id,
                        task_id=task_id,
                        error=f"internal error: {exc!r}",
                    ),
                )

        self._futures[task_id] = self._executor.submit(guarded)

    def _serve(
        self, task_id: str, args: TaskStartArgs, decision: ModelDecision, spec: WorkerSpec
    ) -> None:
        ids = {"session_id": self.session_id, "task_id": task_id, "worker_id": spec.worker_id}
        text = str(args.task)
        model = decision.resolved_model
        try:
            if self.profile(spec.worker_id).backend == "agent":
                agent, _ = self.agent_for(spec, force_new=args.force_new)
                reply = complete(self.config, model, text, spec.system_prompt)
                done: Event = TaskCompleted(
                    **ids,
                    model=model,
                    response=reply,
                    instance_id=agent.instance_id,
                    pid=os.getpid(),
                )
            else:
                done = self._serve_on_server(ids, args, model, spec)
        except (ProviderError, ResolutionError, RuntimeError) as exc:
            self._finish(task_id, TaskFailed(**ids, error=str(exc)))
            return
        self._finish(task_id, done)

    def _serve_on_server(
        self, ids: dict[str, Any], args: TaskStartArgs, model: str, spec: WorkerSpec
    ) -> Event:
        acquired = self.pool.get_or_spawn(
            spec, self.session_id, ids["task_id"], force_new=args.force_new, spawn=args.auto_spawn
        )
        if acquired is None:
            return TaskFailed(
                **ids,
                error=(
                    f'Worker "{spec.worker_id}" has no running process for this session\'s model '
                    f"{spec.model} and auto_spawn is false: start one with the worker.spawn op, "
                    "or pass auto_spawn=true."
                ),
            )
        entry = acquired.entry
        try:
            body = worker_call(
                str(entry.url),
                entry.instance_id,
                "POST",
                "/prompt",
                {"text": args.task, "model": model, "attachments": args.attachments},
            )
        except WorkerUnreachable as exc:
            self.pool.mark_exited(entry, ids, f"did not answer /prompt: {exc}")
            return TaskFailed(
                **ids,
                error=(
                    f'Worker "{spec.worker_id}" process {entry.instance_id} (pid {entry.pid}) '
                    "stopped answering while serving this task; it is marked exited and the "
                    "next request will spawn a fresh one."
                ),
            )
        except WorkerReplyError as exc:
            return TaskFailed(**ids, error=str(exc))
        return TaskCompleted(
            **ids,
            model=body["model"],
            response=body["text"],
            instance_id=entry.instance_id,
            pid=entry.pid,
        )

    def agent_for(self, spec: WorkerSpec, force_new: bool = False) -> tuple[AgentWorker, bool]:
        """The in-process worker for a spec and whether it was reused; replaced when the
        fingerprint changes or `force_new` asks for it."""
        agent = self.agents.get(spec.worker_id)
        if agent is not None and agent.fingerprint == spec.fingerprint and not force_new:
            return agent, True
        agent = AgentWorker(
            worker_id=spec.worker_id,
            instance_id=f"agent-{spec.worker_id}-{uuid.uuid4().hex[:8]}",
            fingerprint=spec.fingerprint,
            model=spec.model,
        )
        self.agents[spec.worker_id] = agent
        return agent, False

    def _finish(self, task_id: str, event: Event) -> None:
        with self.session.lock:
            if self.session.refresh().tasks[task_id].status != "running":
                return  # cancelled meanwhile: the caller was told, the late result is dropped
            self.record(event)

    # --- ops -------------------------------------------------------------------------------

    def _run_op(self, task_id: str, args: TaskStartArgs, started: TaskStarted) -> None:
        ids = {"session_id": self.session_id, "task_id": task_id, "worker_id": _op_worker(args)}
        try:
            outcome = ops.run(self, task_id, args)
        except (ResolutionError, RuntimeError) as exc:
            self.record(started, TaskFailed(**ids, error=str(exc)))
            return
        if outcome.then is None:  # a pure decision: one atomic append says it all
            self.record(
                started,
                *outcome.events,
                TaskCompleted(**ids, result=outcome.result),
                memory=outcome.memory,
            )
            return
        # Side effects (processes) follow the decision, so the log shows it first.
        self.record(started, *outcome.events, memory=outcome.memory)
        try:
            result = outcome.then()
        except (ResolutionError, RuntimeError) as exc:
            self.record(TaskFailed(**ids, error=str(exc)))
            return
        self.record(TaskCompleted(**ids, result=result))

    def _record_other_session(self, session_id: str, event: Event) -> None:
        if session_id == self.session_id:
            self.record(event)
            return
        session_view(self.log, session_id).append([event])


MEMORY_STREAM = "memory"


def session_view(log: EventLog, session_id: str) -> StreamView[SessionState]:
    """The live state of one session's stream."""
    return StreamView(
        log, f"session:{session_id}", lambda: SessionState(session_id=session_id), apply_session
    )


def _op_worker(args: TaskStartArgs) -> str | None:
    return args.worker.worker_id if args.worker else None
