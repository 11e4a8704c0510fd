"""Managed model servers (ADR-0012): one server process per model of a managed provider,
started on first use, reused by every worker, session and orchestrator process of the host.

Two parts, like the worker pool:

- the decision, pure (`plan`, `room` in `decision`): a function of the registry state, the
  request and what probes said about each server (alive, busy, last used), as
  `orchestrator.reuse` is for worker processes;
- the I/O: getting a server (`ModelServers` in `servers`: decide, claim, make room, start,
  register while the claim stands), built on the servers the registry records
  (`RunningServers` in `running`: probe, stop, sweep); launching through the supervisor and
  polling the ready path (`launch`, `supervisor.py`); holding one for a request (`lease`);
  the server's files and port (`files`); what a server is comes from the configuration
  (`spec`).
"""

from __future__ import annotations

from orchestrator.model_servers.decision import (
    CLAIM_MARGIN,
    Room,
    ServerPlan,
    ServerProbe,
    ServerRequest,
    candidates,
    claim_abandoned,
    gone_event,
    pending_claim,
    plan,
    room,
)
from orchestrator.model_servers.files import free_port, read_log_tail, ready_probe
from orchestrator.model_servers.launch import LOG_TAIL, SUPERVISOR
from orchestrator.model_servers.lease import ServerLease
from orchestrator.model_servers.running import HEALTH_TIMEOUT, PROOF_LEASE
from orchestrator.model_servers.servers import ROOM_WAIT, WAIT_POLL, ModelServers
from orchestrator.model_servers.spec import (
    ModelServerError,
    ServerSpec,
    managed_commands,
    server_spec,
)

__all__ = [
    "CLAIM_MARGIN",
    "HEALTH_TIMEOUT",
    "LOG_TAIL",
    "PROOF_LEASE",
    "ROOM_WAIT",
    "SUPERVISOR",
    "WAIT_POLL",
    "ModelServerError",
    "ModelServers",
    "Room",
    "ServerLease",
    "ServerPlan",
    "ServerProbe",
    "ServerRequest",
    "ServerSpec",
    "candidates",
    "claim_abandoned",
    "free_port",
    "gone_event",
    "managed_commands",
    "pending_claim",
    "plan",
    "read_log_tail",
    "ready_probe",
    "room",
    "server_spec",
]
