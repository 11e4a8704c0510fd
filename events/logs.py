"""structlog loggers over stdlib logging. The library only names its loggers and logs; the
application composes the processors (`configure_json_lines` is what `orchestrator -v`
uses). Nothing prints unless the application enables the stdlib logger, and nothing is
imported or rendered until a line would print."""

from __future__ import annotations

import logging
from typing import Any


class _Logger:
    """A logger that becomes a structlog logger over the stdlib logger of its name the first
    time a line is logged, so importing or running the library without logging costs no
    structlog import. Processors come from structlog's configuration at each call, so
    `structlog.testing.capture_logs` sees the lines. Hot paths also check `isEnabledFor`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None

    def __getattr__(self, method: str) -> Any:
        if self._bound is None:
            import structlog

            self._bound = structlog.wrap_logger(logging.getLogger(self._name))
        return getattr(self._bound, method)


def get_logger(name: str) -> Any:
    """The structlog logger of the stdlib logger `name`."""
    return _Logger(name)


def configure_json_lines() -> None:
    """Render every line as one JSON object with an ISO timestamp, handed to stdlib logging
    (the CLI's `-v`; an application may compose its own processors instead)."""
    import structlog

    structlog.configure(
        processors=[
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    )
