"""A server worker process: `python -m orchestrator.worker`.

Listens on 127.0.0.1 at an ephemeral port, requires its bearer token (from the environment,
never argv), prints one `READY {json}` line, then serves (HTTP/1.1, keep-alive):

- `GET /health` -> `{worker_id, instance_id, pid, fingerprint, model, status, in_flight}`
- `POST /prompt` `{text, model, attachments?, tools?, credentials?, task_id?, messages?}` ->
  `{text, model, instance_id, fingerprint, usage, tool_calls}`
- `POST /cancel` `{task_id}`: the prompt of that task answers 409 at once
- `POST /adopt`: the spawner has registered this process (until then it watches its parent)
- `POST /drain` `{reason}`: take no new prompts, finish the running ones, then exit
- `POST /shutdown`

Its environment holds no API key: each `/prompt` brings the credentials it needs. When it
exits on its own (idle, drained, spawner gone) it leaves `<instance_id>.exit` in its log
directory with the reason, so whoever finds it gone records why.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

# The constant-time comparison `hmac.compare_digest` falls back to, without hmac's import
# of OpenSSL (3 ms of a worker's start-up).
from _operator import _compare_digest as compare_digest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.providers import Completion, ProviderError, ProviderSettings, complete
from orchestrator.worker_env import SPEC_ENV, TOKEN_ENV

TYPE_CHECKING = False  # `typing` is for the type checker only: no import at start-up
if TYPE_CHECKING:
    from typing import Any

ADOPT_TIMEOUT = 60.0  # a spawner that has not registered us by then is not coming back
WATCH_EVERY = 0.1
MAX_BODY = 64 * 1024 * 1024
IDLE_CONNECTION = 30.0  # seconds a client connection may sit without sending a request


class WorkerServer(ThreadingHTTPServer):
    """The HTTP server of one worker, holding what it needs to answer."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, spec: dict[str, Any], token: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.spec = spec
        self.token = token
        # Plain values its spawner validated already: no config models to import or build.
        self.providers = {
            pid: ProviderSettings(**settings) for pid, settings in spec["providers"].items()
        }
        self.last_used = time.monotonic()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.draining: str | None = None
        self.adopted = threading.Event()
        self.cancels: dict[str, threading.Event] = {}

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def health(self) -> dict[str, Any]:
        """What `/health` answers."""
        return {
            "worker_id": self.spec["worker_id"],
            "instance_id": self.spec["instance_id"],
            "pid": os.getpid(),
            "fingerprint": self.spec["fingerprint"],
            "model": self.spec["model"],
            "status": "draining" if self.draining else "ready",
            "in_flight": self.in_flight,
            "adopted": self.adopted.is_set(),
        }

    def exit_on_own(self, reason: str) -> None:
        """Leave the reason for whoever finds this process gone, then stop serving."""
        marker = Path(self.spec["log_dir"]) / f"{self.spec['instance_id']}.exit"
        fd = os.open(marker, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(reason)
        threading.Thread(target=self.shutdown, daemon=True).start()

    def finish_one(self) -> None:
        """A prompt ended: a draining worker with nothing left to do exits."""
        with self.lock:
            self.in_flight -= 1
            self.last_used = time.monotonic()
            done = self.draining is not None and self.in_flight == 0
        if done:
            self.exit_on_own(str(self.draining))


class BadRequest(OrchestratorError, ValueError):
    """A request body that breaks the endpoint's contract."""


class Handler(BaseHTTPRequestHandler):
    """Routes the endpoints; every one needs the bearer token."""

    server: WorkerServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("worker: " + (format % args) + "\n")

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        given = self.headers.get("Authorization", "")
        ok = compare_digest(given.encode(), f"Bearer {self.server.token}".encode())
        if not ok:
            self._drain_body()
            self._reply(401, {"error": "missing or wrong bearer token"})
        return ok

    def _drain_body(self) -> None:
        length = self._length()
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)

    def _length(self) -> int:
        try:
            return int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return -1

    def _body(self) -> dict[str, Any]:
        length = self._length()
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise BadRequest(f"Content-Length must be 0..{MAX_BODY}")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
        return data

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path == "/health":
            self._reply(200, self.server.health())
        else:
            self._reply(404, {"error": f"no such endpoint {self.path}"})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        routes = {
            "/prompt": self._prompt,
            "/cancel": self._cancel,
            "/adopt": self._adopt,
            "/drain": self._drain,
            "/shutdown": self._shutdown,
        }
        route = routes.get(self.path)
        if route is None:
            self._drain_body()
            self._reply(404, {"error": f"no such endpoint {self.path}"})
            return
        try:
            body = self._body()
            route(body)
        except BadRequest as exc:
            self._reply(400, {"error": str(exc)})

    def _adopt(self, body: dict[str, Any]) -> None:
        self.server.adopted.set()
        self._reply(200, self.server.health())

    def _shutdown(self, body: dict[str, Any]) -> None:
        self._reply(200, {"status": "stopping"})
        threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _drain(self, body: dict[str, Any]) -> None:
        reason = str(body.get("reason") or "respawn")
        with self.server.lock:
            self.server.draining = reason
            idle = self.server.in_flight == 0
        self._reply(200, self.server.health())
        if idle:
            self.server.exit_on_own(reason)

    def _cancel(self, body: dict[str, Any]) -> None:
        task_id = _field(body, "task_id", str)
        event = self.server.cancels.get(task_id)
        if event is not None:
            event.set()
        self._reply(200, {"cancelled": event is not None})

    def _prompt(self, body: dict[str, Any]) -> None:
        text = _field(body, "text", str)
        model = _optional(body, "model", str) or self.server.spec["model"]
        tools = _optional(body, "tools", list)
        # A conversation: the messages after the system prompt, built by the orchestrator.
        messages = _optional(body, "messages", list)
        if messages is not None and not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise BadRequest('"messages" must be a list of objects with a "role"')
        credentials = _optional(body, "credentials", dict) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in credentials.items()):
            raise BadRequest('"credentials" must map strings to strings')
        task_id = _optional(body, "task_id", str)
        with self.server.lock:
            if self.server.draining:
                self._reply(503, {"error": "worker is draining: it takes no new tasks"})
                return
            self.server.in_flight += 1
            self.server.last_used = time.monotonic()
        cancel = threading.Event()
        if task_id:
            self.server.cancels[task_id] = cancel
        try:
            self._answer(text, str(model), tools, credentials, cancel, messages)
        finally:
            if task_id:
                self.server.cancels.pop(task_id, None)
            self.server.finish_one()

    def _answer(
        self,
        text: str,
        model: str,
        tools: list[Any] | None,
        credentials: dict[str, str],
        cancel: threading.Event,
        messages: list[dict[str, Any]] | None = None,
    ) -> None:
        outcome: list[Completion | ProviderError] = []
        done = threading.Event()

        def call() -> None:
            try:
                outcome.append(
                    complete(
                        self.server.providers,
                        model,
                        text,
                        self.server.spec["system_prompt"],
                        credentials=credentials,
                        tools=tools,
                        messages=messages,
                    )
                )
            except ProviderError as exc:
                outcome.append(exc)
            finally:
                done.set()

        # The provider call runs on its own thread, so a cancel answers at once; its late
        # reply is dropped.
        threading.Thread(target=call, daemon=True).start()
        while not done.wait(WATCH_EVERY):
            if cancel.is_set():
                self._reply(409, {"error": "cancelled"})
                return
        result = outcome[0]
        if isinstance(result, ProviderError):
            self._reply(502, {"error": str(result), "retryable": result.retryable})
            return
        self._reply(
            200,
            {
                "text": result.text,
                "model": model,
                "instance_id": self.server.spec["instance_id"],
                "fingerprint": self.server.spec["fingerprint"],
                "usage": result.usage,
                "tool_calls": result.tool_calls,
            },
        )


