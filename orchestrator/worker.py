"""A server worker process: `python -m orchestrator.worker`.

Listens on 127.0.0.1 at an ephemeral port, requires its bearer token (from the environment,
never argv), prints one `READY {json}` line, then serves `GET /health`, `POST /prompt` and
`POST /shutdown`. It calls the configured provider itself, with the model each message names.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orchestrator.config import OrchestratorConfig
from orchestrator.providers import ProviderError, complete

SPEC_ENV = "ORCHESTRATOR_WORKER_SPEC"
TOKEN_ENV = "ORCHESTRATOR_WORKER_TOKEN"


class WorkerServer(ThreadingHTTPServer):
    """The HTTP server of one worker, holding what it needs to answer."""

    daemon_threads = True

    def __init__(self, spec: dict[str, Any], token: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.spec = spec
        self.token = token
        self.config = OrchestratorConfig.model_validate(spec["config"])
        self.last_used = time.monotonic()

    def health(self) -> dict[str, Any]:
        """What `/health` answers."""
        return {
            "worker_id": self.spec["worker_id"],
            "instance_id": self.spec["instance_id"],
            "pid": os.getpid(),
            "fingerprint": self.spec["fingerprint"],
            "model": self.spec["model"],
            "status": "ready",
        }


class Handler(BaseHTTPRequestHandler):
    """Routes the three endpoints; every one needs the bearer token."""

    server: WorkerServer

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
        ok = hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode())
        if not ok:
            self._reply(401, {"error": "missing or wrong bearer token"})
        return ok

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        data: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
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
        self.server.last_used = time.monotonic()
        if self.path == "/prompt":
            self._prompt()
        elif self.path == "/shutdown":
            self._reply(200, {"status": "stopping"})
            threading.Thread(target=self.server.shutdown, daemon=True).start()
        else:
            self._reply(404, {"error": f"no such endpoint {self.path}"})

    def _prompt(self) -> None:
        try:
            body = self._body()
            text = str(body["text"])
        except (ValueError, KeyError):
            self._reply(400, {"error": 'body must be JSON with "text"'})
            return
        model = str(body.get("model") or self.server.spec["model"])
        try:
            reply = complete(self.server.config, model, text, self.server.spec["system_prompt"])
        except ProviderError as exc:
            self._reply(502, {"error": str(exc)})
            return
        self._reply(200, {"text": reply, "model": model})


def _idle_watch(server: WorkerServer, idle_timeout: float) -> None:
    # A worker nobody uses for this long exits, so orphans do not pile up on a machine.
    while True:
        time.sleep(min(idle_timeout, 5.0))
        if time.monotonic() - server.last_used > idle_timeout:
            server.shutdown()
            return


def main() -> None:
    """Start the server, announce READY, serve until shutdown."""
    spec: dict[str, Any] = json.loads(os.environ[SPEC_ENV])
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
    idle_timeout = float(spec.get("idle_timeout") or 0)
    if idle_timeout > 0:
        threading.Thread(target=_idle_watch, args=(server, idle_timeout), daemon=True).start()
    server.serve_forever(poll_interval=0.2)
    server.server_close()


if __name__ == "__main__":
    main()
