"""Registry checkpoints persist (ADR-0014): writers save them with the registry's snapshot,
a new process starts from the newest and folds only what came after, and its rows equal
the fold from the start, on every store. One of another shape, or a bad one, is ignored."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from typing import Any

import pytest

from events import checkpoints, streams
from events.catalogue import REGISTRY_STREAM, Event, WorkerSpawned
from events.checkpoints import RegistryCheckpoints, load_saved, registry_checkpoints, saved_name
from events.store import EventLog, Filter
from events.streams import registry_view
from orchestrator import views_at_scale
from orchestrator.ui.data import ReadOnlyLog
from orchestrator.ui.travel import RegistryHistory
from tests.conftest import postgres_schema
from tests.test_views_at_scale import _event, assert_same_answers, slow_registry


@pytest.fixture(autouse=True)
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots and checkpoints every few events, so a short log has many."""
    monkeypatch.setattr(streams, "SNAPSHOT_EVERY", 5)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY", 7)


def write_as_writers_do(log: EventLog, seed: int, count: int, first: int = 1) -> None:
    """Append random events as the orchestrator's writers do: the registry's are appended
    after refreshing its `StreamView` (which saves its snapshot, and with it the registry's
    checkpoint, when due). Ids are numbered from `first` (a process id is never reused)."""
    rng = random.Random(seed)
    started: list[tuple[str, str]] = []
    spawned: list[str] = []
    registry = registry_view(log)
    for n in range(first, first + count):
        event = _event(rng, n, started, spawned)
        if event.stream_kind == "registry":
            registry.refresh()
            log.append(REGISTRY_STREAM, [event], registry.version)
        else:
            stream = f"session:{event.session_id}"
            log.append(stream, [event], log.stream_version(stream))
    registry.refresh()


def reopen(store: EventLog | str) -> tuple[EventLog, bool]:
    """The store as a new process opens it (a memory store: the same log, its kept
    checkpoints forgotten); and whether to close it."""
    if isinstance(store, EventLog):
        checkpoints._KEPT.pop(store, None)
        return store, False
    return EventLog(store), True


def registry_positions(log: EventLog) -> list[int]:
    return [p for p, _ in log.select(Filter(stream=REGISTRY_STREAM))]


def test_snapshots_load_the_newest_at_or_before_a_version_on_every_store(
    store: EventLog | str,
) -> None:
    log = store if isinstance(store, EventLog) else EventLog(store)
    try:
        for version in (3, 10, 20):
            assert log.save_snapshot("checkpoint:test", version, {"v": version}) is True
        assert log.save_snapshot("checkpoint:test", 10, {"v": 10}) is True  # idempotent
        assert log.load_snapshot("checkpoint:test") == (20, {"v": 20})
        assert log.load_snapshot("checkpoint:test", at_most=19) == (10, {"v": 10})
        assert log.load_snapshot("checkpoint:test", at_most=10) == (10, {"v": 10})
        assert log.load_snapshot("checkpoint:test", at_most=2) is None
        assert log.load_snapshot("registry") is None  # another name: another series
    finally:
        if log is not store:
            log.close()


def test_a_new_process_starts_from_the_saved_checkpoint_with_the_full_folds_rows(
    store: EventLog | str,
) -> None:
    log = store if isinstance(store, EventLog) else EventLog(store)
    write_as_writers_do(log, seed=5, count=400)
    if log is not store:
        log.close()
    log, close = reopen(store)
    try:
        saved = load_saved(log)
        assert saved is not None  # the writers left checkpoints
        positions = registry_positions(log)
        found = RegistryCheckpoints.from_store(log)
        assert found.position == saved.position > 0
        # Only the registry events after it are left to fold (a checkpoint is due every
        # `CHECKPOINT_EVERY` events scaled by the rows, plus the snapshot's period).
        left = [p for p in positions if p > saved.position]
        assert len(left) <= 7 * found._scale() + 5
        assert views_at_scale.registry(log) == slow_registry(log)
        assert_same_answers(log, random.Random(2))  # registry, usage, diff at any position
        write_as_writers_do(log, seed=6, count=80, first=1000)  # and as the log grows
        assert_same_answers(log, random.Random(3))
    finally:
        if close:
            log.close()


