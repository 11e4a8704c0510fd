"""structlog loggers over stdlib logging: nothing prints unless the application asks."""

from __future__ import annotations

import logging
from typing import Any

import structlog


def get_logger(name: str) -> Any:
    """A structlog logger rendering JSON lines through the stdlib logger `name`."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
