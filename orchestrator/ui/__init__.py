"""`orchestrator ui`: a local web inspector of the event log (the `ui` extra).

Read-only: it appends nothing, binds loopback by default and answers only requests that
carry the token it prints. Imported only by the `ui` command.
"""

from __future__ import annotations

import secrets
import socket
import sys
from typing import Any, TextIO

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def missing() -> str | None:
    """Which package of the `ui` extra is not installed, if any."""
    import importlib.util

    for name in ("starlette", "uvicorn", "jinja2"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    store: str | None,
    config: Any = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """Serve the inspector until interrupted; prints one line with its URL and token."""
    import uvicorn

    from orchestrator.ui.app import create_app
    from orchestrator.ui.data import Inspector

    data = Inspector(store, config)
    token = token or secrets.token_urlsafe(24)
    try:
        sock = bind(host, port)
        shown = f"[{host}]" if ":" in host else host
        print(f"inspector: http://{shown}:{sock.getsockname()[1]}/?token={token}", file=out)
        out.flush()
        data.start()
        app = create_app(data, token)
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        )
        server.run(sockets=[sock])
    finally:
        data.close()
