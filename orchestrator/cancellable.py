"""A blocking call that a cancel can walk away from: used by the in-process agent and by
the worker process (so it imports only the exception root, for the worker's start-up)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator.errors import OrchestratorError

T = TypeVar("T")
CANCEL_POLL = 0.05


class Cancelled(OrchestratorError):
    """The task was cancelled while its request was in flight; the reply is dropped."""


def interruptible(
    work: Callable[[], T],
    cancel: threading.Event,
    on_cancel: Callable[[], None] | None = None,
    every: float = CANCEL_POLL,
) -> T:
    """Run `work` on its own thread and return its result, or raise `Cancelled` as soon as
    `cancel` is set (looked at every `every` seconds, calling `on_cancel` to stop the far
    side); a late result is dropped."""
    box: list[tuple[bool, Any]] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, work()))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as it is
            box.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="request").start()
    while not done.wait(every):
        if cancel.is_set():
            if on_cancel is not None:
                on_cancel()
            raise Cancelled()
    ok, value = box[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value
