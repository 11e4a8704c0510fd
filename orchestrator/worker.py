"""A server worker process: `python -m orchestrator.worker`.

Listens on 127.0.0.1 at an ephemeral port, requires its bearer token (from the environment,
never argv), prints one `READY {json}` line, then serves (HTTP/1.1, keep-alive):

- `GET /health` -> `{worker_id, instance_id, pid, fingerprint, model, status, in_flight}`
- `POST /prompt` `{text, model, attachments?, tools?, credentials?, task_id?, base_url?,
  messages?}` ->
  `{text, model, instance_id, fingerprint, usage, tool_calls}`
- `POST /cancel` `{task_id}`: the prompt of that task answers 409 at once
- `POST /adopt`: the spawner has registered this process (until then it watches its parent)
- `POST /drain` `{reason, unless_used_within?}`: take no new prompts, finish the running ones,
  then exit. With `unless_used_within` (seconds) it is refused (409, nothing changes) while a
  prompt is in flight or the process was acquired or used that recently: eviction asks so.
- `POST /shutdown`

Its environment holds no API key: each `/prompt` brings the credentials it needs. When it
exits on its own (idle, drained, spawner gone) it leaves `<instance_id>.exit` in its log
directory with the reason, so whoever finds it gone records why. An orchestrator that acquires
it touches `<instance_id>.acquired` there first: that counts as use, for the idle timeout and
for eviction, in every orchestrator process of the host, at no HTTP round trip.

It stays one module over 400 lines because it is the worker process's whole program: the
HTTP handler, the server state it shares and the watchdog thread, with imports kept few for
its start time.
"""

from __future__ import annotations

import contextlib
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

from orchestrator.cancellable import Cancelled, interruptible
from orchestrator.errors import OrchestratorError
from orchestrator.providers import (
    DEFAULT_MAX_REPLY,
    Completion,
    ProviderError,
    ProviderSettings,
    complete,
    internal_error,
    with_base_url,
)
from orchestrator.worker_env import SPEC_ENV, TOKEN_ENV

TYPE_CHECKING = False  # `typing` is for the type checker only: no import at start-up
if TYPE_CHECKING:
    from typing import Any

