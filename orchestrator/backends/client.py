"""The one client of a worker process's HTTP endpoints (see `orchestrator.worker`)."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator.errors import OrchestratorError
from orchestrator.processes import worker_token
from orchestrator.transport import (
    Request,
    Response,
    Transport,
    TransportError,
    TransportTimeout,
    TransportUnreachable,
    default_worker_transport,
)

# What a worker's answers other than /prompt take at most (a health record, a few fields).
CONTROL_REPLY_MAX = 1024 * 1024


class WorkerUnreachable(OrchestratorError, RuntimeError):
    """The worker process did not answer on its url (refused, reset or timed out)."""

    def __init__(self, message: str, timed_out: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.refused = refused  # no connection was made: the request never reached it


class WorkerReplyError(OrchestratorError, RuntimeError):
    """The worker process answered with an error, or with a body that breaks the protocol."""

    def __init__(self, message: str, status: int = 0, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class Health(BaseModel):
    """What `GET /health` answers."""

    worker_id: str
    instance_id: str
    pid: int
    fingerprint: str
    model: str
    status: str
    in_flight: int = 0
    adopted: bool = True


class PromptReply(BaseModel):
    """What `POST /prompt` answers: the reply and the process that made it."""

    text: str
    model: str
    instance_id: str
    fingerprint: str
    usage: dict[str, int] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class WorkerClient:
    """Authenticated calls to one worker process at `url`, known as `instance_id`."""

    def __init__(self, url: str, instance_id: str, transport: Transport | None = None) -> None:
        self.url = url
        self.instance_id = instance_id
        self.transport = transport or default_worker_transport()
        self._headers = [("Authorization", f"Bearer {worker_token(instance_id)}")]

    def health(self, timeout: float = 2.0) -> Health:
        """`GET /health`, validated."""
        return _parse(Health, self._call("GET", "/health", None, timeout), "/health")

    def prompt(self, body: dict[str, Any], timeout: float, max_bytes: int) -> PromptReply:
        """`POST /prompt`, validated; the caller checks the reply's instance and fingerprint.
        A reply over `max_bytes` is refused as it streams."""
        reply = self._call("POST", "/prompt", body, timeout, max_bytes)
        return _parse(PromptReply, reply, "/prompt")

    def cancel(self, task_id: str) -> None:
        """Ask the worker to drop the prompt of `task_id` (nothing happens if it has none)."""
        self._call("POST", "/cancel", {"task_id": task_id}, 2.0)

    def adopt(self) -> Health:
        """Tell the worker it is registered, so it stops watching its spawner."""
        return _parse(Health, self._call("POST", "/adopt", {}, 5.0), "/adopt")

    def drain(self, reason: str, unless_used_within: float | None = None) -> None:
        """No new prompts; exit once the running ones are done. With `unless_used_within`
        the worker refuses (`WorkerReplyError`, status 409) while a prompt is in flight or
        it was acquired or used that many seconds ago or less."""
        body: dict[str, Any] = {"reason": reason}
        if unless_used_within is not None:
            body["unless_used_within"] = unless_used_within
        self._call("POST", "/drain", body, 5.0)

    def shutdown(self) -> None:
        """Stop now."""
        self._call("POST", "/shutdown", {}, 2.0)

    def _call(
        self,
        method: Literal["GET", "POST"],
        path: str,
        body: dict[str, Any] | None,
        timeout: float,
        max_bytes: int = CONTROL_REPLY_MAX,
    ) -> dict[str, Any]:
        where = f"{self.url}{path}"
        headers = list(self._headers)
        content = b""
        if body is not None:
            headers.append(("Content-Type", "application/json"))
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            with self.transport.handle(Request(method, where, headers, content, timeout)) as resp:
                raw = _read(resp, max_bytes)
        except TransportTimeout as exc:
            raise WorkerUnreachable(f"{where}: no answer within {timeout:g} s", True) from exc
        except TransportUnreachable as exc:
            raise WorkerUnreachable(f"{where}: {exc}", refused=exc.refused) from exc
        except TransportError as exc:
            raise WorkerUnreachable(f"{where}: {exc}") from exc
        if raw is None:
            raise WorkerReplyError(f"{where} answered with more than {max_bytes:,} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if resp.status >= 400:
            detail = data.get("error") if isinstance(data, dict) else None
            retryable = bool(data.get("retryable")) if isinstance(data, dict) else False
            raise WorkerReplyError(
                str(detail or f"{where} answered HTTP {resp.status}"),
                resp.status,
                retryable,
            )
        if not isinstance(data, dict):
            raise WorkerReplyError(f"{where} answered with a body that is not a JSON object")
        return data


def _read(resp: Response, limit: int) -> bytes | None:
    """The body, read as it streams; None once it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], data: dict[str, Any], path: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors())
        raise WorkerReplyError(
            f"the worker's {path} reply breaks the protocol (bad or missing: {fields})"
        ) from None
