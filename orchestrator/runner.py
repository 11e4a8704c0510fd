"""The act side: starts a session's tasks and runs them on its backends.

`start` checks a task's arguments against the limits and builds its `TaskStarted`. A
`TaskRunner` decides a worker task's model through the `Session` (recorded before any
process is touched), then serves it on a pool thread: the fallback chain, cooldown
counting, a managed model's server held while the request runs. Each running task has
one `RunningTask` record, and `finish()` is its only way out: the end event, the registry
facts of the process that served it (also for a task cancelled mid-request), the span,
the clean-up and the wake-up happen there, exactly once. Ops run here too: decided
through the session, then their `act` step against `WorkerSteps` (`ops.Workers`).

Over 400 lines on purpose: a task's whole path, from its decision to its one exit, is kept
in one module so every way a task can end is read in one place.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import orjson

from events.catalogue import (
    Event,
    ModelAttemptFailed,
    ModelCooledDown,
    ModelResolved,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskQueued,
    TaskStarted,
    utcnow,
)
from events.logs import get_logger
from events.projections import Override, TaskRecord
from events.store import Filter, StoreMoved, record_from
from orchestrator import conversation, ops, telemetry
from orchestrator.api import TaskHandle, TaskStartArgs, recorded_args, round_cost
from orchestrator.backends import Backend, Cancelled, Lease, PromptRequest, TaskError
from orchestrator.backends.bundle import Backends
from orchestrator.backends.server import DRAINING_RETRIES, Draining
from orchestrator.backends.spec import WorkerSpec
from orchestrator.conversation import ConversationError, Parent
from orchestrator.errors import OrchestratorError
from orchestrator.explain import OverrideCause
from orchestrator.processes import own_identity
from orchestrator.providers import Completion, ProviderError, internal_error
from orchestrator.resolver import (
    CatalogueModel,
    ModelDecision,
    ResolutionError,
    attempt_chain,
    decide_model,
)
from orchestrator.session import Session
from orchestrator.worker_steps import WorkerSteps

_log = get_logger("orchestrator")


@dataclass
class RunningTask:
    """One worker task of this orchestrator, from its start to `TaskRunner.finish`."""

    task_id: str
    done: threading.Event = field(default_factory=threading.Event)  # set when it ended
    cancel: threading.Event = field(default_factory=threading.Event)
    lease: tuple[Backend, Lease] | None = None  # the process serving it, once acquired
    traced: tuple[int, Override | None] | None = None  # (start position, override): its span
    slot: bool = False  # counted among the busy slots


class TaskRunner:
    """Runs one session's tasks (see the module docstring)."""

    def __init__(self, session: Session, backends: Backends) -> None:
        self.session = session
        self.backends = backends
        self.slots = session.config.pool.max_concurrency
        self._executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="task")
        self._lock = threading.Lock()
        self._busy = 0
        self._tasks: dict[str, RunningTask] = {}
        self._failures: dict[str, list[datetime]] = {}
        self._end_hooks: list[Callable[[str], None]] = []
        self.steps = WorkerSteps(session, backends)

    def close(self) -> None:
        """Wait for the running tasks to end."""
        self._executor.shutdown(wait=True)

    # --- the running tasks -----------------------------------------------------------------

    def on_task_end(self, hook: Callable[[str], None]) -> None:
        """Call `hook(task_id)` (from the thread that ended it) whenever a task ends."""
        self._end_hooks.append(hook)

    def owns(self, task_id: str) -> bool:
        """Is the task running here and not yet ended (so its end wakes the hooks)?"""
        run = self._tasks.get(task_id)
        return run is not None and not run.done.is_set()

    def done_event(self, task_id: str) -> threading.Event | None:
        """What to wait on for a task running here (None: not ours, or ended)."""
        run = self._tasks.get(task_id)
        return run.done if run is not None else None

    def _wake(self, task_id: str, run: RunningTask | None = None) -> None:
        """The task ended (its end is in the log): wake whoever awaits it, and the hooks."""
        if run is not None:
            if run.done.is_set():
                return
            run.done.set()
        for hook in self._end_hooks:
            hook(task_id)

    def finish(self, run: RunningTask, event: Event | None) -> None:
        """The only exit of a running task: record its end `event` (None: already recorded,
        or none to record) with the registry facts of the process that served it, emit its
        span, free its slot and wake its waiters. A task cancelled meanwhile keeps its
        cancel (the fold lets the first terminal event win) but its registry facts are
        still recorded."""
        try:
            end = () if event is None or run.cancel.is_set() else (event,)
            # The store moved: nowhere to record anything (every later call says so).
            moved = self.session.moved is not None
            record = None if moved else self.session.record
            # The backends add the facts they owe and record it all in one write.
            self.backends.release(run.lease, record, *end, task_id=run.task_id)
            if moved or not end:
                return
            if run.traced is not None:
                self._emit_span(run.task_id, *run.traced)
        finally:
            with self._lock:
                self._tasks.pop(run.task_id, None)
                if run.slot:
                    run.slot = False
                    self._busy -= 1
            self._wake(run.task_id, run)

    def cancel(self, rec: TaskRecord) -> None:
        """Cancel a running task (of any orchestrator): record it, then interrupt its
        request where it runs; its waiters are woken now."""
        self.session.record(
            TaskCancelled(session_id=rec.session_id, task_id=rec.task_id, worker_id=rec.worker_id)
        )
        run = self._tasks.get(rec.task_id)
        if run is not None:  # ours: stop waiting, and tell its process if it has one
            run.cancel.set()
            if run.lease is not None:
                backend, lease = run.lease
                backend.cancel(lease, rec.task_id)
            self._wake(rec.task_id, run)
        else:
            if rec.kind == "worker" and rec.worker_id is not None:
                # Another orchestrator's task: its request is interrupted where it runs.
                self.backends.cancel_anywhere(str(rec.worker_id), rec.task_id)
            self._wake(rec.task_id)

    def _take_slot(self, run: RunningTask) -> int | None:
        """Count a task in; the number of tasks ahead of it when every slot is busy."""
        with self._lock:
            self._busy += 1
            run.slot = True
            ahead = self._busy - self.slots
        return ahead if ahead > 0 else None

    def _submit(self, run: RunningTask, ids: dict[str, Any], work: Callable[[], Event]) -> None:
        def guarded() -> None:
            event: Event | None
            try:
                event = work()
            except Cancelled:
                event = None  # recorded by task_cancel; the late reply, if any, is dropped
            except StoreMoved:
                event = None  # nowhere to record it: every later call says so
            except OrchestratorError as exc:
                event = TaskFailed(**ids, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must still end the task, visibly
                event = TaskFailed(**ids, error=self._bug("task crashed", run.task_id, exc))
            try:
                self.finish(run, event)
            except StoreMoved:
                pass
            except Exception as exc:  # noqa: BLE001 - the end could not be recorded: a bug
                self._bug("task end not recorded", run.task_id, exc)

        self._executor.submit(telemetry.in_callers_context(guarded))

    @staticmethod
    def _bug(what: str, task_id: str, exc: Exception) -> str:
        # One line: a traceback's frames (or its message) may hold a credential.
        error = internal_error(exc)
        _log.error(what, task_id=task_id, error=error, bug=True)
        return error

    def start(self, args: TaskStartArgs) -> TaskHandle:
        """Start a task from parsed arguments (checked against the limits here): an op runs
        to its end before this returns, a worker task is decided here and served on a pool
        thread. Its `TaskStarted` is recorded with the first decision about it, never alone."""
        session = self.session
        recorded = recorded_args(args, session.config.limits.max_text)
        task_id = f"t-{uuid.uuid4().hex[:12]}"
        pid, started_at = own_identity()
        op_worker = args.worker.worker_id if args.worker else None
        started = TaskStarted(
            session_id=session.session_id,
            task_id=task_id,
            worker_id=args.worker_id if args.kind == "worker" else op_worker,
            kind=args.kind,
            op=args.op,
            args=recorded,
            host=session.host,
            pid=pid,
            pid_started_at=started_at,
        )
        if args.kind == "op":
            self.run_op(args, started)
        else:
            self.start_worker(args, started)
        # Our own appends are folded already: no read needed for the status.
        task = session.view.state.task(task_id)
        return TaskHandle(task_id=task_id, status=task.status if task else "completed")

    # --- worker tasks ----------------------------------------------------------------------

    def start_worker(self, args: TaskStartArgs, started: TaskStarted) -> None:
        """Decide the task's model and process (recorded with `started`), then serve it on a
        pool thread; a task that cannot be decided ends failed here."""
        task_id = started.task_id
        assert task_id is not None
        run = self._tasks[task_id] = RunningTask(task_id)
        worker_id = str(args.worker_id)
        session = self.session
        ids = session.ids(task_id, worker_id)
        parent: Parent | None = None
        if args.continue_from is not None:
            try:
                parent = conversation.read_parent(session.log, args.continue_from)
                results = [r.model_dump() for r in args.tool_results or ()]
                conversation.check_tool_results(parent, results)
            except ConversationError as exc:
                failed = session.record(started, TaskFailed(**ids, error=str(exc)))
                if telemetry.enabled():
                    self._emit_span(task_id, min(failed), None)
                self.finish(run, None)
                return
            # The turns before this one, by id: its history is read back through the index.
            started = started.model_copy(update={"conversation": parent.chain})
        catalogue = session.catalogue()

        def attempt(
            version: int,
        ) -> tuple[ModelDecision, WorkerSpec, Override | None, list[int]] | None:
            try:
                override = session.override(worker_id)
                # The process is chosen by the session-level model; a task's own model only
                # travels with its message.
                session_level = decide_model(worker_id, None, override, session.config, catalogue)
                decision = (
                    decide_model(worker_id, args.model, override, session.config, catalogue)
                    if args.model
                    else session_level
                )
                spec = session.worker_spec(worker_id, session_level)
            except ResolutionError as exc:
                failed = session.record(started, TaskFailed(**ids, error=str(exc)), decided=version)
                if telemetry.enabled():  # no model was chosen, but the task still has its span
                    self._emit_span(task_id, min(failed), None)
                return None
            resolved = ModelResolved(
                **ids,
                **decision.model_dump(),
                fingerprint=spec.fingerprint,
                config_digest=session.config_digest(catalogue),
            )
            positions = session.record(started, resolved, *extra, decided=version)
            return decision, spec, override, positions

        queued = self._take_slot(run)
        extra: list[Event] = []
        if queued is not None:
            extra.append(TaskQueued(**ids, slots=self.slots, ahead=queued))
        try:
            decided = session.decide(attempt)
        except BaseException:
            self.finish(run, None)
            raise
        if decided is None:
            self.finish(run, None)
            return
        decision, spec, override, positions = decided
        if telemetry.enabled():
            run.traced = (min(positions), override)
        self._submit(
            run, ids, lambda: self._serve(run, ids, args, decision, spec, catalogue, parent)
        )

    def _serve(
        self,
        run: RunningTask,
        ids: dict[str, Any],
        args: TaskStartArgs,
        decision: ModelDecision,
        spec: WorkerSpec,
        catalogue: list[CatalogueModel],
        parent: Parent | None,
    ) -> Event:
        """Serve a worker task on the catalogue its model was decided with (one build per
        task: fallbacks and the price come from the same one); its end event. A continued
        conversation's history is read from the log here, and fitted to each model tried."""
        session = self.session
        chain, skipped = attempt_chain(
            decision,
            session.profile(spec.worker_id),
            session.config,
            catalogue,
            session.models.refresh().cooled,
            utcnow(),
        )
        if not chain:
            error = "Every model for this task is cooling down: " + "; ".join(skipped)
            return TaskFailed(**ids, error=error)
        request = PromptRequest(
            task_id=run.task_id,
            text=args.task or "",
            model=chain[0],
            system_prompt=spec.system_prompt,
            attachments=list(args.attachments),
            tools=args.tools,
        )
        shape = self._shaper(request, ids, catalogue, args, parent)
        lease, served, completion = self._serve_chain(run, spec, ids, args, shape, chain)
        if lease is None:
            return TaskFailed(**ids, error=_no_process(spec))
        limit = session.config.limits.max_reply
        if len(completion.text) > limit:
            error = (
                f"The reply of {served} is {len(completion.text):,} characters; the limit is "
                f"{limit:,}. Ask for a shorter answer."
            )
            return TaskFailed(**ids, error=error)
        return TaskCompleted(
            **ids,
            model=served,
            response=completion.text,
            instance_id=lease.instance_id,
            pid=lease.pid,
            reused=lease.reused,
            usage=_usage(catalogue, served, completion),
            tool_calls=completion.tool_calls,
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
        turns = conversation.history(self.session.log, parent)
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
                self.session.record(conversation.trimmed_event(ids, model, context, fitted))
            return replace(request, model=model, messages=fitted.messages)

        return shape

    def _serve_chain(
        self,
        run: RunningTask,
        spec: WorkerSpec,
        ids: dict[str, Any],
        args: TaskStartArgs,
        shape: Callable[[str], PromptRequest],
        chain: list[str],
    ) -> tuple[Lease | None, str, Completion]:
        """Try the models in order on one process: a retryable failure moves on to the next
        (each recorded `ModelAttemptFailed`), any other ends the task."""
        backend = self.backends.of(spec.worker_id)
        last: ProviderError | None = None
        for model in chain:
            request = shape(model)
            for _ in range(DRAINING_RETRIES):
                lease = backend.acquire(spec, ids, args.force_new, args.auto_spawn)
                if lease is None:
                    return None, model, Completion(text="")
                run.lease = (backend, lease)
                if run.cancel.is_set():
                    raise Cancelled()
                try:
                    # A managed model's server is held (never evicted) while the request runs.
                    with contextlib.ExitStack() as held:
                        server = self.backends.servers.acquire(model, ids)
                        base_url = None
                        if server is not None:
                            held.enter_context(server)
                            base_url = server.base_url
                        completion = backend.prompt(
                            lease, replace(request, base_url=base_url), run.cancel
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
        self.session.record(
            ModelAttemptFailed(**ids, model=model, error=str(exc), retryable=exc.retryable)
        )
        if not exc.retryable:
            return
        pool = self.session.config.pool
        now = utcnow()
        with self._lock:
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
        self.session.record(
            ModelCooledDown(
                session_id=self.session.session_id, model=model, until=until, reason=reason
            )
        )

    def _emit_span(self, task_id: str, since: int, override: Override | None) -> None:
        """The task's span, built from its events in the log since it started (the same
        builder `export-otel` uses, so live and exported spans agree)."""
        log = self.session.log
        chain = [record_from(*e) for e in log.select(Filter(task_id=task_id), after=since - 1)]
        cause = None
        if override is not None:
            cause = OverrideCause(
                position=0,
                timestamp=override.set_at,
                session_id=self.session.session_id,
                model_ref=override.model_ref,
                resolved_model=override.resolved_model,
                model_policy=override.model_policy,
                reason=override.reason,
            )
        span = telemetry.task_span(chain, cause)
        if span is not None:
            telemetry.emit([span])

    # --- ops -------------------------------------------------------------------------------

    def run_op(self, args: TaskStartArgs, started: TaskStarted) -> None:
        """Decide an op on the session and record it with `started`; then run its `act`
        step, if any, and record how it ended. Ends before returning."""
        task_id = str(started.task_id)
        session = self.session
        ids = session.ids(task_id, started.worker_id)

        def attempt(version: int) -> ops.Decision | None:
            try:
                decision = ops.decide(session, task_id, args)
            except (ResolutionError, ops.OpError) as exc:
                session.record(started, TaskFailed(**ids, error=str(exc)), decided=version)
                return None
            if decision.act is None:  # a pure decision: one atomic append says it all
                ended = TaskCompleted(**ids, result=decision.result)
                session.record(started, *decision.events, ended, decided=version)
                return None
            # Side effects (processes) follow the decision, so the log shows it first.
            session.record(started, *decision.events, decided=version)
            return decision

        try:
            decision = session.decide(attempt)
            if decision is None or decision.act is None:
                return
            try:
                result = decision.act(self.steps)
            except OrchestratorError as exc:
                session.record(TaskFailed(**ids, error=str(exc)))
                return
            except Exception as exc:  # noqa: BLE001 - a bug must end the op task, visibly
                session.record(TaskFailed(**ids, error=self._bug("op crashed", task_id, exc)))
                return
            session.record(TaskCompleted(**ids, result=result))
        finally:
            self._wake(task_id)


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
