"""A local server speaking the OpenAI chat-completions protocol, scriptable per request.

Each request takes the next scripted `Reply` (or the default one): a status code, a delay,
a body, `Retry-After`, usage and tool calls. Every request is recorded with its
`Authorization` header, so a test can say which server got which request with which key.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the server answers to one request."""

    status: int = 200
    delay: float = 0.0
    error: str | None = None  # an OpenAI-style error body with this message
    retry_after: str | None = None
    content: str | None = "default"  # "default": echo; None: content null; else this text
    tool_calls: list[dict[str, Any]] | None = None
    usage: dict[str, int] | None = field(
        default_factory=lambda: {"prompt_tokens": 7, "completion_tokens": 3}
    )
    # Misbehaviours of a hostile provider.
    raw: bytes | None = None  # this body, as it is, instead of the JSON one
    drip: str | None = None  # "head": the whole answer one byte at a time; "body": its body
    drip_every: float = 0.5  # seconds between dripped bytes
    flood: int = 0  # a chunked body of this many bytes that never closes its JSON


@dataclass
class Seen:
    """One request the server received."""

    body: dict[str, Any]
    auth: str
    at: float


class ChatServer(ThreadingHTTPServer):
    """The server: `script` is consumed first, then `default` answers."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[Reply] = []
        self.default = Reply()
        self.requests: list[Seen] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """Its OpenAI-style base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    # The first version's fixture API: `.seen`, `.auth` and `.delay`.
    @property
    def seen(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests]

    @property
    def auth(self) -> list[str]:
        return [r.auth for r in self.requests]

    @property
    def delay(self) -> float:
        return self.default.delay

    @delay.setter
    def delay(self, value: float) -> None:
        self.default.delay = value

    def next_reply(self) -> Reply:
        with self.lock:
            return self.script.pop(0) if self.script else self.default


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = self.server.next_reply()
        with self.server.lock:
            self.server.requests.append(
                Seen(body, self.headers.get("Authorization", ""), time.monotonic())
            )
        time.sleep(reply.delay)
        if reply.status >= 400:
            payload: dict[str, Any] = {
                "error": {"message": reply.error or "scripted failure", "type": "test"}
            }
        else:
            text = body["messages"][-1]["content"]
            content = reply.content
            if content == "default":
                content = f"{body['model']} says {text}"
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reply.tool_calls is not None:
                message["tool_calls"] = reply.tool_calls
            payload = {"choices": [{"message": message}]}
            if reply.usage is not None:
                payload["usage"] = reply.usage
        data = json.dumps(payload).encode() if reply.raw is None else reply.raw
        try:
            if reply.flood:
                self._flood(reply.flood)
            elif reply.drip == "head":
                head = (
                    f"HTTP/1.1 {reply.status} Whatever\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                )
                self._drip(head.encode() + data, reply.drip_every)
            else:
                self._send(reply, data)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up (a time-out or a cancel): nothing to answer

    def _send(self, reply: Reply, data: bytes) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if reply.retry_after is not None:
            self.send_header("Retry-After", reply.retry_after)
        self.end_headers()
        if reply.drip == "body":
            self._drip(data, reply.drip_every)
        else:
            self.wfile.write(data)

    def _drip(self, data: bytes, every: float) -> None:
        self.close_connection = True
        for i in range(len(data)):
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(every)

    def _flood(self, size: int) -> None:
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        start = b'{"choices": [{"message": {"content": "'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(start), start))
        chunk = b"a" * 65536
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        for _ in range(size // len(chunk)):
            self.wfile.write(frame)
        self.wfile.write(b"0\r\n\r\n")


@contextmanager
def chat_server() -> Iterator[ChatServer]:
    """A running server on loopback, shut down afterwards."""
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
