"""The server backend: worker processes found or spawned through the device registry."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from events.catalogue import Event
from orchestrator.backends import (
    Cancelled,
    Lease,
    PromptRequest,
    StopResult,
    TaskError,
    WorkerProcess,
    as_process,
)
from orchestrator.backends.client import WorkerClient, WorkerReplyError, WorkerUnreachable
from orchestrator.backends.spec import WorkerSpec
from orchestrator.config import BackendKind, OrchestratorConfig
from orchestrator.pool import Acquired, WorkerPool
from orchestrator.processes import settled_state
from orchestrator.providers import (
    Completion,
    ProviderError,
    credentials_for,
    json_problem,
    redact,
    reply_limit,
    request_budget,
)

# Beyond the provider's own budget, what a loopback hop and a busy worker may add.
PROMPT_MARGIN = 10.0
# A worker whose connection broke may be exiting: this long for it to be gone.
EXIT_GRACE = 1.0
# A process that began draining between acquire and prompt: acquire again, this often.
DRAINING_RETRIES = 3


class ServerBackend:
    """Worker processes shared by every orchestrator of this host (and its sessions)."""

    kind: BackendKind = "server"

    def __init__(
        self,
        pool: WorkerPool,
        config: OrchestratorConfig,
        environ: Callable[[], Mapping[str, str]],
    ) -> None:
        self.pool = pool
        self.config = config
        self._environ = environ

    def acquire(
        self, spec: WorkerSpec, ids: dict[str, Any], force_new: bool, spawn: bool = True
    ) -> Lease | None:
        """Reuse a proven process with the spec's fingerprint, or spawn exactly one."""
        acquired = self.pool.get_or_spawn(
            spec,
            ids,
            force_new=force_new,
            spawn=spawn,
            idle_timeout=self.config.pool.idle_timeout,
            max_processes=self.config.pool.max_processes,
        )
        return None if acquired is None else _lease(acquired)

    def prompt(self, lease: Lease, request: PromptRequest, cancel: threading.Event) -> Completion:
        """Send the message (with the credentials it needs, read now) and accept the reply
        only from the process that was acquired."""
        assert lease.url is not None
        client = WorkerClient(lease.url, lease.instance_id, self.pool.transport)
        budget = request_budget(self.config.providers, request.model) + PROMPT_MARGIN
        credentials = credentials_for(self.config.providers, request.model, self._environ())
        max_reply = self.config.limits.max_reply
        body: dict[str, Any] = {
            "text": request.text,
            "model": request.model,
            "attachments": request.attachments,
            "tools": request.tools,
            "task_id": request.task_id,
            "credentials": credentials,
            "max_reply": max_reply,
        }
        secrets = list(credentials.values())
        if request.base_url is not None:  # a managed model's server
            body["base_url"] = request.base_url
        if request.messages is not None:
            body["messages"] = request.messages
        # On this thread: a cancel reaches the worker (`cancel`), which answers 409 at once.
        try:
            # Twice the provider's bound: the worker re-escapes the text (`\uXXXX`, and
            # a character beyond the BMP as two of them).
            reply = client.prompt(body, timeout=budget, max_bytes=2 * reply_limit(max_reply))
        except WorkerReplyError as exc:
            # The worker redacts what it sends; a key must not get through one that did not.
            message = redact(str(exc), secrets)
            if exc.status == 502:
                raise ProviderError(message, exc.retryable) from None
            if exc.status == 409:
                raise Cancelled() from None
            if exc.status == 503:
                raise Draining(message) from None
            self.pool.distrust(lease.instance_id)
            raise TaskError(
                f'Worker "{lease.worker_id}" process {lease.instance_id} (pid {lease.pid}) '
                f"refused the task: {message}"
            ) from None
        except WorkerUnreachable as exc:
            raise self._unreachable(lease, exc, budget) from None
        if reply.instance_id != lease.instance_id or reply.fingerprint != lease.fingerprint:
            self.pool.distrust(lease.instance_id)
            raise TaskError(
                f"The reply came from instance {reply.instance_id} (fingerprint "
                f"{reply.fingerprint}), not from {lease.instance_id} ({lease.fingerprint}) "
                "that was acquired: it is not accepted. Run the task again."
            )
        for name, value in (("text", reply.text), ("tool_calls", reply.tool_calls)):
            problem = json_problem(value, name)
            if problem:
                self.pool.distrust(lease.instance_id)
                raise TaskError(f"The worker's reply cannot be stored: {problem}.")
        self.pool.prove(lease.instance_id)
        return Completion(text=reply.text, tool_calls=reply.tool_calls, usage=reply.usage)

    def _unreachable(self, lease: Lease, exc: WorkerUnreachable, budget: float) -> TaskError:
        entry = self.pool.registry.refresh().entries.get(lease.instance_id)
        if not exc.timed_out and (exc.refused or self.pool.exit_marker(lease.instance_id)):
            # The prompt never reached it, or it was leaving by itself (idle, evicted,
            # drained: none of those leaves with a prompt in flight): acquire again. The
            # next acquisition records what became of it.
            self.pool.distrust(lease.instance_id)
            return Draining(f"process {lease.instance_id} left before the prompt reached it")
        if entry is None:
            return TaskError(str(exc))
        ids = {"session_id": entry.session_id, "worker_id": lease.worker_id}
        self.pool.reap_children()  # ours, killed: collected, so it reads as gone
        if settled_state(entry.pid, entry.pid_started_at, EXIT_GRACE) != "alive":
            self.pool.mark_exited(entry, ids, f"did not answer /prompt: {exc}")
            return TaskError(
                f'Worker "{lease.worker_id}" process {lease.instance_id} (pid {lease.pid}) '
                "stopped answering while serving this task; it is marked exited and the "
                "next request will spawn a fresh one."
            )
        self.pool.distrust(lease.instance_id)
        if exc.timed_out:
            return TaskError(
                f'Worker "{lease.worker_id}" process {lease.instance_id} (pid {lease.pid}) '
                f"did not reply within {budget:g} s (the provider's timeout and retries, plus "
                f"{PROMPT_MARGIN:g} s); the process is alive and left running."
            )
        return TaskError(
            f'Worker "{lease.worker_id}" process {lease.instance_id} (pid {lease.pid}) '
            f"is alive but its connection failed: {exc}. Run the task again; the next "
            "request checks its /health first."
        )

    def release(self, lease: Lease) -> tuple[Event, ...]:
        """A plain reuse's facts, deferred by the pool to be recorded with the task's end."""
        return lease.deferred

    def cancel(self, lease: Lease, task_id: str) -> None:
        """Tell the worker to drop the task's request: its prompt answers 409 at once."""
        if lease.url is not None:
            _tell_cancel(WorkerClient(lease.url, lease.instance_id, self.pool.transport), task_id)

    def cancel_anywhere(self, worker_id: str, task_id: str) -> None:
        """Cancel a task another orchestrator serves: which of the worker's processes on this
        host has it is not in the log until it ends, so each is told (a process without that
        task ignores it)."""
        for entry in self.pool.live_entries(worker_id):
            if entry.url is not None and entry.status in ("ready", "draining"):
                _tell_cancel(
                    WorkerClient(str(entry.url), entry.instance_id, self.pool.transport), task_id
                )

    def respawn(
        self, spec: WorkerSpec, ids: dict[str, Any], ready: Callable[[Lease], None]
    ) -> bool:
        """Take (or spawn) a process of the spec's fingerprint, hand it to `ready`, then
        drain the processes of another fingerprint this session used before, unless another
        session has used them too (ADR-0003, "Respawn")."""
        sid = ids["session_id"]
        before = [
            e
            for e in self.pool.live_entries(spec.worker_id)
            if e.status == "ready" and sid in e.sessions and e.fingerprint != spec.fingerprint
        ]
        lease = self.acquire(spec, ids, force_new=False, spawn=True)
        assert lease is not None
        ready(lease)
        for entry in before:
            if set(entry.sessions) <= {sid}:
                self.pool.retire(
                    entry, ids, detail=f"replaced by {lease.instance_id} for {spec.model}"
                )
        return True

    def stop(self, worker_id: str, ids: dict[str, Any]) -> StopResult:
        """Stop every live process of the worker on this host, whatever its recorded status;
        those found gone first are recorded so and listed as exited."""
        found = self.pool.settle_host(ids["session_id"], worker_id)
        stopped: list[str] = []
        exited: list[str] = [e.instance_id for e in found]
        for entry in self.pool.stoppable(worker_id):
            (stopped if self.pool.stop(entry, ids) else exited).append(entry.instance_id)
        return StopResult(stopped, exited)

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker recorded as running on this host?"""
        return bool(self.pool.live_entries(worker_id))

    def processes(self, worker_id: str) -> list[WorkerProcess]:
        """The worker's processes on this host recorded as running."""
        return [as_process(e) for e in self.pool.live_entries(worker_id)]


class Draining(TaskError):
    """The acquired process began draining (or left) before the prompt reached it: acquire
    again."""


def _tell_cancel(client: WorkerClient, task_id: str) -> None:
    try:
        client.cancel(task_id)
    except (WorkerUnreachable, WorkerReplyError):
        return  # the process is gone or busy: its late reply is dropped all the same


def _lease(acquired: Acquired) -> Lease:
    e = acquired.entry
    return Lease(
        worker_id=e.worker_id,
        instance_id=e.instance_id,
        pid=e.pid,
        url=e.url,
        fingerprint=e.fingerprint,
        model=e.model,
        model_policy=e.model_policy,
        reused=acquired.reused,
        reason=acquired.reason,
        deferred=acquired.deferred,
    )
