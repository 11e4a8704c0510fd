"""`AsyncOrchestrator`: the Task API as coroutines; awaits are woken by the runner, so many
awaits at once cost no more threads than one."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from orchestrator import AsyncOrchestrator, Orchestrator, OrchestratorError
from orchestrator.aio import BLOCKING_THREADS
from tests.helpers import config_with


def test_the_async_api_runs_a_task_and_an_op(tmp_path: Path) -> None:
    async def main() -> None:
        store = f"sqlite:///{tmp_path / 'events.db'}"
        async with AsyncOrchestrator.open(config=config_with("agent"), store=store) as orch:
            done = await orch.task_await(
                (
                    await orch.task_start(
                        kind="op",
                        op="worker.model.set",
                        worker={"worker_id": "coder", "model": "local/echo-small"},
                    )
                ).task_id
            )
            assert done.status == "completed", done.error
            handle = await orch.task_start(kind="worker", worker_id="coder", task="hi")
            rec = await orch.task_await(handle.task_id, timeout=30)
            assert (rec.status, rec.response) == ("completed", "[local/echo-small] hi")
            assert (await orch.task_peek(handle.task_id)).model == "local/echo-small"
            rows = await orch.task_list(view="tasks")
            assert [r.task_id for r in rows][-1] == handle.task_id

    asyncio.run(asyncio.wait_for(main(), 60))


def test_five_hundred_awaits_cost_no_more_threads_than_one() -> None:
    """Awaiting parks a future on the loop, so the threads are the runner's (a slot and the
    request it runs, per running task) plus the small blocking executor, however many
    tasks are awaited: 500 or 1,000 awaits at once stay under that fixed bound (a thread
    per await would be hundreds more)."""

    async def main() -> tuple[int, int, int]:
        before = threading.active_count()
        orch = await AsyncOrchestrator.open(config=config_with("agent"), store="memory")
        try:
            await _peak_threads(orch, 500)  # warm both pools to their size
            some = await _peak_threads(orch, 500)
            many = await _peak_threads(orch, 1000)
            # Even opening ran on the orchestrator's own executor, not the loop's default.
            names = [t.name for t in threading.enumerate()]
            assert not [n for n in names if n.startswith("asyncio_")], names
            return before, some, many
        finally:
            await orch.close()

    before, some, many = asyncio.run(asyncio.wait_for(main(), 120))
    slots = config_with("agent").pool.max_concurrency
    bound = 2 * slots + BLOCKING_THREADS + 1  # and one of slack
    assert some - before <= bound, (before, some)
    assert many - before <= bound, (before, many)


async def _peak_threads(orch: AsyncOrchestrator, count: int) -> int:
    handles = [
        await orch.task_start(kind="worker", worker_id="coder", task=f"t{i}") for i in range(count)
    ]
    peak = threading.active_count()
    waits = [asyncio.ensure_future(orch.task_await(h.task_id, timeout=60)) for h in handles]
    while not all(w.done() for w in waits):
        peak = max(peak, threading.active_count())
        await asyncio.sleep(0.005)
    records = [w.result() for w in waits]
    assert all(r.status == "completed" for r in records), {r.error for r in records}
    return peak


def test_a_peeked_task_leaves_no_wake_up_behind() -> None:
    with Orchestrator.open(config=config_with("agent"), store="memory") as orch:
        handle = orch.task_start(kind="worker", worker_id="coder", task="hi")
        while orch.task_peek(handle.task_id).status == "running":
            threading.Event().wait(0.01)
        assert not orch.owns(handle.task_id)


def test_every_error_raised_on_purpose_shares_one_root() -> None:
    import orchestrator

    for name in orchestrator.__all__:
        value = getattr(orchestrator, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, OrchestratorError), name
    assert issubclass(orchestrator.InvalidTaskArgs, ValueError)
