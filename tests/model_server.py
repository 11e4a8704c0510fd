"""A stand-in for a local inference server (llama-server, vllm serve): one model per process.

`python tests/model_server.py --model PATH --port N [--startup S] [--mode MODE]
[--ready-path /v1/models]`: "loads" the model at PATH (sleeps S seconds, answering the ready
path 503 meanwhile), then answers it 200 and serves the OpenAI chat-completions protocol,
each reply naming the model it loaded: `[loaded <basename of PATH>] <last user text>`.
`--mode crash` prints an error and exits with status 3 instead of loading; `--mode
never-ready` never finishes loading. Standard library only, so it starts fast in any environment.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CRASH_STATUS = 3


def main() -> None:
    """Parse the arguments, "load", serve."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup", type=float, default=0.0)
    parser.add_argument("--ready-path", default="/v1/models")
    parser.add_argument("--mode", choices=["normal", "crash", "never-ready"], default="normal")
    args = parser.parse_args()
    name = os.path.basename(args.model)
    print(f"model_server pid {os.getpid()}: loading {args.model}", flush=True)
    if args.mode == "crash":
        print(f"error: cannot load {args.model}: bad magic number", file=sys.stderr, flush=True)
        sys.exit(CRASH_STATUS)
    ready = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: Any) -> None:
            return

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path != args.ready_path:
                self._send(404, {"error": "not found"})
            elif not ready.is_set():
                self._send(503, {"error": {"message": "loading model"}})
            else:
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not ready.is_set():
                self._send(503, {"error": {"message": "loading model"}})
                return
            text = body["messages"][-1]["content"]
            reply = f"[loaded {name}] {text}"
            self._send(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": len(text.split()), "completion_tokens": 3},
                },
            )

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            # Headers and body are separate writes: without this, delayed ACKs add ~40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, addr

    server = Server(("127.0.0.1", args.port), Handler)

    def load() -> None:
        if args.mode == "never-ready":
            return
        time.sleep(args.startup)
        print(f"model {name} loaded; listening on 127.0.0.1:{args.port}", flush=True)
        ready.set()

    threading.Thread(target=load, daemon=True).start()
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
