"""`AsyncOrchestrator`: the Task API as coroutines, for asyncio agent frameworks.

The same methods as `Orchestrator`, awaited. Awaiting a task of this orchestrator occupies
no thread: the task runner wakes it through `Orchestrator.on_task_end`, so 500 awaits cost
what one does. Short blocking calls (opening the store, a peek, a start) run on a small
executor of its own (`BLOCKING_THREADS`), so the footprint does not depend on the loop's.
A task owned by another process is looked at every `FOREIGN_POLL` seconds (asleep on the
loop in between).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from events.projections import TaskRecord
from orchestrator.api import TaskHandle
from orchestrator.config import OrchestratorConfig
from orchestrator.orchestrator import Orchestrator
from orchestrator.transport import Transport

FOREIGN_POLL = 0.05
BLOCKING_THREADS = 4
_T = TypeVar("_T")


class AsyncOrchestrator:
    """One session's Task API as coroutines (see the module docstring)."""

    def __init__(
        self,
        orch: Orchestrator,
        loop: asyncio.AbstractEventLoop,
        blocking: ThreadPoolExecutor | None = None,
    ) -> None:
        self.sync = orch
        self._loop = loop
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._blocking = blocking or _executor()
        orch.on_task_end(self._ended)

    async def _call(self, call: Callable[[], _T]) -> _T:
        return await self._loop.run_in_executor(self._blocking, call)

    @classmethod
    def open(
        cls,
        config: OrchestratorConfig | dict[str, Any] | str | Path | None = None,
        store: str | None = None,
        session_id: str | None = None,
        transport: Transport | None = None,
    ) -> _Opening:
        """`await AsyncOrchestrator.open(...)` or `async with AsyncOrchestrator.open(...)`;
        the arguments are `Orchestrator.open`'s."""
        return _Opening(config, store, session_id, transport)

    @property
    def session_id(self) -> str:
        """This session's id."""
        return self.sync.session_id

    async def task_start(self, **payload: Any) -> TaskHandle:
        """Start a task (`Orchestrator.task_start`)."""
        return await self._call(lambda: self.sync.task_start(**payload))

    async def task_peek(self, task_id: str) -> TaskRecord:
        """The task's record now (`Orchestrator.task_peek`)."""
        return await self._call(lambda: self.sync.task_peek(task_id))

    async def task_list(self, view: str = "tasks", **filters: Any) -> list[Any]:
        """Rows of a view (`Orchestrator.task_list`)."""
        return await self._call(lambda: self.sync.task_list(view, **filters))

    async def task_cancel(self, task_id: str) -> TaskRecord:
        """Cancel a running task (`Orchestrator.task_cancel`)."""
        return await self._call(lambda: self.sync.task_cancel(task_id))

    async def task_await(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Wait until the task finishes or `timeout` seconds pass; its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            woken = self._loop.create_future()
            self._waiters.setdefault(task_id, []).append(woken)
            try:
                # Registered before the look, so an end between the two still wakes us.
                rec = await self.task_peek(task_id)
                if rec.status != "running":
                    return rec
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return rec
                if not self.sync.owns(task_id):
                    left = FOREIGN_POLL if left is None else min(FOREIGN_POLL, left)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken, left)
            finally:
                waiting = self._waiters.get(task_id, [])
                if woken in waiting:
                    waiting.remove(woken)
                if not waiting:
                    self._waiters.pop(task_id, None)

    async def close(self) -> None:
        """Finish running tasks and release the store (`Orchestrator.close`)."""
        try:
            await self._call(self.sync.close)
        finally:
            self._blocking.shutdown(wait=False)

    def _ended(self, task_id: str) -> None:
        # Called from the runner's thread: hand the wake-up to the loop.
        if task_id in self._waiters and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, task_id)

    def _wake(self, task_id: str) -> None:
        for future in self._waiters.get(task_id, []):
            if not future.done():
                future.set_result(None)

    async def __aenter__(self) -> AsyncOrchestrator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Opening:
    """What `AsyncOrchestrator.open` returns: awaitable, or an async context manager."""

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._opened: AsyncOrchestrator | None = None

    async def _open(self) -> AsyncOrchestrator:
        # Opened on the orchestrator's own executor, not the loop's default one.
        blocking = _executor()
        loop = asyncio.get_running_loop()
        opening = blocking.submit(Orchestrator.open, *self._args)
        try:
            orch = await asyncio.wrap_future(opening, loop=loop)
        except BaseException:
            # Failed, or cancelled while its thread still opens: what it opens is closed.
            opening.add_done_callback(_close_opened)
            blocking.shutdown(wait=False)
            raise
        return AsyncOrchestrator(orch, loop, blocking)

    def __await__(self) -> Generator[Any, None, AsyncOrchestrator]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncOrchestrator:
        self._opened = await self._open()
        return self._opened

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._opened is not None:
            await self._opened.close()


def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="aio")


def _close_opened(opening: Future[Orchestrator]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()