def _field(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise BadRequest(f'"{name}" is required and must be a {kind.__name__}')
    return value


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f'"{name}" must be a {kind.__name__}')
    return value


def _watch(server: WorkerServer, spawner_pid: int, idle_timeout: float) -> None:
    # Until adopted, the spawner's death (we are re-parented) or silence ends us: nobody
    # else knows we exist. Afterwards, idleness does, so orphans never pile up.
    began = time.monotonic()
    while True:
        time.sleep(WATCH_EVERY)
        if not server.adopted.is_set():
            if os.getppid() != spawner_pid:
                server.exit_on_own("spawner gone")
                return
            if time.monotonic() - began > ADOPT_TIMEOUT:
                server.exit_on_own("never registered")
                return
            continue
        with server.lock:
            idle = server.in_flight == 0 and time.monotonic() - server.last_used > idle_timeout
        if idle:
            server.exit_on_own("idle")
            return


def main() -> None:
    """Start the server, announce READY, serve until shutdown."""
    spec: dict[str, Any] = json.loads(os.environ.pop(SPEC_ENV))
    token = os.environ.pop(TOKEN_ENV)
    server = WorkerServer(spec, token)
    host, port = server.server_address[:2]
    url = f"http://{host!s}:{port}"
    ready = {"instance_id": spec["instance_id"], "pid": os.getpid(), "url": url}
    sys.stdout.write("READY " + json.dumps(ready) + "\n")
    sys.stdout.flush()
    # Nobody reads stdout after READY; a later write must not hit a closed pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    idle_timeout = float(spec.get("idle_timeout") or 900.0)
    threading.Thread(
        target=_watch, args=(server, int(spec["spawner_pid"]), idle_timeout), daemon=True
    ).start()
    server.serve_forever(poll_interval=0.2)
    server.server_close()


if __name__ == "__main__":
    main()