ADOPT_TIMEOUT = 60.0  # a spawner that has not registered us by then is not coming back
WATCH_EVERY = 0.1
MAX_BODY = 64 * 1024 * 1024
IDLE_CONNECTION = 30.0  # seconds a client connection may sit without sending a request
# Connections served at once: one thread each. Beyond, the one waiting longest for its
# request is dropped to make room; if every one is serving, the newcomer is refused (503).
MAX_CONNECTIONS = 32
MAX_REPLY = 4_000_000  # the ceiling of `[limits] max_reply`
READ_LIMIT = 10.0  # seconds to send a whole request (headers and body) once it has begun
# A request refused unread (401): its rest is read and dropped for this long at most, so the
# refusal reaches the client instead of a reset.
LINGER = 1.0
LINGER_BYTES = 1024 * 1024
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: 58\r\n\r\n"
    b'{"error": "worker busy: too many connections; try again"}\n'
)


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
        # Open connections: what each is doing ("idle", "reading", "serving") and since when.
        self.conns: dict[socket.socket, tuple[str, float]] = {}
        self.conns_lock = threading.Lock()
        self.acquired_mark = Path(spec["log_dir"]) / f"{spec['instance_id']}.acquired"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            room = len(self.conns) < MAX_CONNECTIONS or self._drop_longest_waiting()
            if room:
                self.conns[request] = ("idle", time.monotonic())
        if not room:
            with contextlib.suppress(OSError):
                request.setblocking(False)  # the accept loop never waits on a client
                request.send(BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.pop(request, None)
        super().shutdown_request(request)

    def _drop_longest_waiting(self) -> bool:
        waiting = [
            (since, sock) for sock, (state, since) in self.conns.items() if state != "serving"
        ]
        if not waiting:
            return False
        _, sock = min(waiting, key=lambda w: w[0])
        del self.conns[sock]
        _hang_up(sock)
        return True

    def mark(self, sock: socket.socket, state: str) -> None:
        """Note what a connection is doing now (a dropped one stays dropped)."""
        with self.conns_lock:
            if sock in self.conns:
                self.conns[sock] = (state, time.monotonic())

    def reap(self) -> None:
        """Hang up on every connection whose request has taken longer than `READ_LIMIT`
        to arrive: a client that drips its request holds no thread for long."""
        now = time.monotonic()
        with self.conns_lock:
            late = [
                sock
                for sock, (state, since) in self.conns.items()
                if state == "reading" and now - since > READ_LIMIT
            ]
            for sock in late:
                del self.conns[sock]
        for sock in late:
            _hang_up(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # One line, never a traceback: its frames could show a request's credentials.
        exc = sys.exc_info()[1] or RuntimeError()
        if isinstance(exc, ConnectionError | TimeoutError):  # the client left, or was dropped
            line = f"connection ended early: {type(exc).__name__}"
        else:
            line = internal_error(exc)
        sys.stderr.write(f"worker: {line}\n")

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

    def idle_for(self) -> float:
        """Seconds since this process was last used or acquired (the caller holds the lock)."""
        since_use = time.monotonic() - self.last_used
        try:
            acquired = os.stat(self.acquired_mark).st_mtime
        except OSError:
            return since_use
        return min(since_use, time.time() - acquired)

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


def _hang_up(sock: socket.socket) -> None:
    # Its handler's blocked read returns at once and the handler ends the connection.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class BadRequest(OrchestratorError, ValueError):
    """A request body that breaks the endpoint's contract."""


class Handler(BaseHTTPRequestHandler):
    """Routes the endpoints; every one needs the bearer token."""

    server: WorkerServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("worker: " + (format % args) + "\n")

    def handle_one_request(self) -> None:
        # Idle until the request's first byte; from then on it must arrive within READ_LIMIT.
        self.server.mark(self.connection, "idle")
        try:
            began = self.rfile.peek(1)  # type: ignore[attr-defined]
        except OSError:  # the idle timeout, or a connection dropped to make room
            began = b""
        if not began:
            self.close_connection = True
            return
        self.server.mark(self.connection, "reading")
        super().handle_one_request()

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        # Checked before the body is read: an unauthenticated body is never read into memory.
        given = self.headers.get("Authorization", "")
        ok = compare_digest(given.encode(), f"Bearer {self.server.token}".encode())
        if not ok:
            self.close_connection = True
            self._reply(401, {"error": "missing or wrong bearer token"})
            self._linger()
        return ok

    def _linger(self) -> None:
        """Read and drop what the client still sends, briefly, before closing: closing on
        unread data resets the connection, and the client might lose the refusal."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER
            dropped = 0
            while dropped < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(left)
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

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
        if len(raw) < length:
            self.close_connection = True
            raise BadRequest(f"body ended after {len(raw)} of its {length} bytes")
        try:
            data = json.loads(raw)
        except RecursionError:
            raise BadRequest("body is not JSON this worker reads: it nests too deeply") from None
        except ValueError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
        return data

    def do_GET(self) -> None:
        if not self._authorised():
            return
        self.server.mark(self.connection, "serving")
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
            self.server.mark(self.connection, "serving")
            route(body)
        except BadRequest as exc:
            self._reply(400, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a bug answers one line, not a dropped connection
            self.close_connection = True
            self._reply(500, {"error": internal_error(exc)})

    def _adopt(self, body: dict[str, Any]) -> None:
        self.server.adopted.set()
        self._reply(200, self.server.health())

    def _shutdown(self, body: dict[str, Any]) -> None:
        self._reply(200, {"status": "stopping"})
        threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _drain(self, body: dict[str, Any]) -> None:
        reason = str(body.get("reason") or "respawn")
        quiet = _optional(body, "unless_used_within", (int, float))
        with self.server.lock:
            # Checked and set under the prompts' lock: a prompt is either in flight (and
            # this is refused) or comes later and is answered 503 draining.
            busy, idle_for = self.server.in_flight, self.server.idle_for()
            refused = quiet is not None and bool(busy or self.server.draining or idle_for < quiet)
            if not refused:
                self.server.draining = reason
        if refused:
            error = f"in use: {busy} prompts in flight, last used {idle_for:.1f} s ago"
            self._reply(409, {"error": error, "in_flight": busy, "idle_for": idle_for})
            return
        self._reply(200, self.server.health())
        if busy == 0:
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
        max_reply = _optional(body, "max_reply", int)
        if max_reply is not None and not 1 <= max_reply <= MAX_REPLY:
            raise BadRequest(f'"max_reply" must be 1..{MAX_REPLY}')
        # A managed model's server, on this host only (ADR-0012).
        base_url = _optional(body, "base_url", str)
        if base_url is not None and not base_url.startswith("http://127.0.0.1:"):
            raise BadRequest('"base_url" must be a loopback http://127.0.0.1: url')
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
            self._answer(
                text, str(model), tools, credentials, cancel, max_reply, base_url, messages
            )
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
        max_reply: int | None,
        base_url: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> None:
        def call() -> Completion:
            return complete(
                with_base_url(self.server.providers, model, base_url),
                model,
                text,
                self.server.spec["system_prompt"],
                credentials=credentials,
                tools=tools,
                max_reply=max_reply or DEFAULT_MAX_REPLY,
                messages=messages,
            )

        # The provider call runs on its own thread, so a cancel answers at once; its late
        # reply is dropped.
        try:
            result = interruptible(call, cancel, every=WATCH_EVERY)
        except Cancelled:
            self._reply(409, {"error": "cancelled"})
            return
        except ProviderError as exc:
            self._reply(502, {"error": str(exc), "retryable": exc.retryable})
            return
        except Exception as exc:  # noqa: BLE001 - answered as one line, never a traceback
            self._reply(500, {"error": internal_error(exc)})
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


def _optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRequest(f'"{name}" must be a {names}')
    return value


def _watch(server: WorkerServer, spawner_pid: int, idle_timeout: float) -> None:
    # Until adopted, the spawner's death (we are re-parented) or silence ends us: nobody
    # else knows we exist. Afterwards, idleness does, so orphans never pile up.
    began = time.monotonic()
    while True:
        time.sleep(WATCH_EVERY)
        server.reap()
        if not server.adopted.is_set():
            if os.getppid() != spawner_pid:
                server.exit_on_own("spawner gone")
                return
            if time.monotonic() - began > ADOPT_TIMEOUT:
                server.exit_on_own("never registered")
                return
            continue
        with server.lock:
            idle = server.in_flight == 0 and server.idle_for() > idle_timeout
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
