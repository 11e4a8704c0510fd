"""Pages of `replay` and `whatif` (a session, a window of positions, a limit) give exactly the
matching rows of the views that fold the whole log, on recorded logs of every store; and
walking the pages with `next_since` gives the whole answer."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from events import checkpoints
from events.catalogue import (
    Event,
    ModelAttemptFailed,
    ModelResolved,
    SessionForked,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
    WorkerModelReset,
    WorkerModelSet,
    WorkerReady,
    WorkerStopped,
)
from events.replay import replay as replay_log
from events.store import EventLog, Filter
from orchestrator import Orchestrator, history, view_pages
from orchestrator.config import OrchestratorConfig, load_config
from orchestrator.explain import ReplayView, replay_view
from tests.helpers import fake_spawned

SESSIONS = ("a", "b", "c")
WORKERS = ("coder", "docs", "ghost")  # ghost: no such profile, so a re-run decision fails
REFS = ("local/echo-small", "local/echo-vision", "auto:fast", "nowhere/model")
ENV: dict[str, str] = {}


def _override(n: int, wid: str) -> dict[str, Any]:
    return {
        "worker_id": wid,
        "model_ref": REFS[n % len(REFS)],
        "resolved_model": f"local/m{n % 3}",
        "model_policy": "sticky" if n % 3 == 0 else "dynamic",
        "reason": f"set {n}",
    }


def _event(
    rng: random.Random, n: int, tasks: list[tuple[str, str, str]], spawned: list[str]
) -> Event:
    """One plausible event: overrides, tasks and their decisions, a few processes."""
    sid, wid = rng.choice(SESSIONS), rng.choice(WORKERS)
    kind = rng.randrange(14)
    if kind == 0:
        fields = {k: v for k, v in _override(n, wid).items() if k != "worker_id"}
        return WorkerModelSet(session_id=sid, worker_id=wid, **fields)
    if kind == 1:
        return WorkerModelReset(session_id=sid, worker_id=wid)
    if kind == 2:
        picked = rng.sample(WORKERS, rng.randrange(3))
        forked = {
            w: {**_override(n + i, w), "set_at": "2024-01-01T00:00:00Z"}
            for i, w in enumerate(picked)
        }
        return SessionForked(session_id=sid, from_session_id="x", position=n, overrides=forked)
    if kind in (3, 4, 5) or not tasks:
        task_id = f"t{n}"
        tasks.append((task_id, sid, wid))
        worker = rng.randrange(5) != 0
        args = {"model": rng.choice(REFS)} if worker and rng.randrange(4) == 0 else {}
        earlier = [t for t, s, _ in tasks[:-1] if s == sid][-2:]
        return TaskStarted(
            session_id=sid,
            worker_id=wid,
            task_id=task_id,
            kind="worker" if worker else "op",
            args=args,
            conversation=earlier if rng.randrange(3) == 0 else [],
        )
    task_id, sid, wid = rng.choice(tasks[-6:])  # a task's events are in its own session
    ids: dict[str, Any] = {"session_id": sid, "worker_id": wid, "task_id": task_id}
    if kind in (6, 7, 8):
        return ModelResolved(
            **ids,
            model_ref="auto",
            resolved_model=rng.choice(("local/echo-large", "local/echo-small")),
            model_policy="dynamic",
            source="profile",
            reason="profile default",
        )
    if kind == 9:
        return TaskCompleted(**ids, model=f"local/m{n % 2}", response="ok")
    if kind == 10:
        return rng.choice([TaskFailed(**ids, error="no"), TaskCancelled(**ids)])
    if kind == 11:
        return ModelAttemptFailed(**ids, model="local/big", error="down", retryable=True)
    ids = {"session_id": sid, "worker_id": wid}
    if kind == 12 or not spawned:  # instance ids are unique (the registry view keys by them)
        iid = f"w{n}"
        spawned.append(iid)
        return fake_spawned(sid, wid, iid, n, "local/echo-large")
    iid = rng.choice(spawned[-4:])
    return rng.choice([WorkerReady(**ids, instance_id=iid), WorkerStopped(**ids, instance_id=iid)])


def record(log: EventLog, seed: int, count: int, tasks: list[tuple[str, str, str]]) -> None:
    """Append `count` random events, a few at a time, to their streams."""
    rng = random.Random(seed)
    n = log.head()
    spawned: list[str] = []
    for _ in range(count):
        n += 1
        event = _event(rng, n, tasks, spawned)
        stream = "registry" if event.stream_kind == "registry" else f"session:{event.session_id}"
        log.append(stream, [event], log.stream_version(stream))


CONFIG = load_config({"model": "local/echo-small", "small_model": "local/echo-vision"})


def whatif_windows(log: EventLog, rng: random.Random) -> list[tuple[int, int | None, int | None]]:
    head = log.head()
    windows: list[tuple[int, int | None, int | None]] = [
        (0, None, 1),
        (0, None, 3),
        (head, None, 2),
    ]
    for _ in range(8):
        since, until = sorted(rng.sample(range(head + 2), 2))
        windows.append((since, rng.choice([until, None]), rng.choice([None, 1, 2, 5])))
    return windows


def assert_whatif_pages(log: EventLog, config: OrchestratorConfig, rng: random.Random) -> None:
    for sid in (None, *SESSIONS):
        whole = history.whatif(log, config, ENV, sid)
        positions = [d.position for d, _ in history.recorded_decisions(log, sid)]
        assert len(positions) == len(whole)
        for since, until, limit in whatif_windows(log, rng):
            last = until if until is not None else log.head()
            expected = [r for r, p in zip(whole, positions, strict=True) if since < p <= last]
            page = view_pages.whatif(log, config, ENV, sid, since, until, limit)
            assert page == expected[:limit], (sid, since, until, limit)
        walked: list[Any] = []
        filters: dict[str, Any] = {"session_id": sid, "since": 0, "limit": 3}
        while True:
            rows = view_pages.whatif(log, config, ENV, sid, filters["since"], None, 3)
            walked += rows
            after = view_pages.next_since(log, "whatif", filters, rows)
            if after is None:
                break
            assert after > filters["since"]
            filters["since"] = after
        assert walked == whole, sid


def _started(log: EventLog, sid: str | None, since: int, until: int) -> list[str]:
    """Task ids in the order of their `TaskStarted`, read the slow way (every event)."""
    return [
        str(e.task_id)
        for p, e in log.select(Filter(), after=since, until=until)
        if isinstance(e, TaskStarted) and sid in (None, e.session_id)
    ]


def expected_replay(whole: ReplayView, ids: list[str] | None, sid: str | None) -> ReplayView:
    """The whole replay's row with only one session's overrides and some tasks."""
    return ReplayView(
        position=whole.position,
        registry=whole.registry,
        overrides=[o for o in whole.overrides if sid in (None, o.session_id)],
        tasks=[
            t
            for t in whole.tasks
            if sid in (None, t.session_id) and (ids is None or t.task_id in ids)
        ],
    )


def assert_replay_pages(log: EventLog, rng: random.Random) -> None:
    head = log.head()
    for until in (None, head, 0, *(rng.randrange(head + 2) for _ in range(4))):
        whole = replay_view(replay_log(log, until=until))
        for sid in (None, *SESSIONS):
            upto = whole.position
            for since, limit in ((0, None), (0, 2), (rng.randrange(head + 1), 3), (upto, 1)):
                if sid is None and since == 0 and limit is None:
                    continue
                ids = _started(log, sid, since, upto)[:limit]
                page = view_pages.replay(log, until, sid, since, limit)
                assert page == expected_replay(whole, ids, sid), (until, sid, since, limit)
            seen: list[str] = []
            filters: dict[str, Any] = {"session_id": sid, "until": until, "since": 0, "limit": 2}
            while True:
                page = view_pages.replay(log, until, sid, filters["since"], 2)
                seen += [t.task_id for t in page.tasks]
                after = view_pages.next_since(log, "replay", filters, [page])
                if after is None:
                    break
                filters["since"] = after
            assert sorted(seen) == sorted(
                t.task_id for t in expected_replay(whole, None, sid).tasks
            )


def test_pages_equal_the_full_folds_on_every_store(store: Any) -> None:
    log = store if isinstance(store, EventLog) else EventLog(store)
    tasks: list[tuple[str, str, str]] = []
    try:
        checkpoints.CHECKPOINT_EVERY = 5  # many registry checkpoints in a short log
        record(log, seed=7, count=160, tasks=tasks)
        rng = random.Random(3)
        assert_whatif_pages(log, CONFIG, rng)
        assert_replay_pages(log, rng)
        record(log, seed=8, count=40, tasks=tasks)  # the kept histories catch up
        assert_replay_pages(log, rng)
        assert_whatif_pages(log, CONFIG, rng)
    finally:
        checkpoints.CHECKPOINT_EVERY = 256
        if log is not store:
            log.close()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), count=st.integers(1, 80))
def test_the_same_on_random_logs(seed: int, count: int) -> None:
    log = EventLog("memory")
    try:
        checkpoints.CHECKPOINT_EVERY = 3
        record(log, seed, count, [])
        rng = random.Random(seed)
        assert_whatif_pages(log, CONFIG, rng)
        assert_replay_pages(log, rng)
    finally:
        checkpoints.CHECKPOINT_EVERY = 256
        log.close()


def test_the_views_take_the_page_filters_and_keep_their_whole_answers(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    log = EventLog(url)
    record(log, seed=5, count=120, tasks=[])
    log.close()
    with Orchestrator.open(store=url, session_id="a") as orch:
        whole = orch.task_list(view="whatif", config=CONFIG)
        assert whole == history.whatif(orch.log, CONFIG, ENV)
        first = orch.task_list(view="whatif", config=CONFIG, limit=4)
        assert first == whole[:4]
        replayed = orch.task_list(view="replay", until=60)
        assert replayed == [replay_view(replay_log(orch.log, until=60))]
        mine = orch.task_list(view="replay", until=60, session_id="b")
        assert mine == [expected_replay(replayed[0], None, "b")]
        for bad in ({"limit": 0}, {"since": -1}, {"limit": "x"}):
            for view, more in (("whatif", {"config": CONFIG}), ("replay", {})):
                try:
                    orch.task_list(view=view, **more, **bad)
                except ValueError as exc:
                    assert next(iter(bad)) in str(exc)
                else:
                    raise AssertionError((view, bad))