CHILD = """
import json, sys
from events.checkpoints import RegistryCheckpoints
from events.store import EventLog
from orchestrator import views_at_scale
log = EventLog(sys.argv[1], create=False)
start = RegistryCheckpoints.from_store(log).position
rows = [e.model_dump(mode="json") for e in views_at_scale.registry(log)]
print(json.dumps({"start": start, "rows": rows}))
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_another_process_reads_the_same_rows_from_the_saved_checkpoint(
    kind: str, tmp_path: Any
) -> None:
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(postgres_schema())
            if kind == "postgresql"
            else f"sqlite:///{tmp_path / 'events.db'}"
        )
        log = EventLog(url)
        stack.callback(log.close)
        write_as_writers_do(log, seed=11, count=300)
        saved = load_saved(log)
        assert saved is not None
        done = subprocess.run(
            [sys.executable, "-c", CHILD, url],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,  # with this process's environment: the code under test
        )
        found = json.loads(done.stdout)
        assert found["start"] == saved.position
        assert found["rows"] == [e.model_dump(mode="json") for e in slow_registry(log)]


def test_the_inspector_starts_from_the_saved_checkpoint_without_writing(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    log = EventLog(url)
    write_as_writers_do(log, seed=7, count=400)
    full = RegistryHistory()  # the fold from the start, as the inspector made it before
    for position, event in log.select(Filter(stream=REGISTRY_STREAM)):
        full.feed(position, event)
    saved = load_saved(log)
    assert saved is not None
    log.close()
    looking = ReadOnlyLog(url)
    try:
        history = RegistryHistory.from_store(looking)
        assert history.position == saved.position
        history.catch_up(looking)
        assert [(p.entry, p.started_by, p.stopped_why) for p in history.processes()] == [
            (p.entry, p.started_by, p.stopped_why) for p in full.processes()
        ]
        read = checkpoints.registry_events(looking)
        for position in range(0, looking.head() + 1, 17):
            assert history.rows_at(position, read) == full.rows_at(position, read), position
        newest = looking.load_snapshot(saved_name())
        assert newest is not None and newest[0] == saved.position  # it saved nothing
    finally:
        looking.close()


def test_a_checkpoint_of_another_shape_or_a_bad_one_is_never_trusted(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    log = EventLog(url)
    write_as_writers_do(log, seed=8, count=300)
    head = log.head()
    empty = {"position": head, "state": {}, "retired": {}, "starts": {}, "stops": {}}
    # An older format's checkpoint, well formed but empty, at the head: another name.
    monkeypatch.setattr(checkpoints, "FORMAT", checkpoints.FORMAT - 1)
    saved_name.cache_clear()
    older = saved_name()
    monkeypatch.undo()
    saved_name.cache_clear()
    assert older != saved_name()
    log.save_snapshot(older, head, empty)
    log.close()

    log = EventLog(url)
    assert load_saved(log) is not None
    assert views_at_scale.registry(log) == slow_registry(log)
    log.close()

    for bad in (
        {"position": head, "state": "not a registry"},  # does not validate
        {**empty, "position": head - 1},  # says another position than it is saved at
    ):
        log = EventLog(url)
        log.save_snapshot(saved_name(), head, bad)
        assert load_saved(log) is None
        assert views_at_scale.registry(log) == slow_registry(log)
        log.close()
        _drop_newest(url)
    log = EventLog(url)
    log.save_snapshot(saved_name(), head + 5, {**empty, "position": head + 5})  # from the future
    assert load_saved(log) is None
    assert views_at_scale.registry(log) == slow_registry(log)
    log.close()


def _drop_newest(url: str) -> None:
    import sqlite3

    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "DELETE FROM stored_snapshots WHERE originator_id = ? AND originator_version = "
            "(SELECT max(originator_version) FROM stored_snapshots WHERE originator_id = ?)",
            (saved_name(), saved_name()),
        )


def test_only_the_newest_checkpoint_stays_in_memory_where_the_log_keeps_them() -> None:
    log = EventLog("memory")
    try:
        write_as_writers_do(log, seed=9, count=600)
        kept = registry_checkpoints(log)
        assert kept.checkpoints == 1
        assert views_at_scale.registry(log) == slow_registry(log)
        assert_same_answers(log, random.Random(4))
        assert kept.checkpoints == 1  # looking back reads the store, it keeps nothing
    finally:
        log.close()


def test_a_log_written_before_checkpoints_were_saved_is_folded_once_and_saved() -> None:
    log = EventLog("memory")
    try:
        rng = random.Random(10)
        started: list[tuple[str, str]] = []
        spawned: list[str] = []
        for n in range(1, 300):  # appended with no snapshot or checkpoint at all
            event: Event = _event(rng, n, started, spawned)
            stream = (
                "registry" if event.stream_kind == "registry" else f"session:{event.session_id}"
            )
            log.append(stream, [event], log.stream_version(stream))
        assert load_saved(log) is None
        assert views_at_scale.registry(log) == slow_registry(log)  # folded, saving as it goes
        assert load_saved(log) is not None
        assert_same_answers(log, random.Random(5))
        assert any(isinstance(e, WorkerSpawned) for _, e in log.select(Filter(stream="registry")))
    finally:
        log.close()


def _registry_fold_digest() -> str:
    """A digest of the code that folds registry events into saved checkpoints (its syntax
    tree, so formatting and comments do not count)."""
    import ast
    import hashlib
    import inspect
    import textwrap

    from events import checkpoints, projections

    folds = {id(f): f for f in projections._on_registry.registry.values()}
    parts = [
        projections.apply_registry,
        checkpoints.registry_rows,
        *sorted(folds.values(), key=lambda f: f.__code__.co_firstlineno),
        checkpoints.RegistryCheckpoints.feed,
        checkpoints.RegistryCheckpoints._note,
    ]
    helpers = [
        getattr(projections, name)
        for name in sorted(vars(projections))
        if name in {"_claimed", "_launched", "_used", "_refused", "_move", "_server_status"}
    ]
    trees = [ast.dump(ast.parse(textwrap.dedent(inspect.getsource(f)))) for f in [*parts, *helpers]]
    return hashlib.sha256("\n".join(trees).encode()).hexdigest()[:16]


# The fold each checkpoint FORMAT was saved by. A checkpoint saved by another fold would be
# trusted by name alone, so a change to the fold must come with a new FORMAT.
FOLD_OF_FORMAT = {1: "82c45e825a8bd2ba"}


def test_a_change_to_the_registry_fold_comes_with_a_new_checkpoint_format() -> None:
    from events.checkpoints import FORMAT

    digest = _registry_fold_digest()
    assert FOLD_OF_FORMAT.get(FORMAT) == digest, (
        f"the registry fold changed (digest {digest}): checkpoints saved by the old fold "
        "would be read as this one's. Bump events.checkpoints.FORMAT and record "
        f"FOLD_OF_FORMAT[{FORMAT} + 1] = {digest!r} here."
    )
