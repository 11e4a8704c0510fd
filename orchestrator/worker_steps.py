"""What an op's `act` step may do with worker processes (`ops.Workers`): spawn, stop and
respawn a worker's process, after the op's decision is in the log. Only through the
backends (`backends.bundle.Backends` and each `Backend`): the steps know no pool."""

from __future__ import annotations

from orchestrator import ops
from orchestrator.backends import Lease
from orchestrator.backends.bundle import Backends
from orchestrator.session import Session


class WorkerSteps:
    """The `ops.Workers` of one session, on its backends."""

    def __init__(self, session: Session, backends: Backends) -> None:
        self.session = session
        self.backends = backends

    def running(self, worker_id: str) -> bool:
        """Is a process of the worker running (on its backend)?"""
        return self.backends.running(worker_id)

    def spawn(self, worker_id: str, task_id: str, force_new: bool) -> ops.Result:
        """Get (reuse) or start the worker's process for this session's model."""
        session = self.session
        spec = session.worker_spec(worker_id, session.session_decision(worker_id))
        ids = session.ids(task_id, worker_id)
        backend = self.backends.of(worker_id)
        lease = backend.acquire(spec, ids, force_new, True)
        assert lease is not None
        self.backends.release((backend, lease), session.record)
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
        # Its processes found gone are recorded first, and listed as already gone.
        result = self.backends.stop(worker_id, self.session.ids(task_id, worker_id))
        return {"worker_id": worker_id, "stopped": result.stopped, "exited": result.exited}

    def respawn(self, worker_id: str, task_id: str) -> bool:
        """Start now the process the session's (new) model asks for, then retire the process
        this session used before, unless another session has used it (ADR-0003, "Respawn")."""
        session, backends = self.session, self.backends
        spec = session.worker_spec(worker_id, session.session_decision(worker_id))
        ids = session.ids(task_id, worker_id)
        backend = backends.of(worker_id)

        def ready(lease: Lease) -> None:
            backends.release((backend, lease), session.record)
            backends.warm(spec.model, ids)  # a managed model's server, so no task waits

        return backend.respawn(spec, ids, ready)
