"""Defects found by a hostile review of the read side, persisted registry checkpoints, the
process owners and the async opener, then of the edges (a failed open, a malformed READY
line, a child stuck past SIGKILL, a reader's open, drain watchers); each test failed before
its fix. One module over 400 lines: it is the record of those review rounds, kept together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from eventsourcing.persistence import StoredEvent

from events import checkpoints, streams
from events.catalogue import REGISTRY_STREAM, WorkerSpawned
from events.checkpoints import load_saved, registry_checkpoints, saved_name
from events.store import EventLog, Filter, StoreError
from events.streams import registry_view
from orchestrator import views_at_scale
from orchestrator.model_servers.launch import SUPERVISOR
from tests.conftest import postgres_schema
from tests.helpers import fake_spawned
from tests.test_registry_checkpoints import reopen, write_as_writers_do
from tests.test_views_at_scale import slow_registry

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots and checkpoints every few events, so a short log has many."""
    monkeypatch.setattr(streams, "SNAPSHOT_EVERY", 5)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY", 7)


# --- a damaged saved checkpoint ---------------------------------------------------------------


def test_a_saved_checkpoint_that_is_not_json_is_ignored_not_raised(
    store: EventLog | str,
) -> None:
    """Bytes that do not decode (a damaged or hand-edited row) are as untrusted as JSON that
    does not validate: the registry is folded instead, and a writer's registry refresh,
    which loads the newest checkpoint, does not fail every decision of the process."""
    log = store if isinstance(store, EventLog) else EventLog(store)
    write_as_writers_do(log, seed=3, count=200)
    head = log.head()
    for damaged in (b"\xff{not utf-8", b"{not json"):
        log._snapshots.insert_events([StoredEvent(saved_name(), head, "snapshot", damaged)])
        if log is not store:
            log.close()
        log, _ = reopen(store)
        assert load_saved(log) is None
        assert views_at_scale.registry(log) == slow_registry(log)
        # A new writer: its registry view saves a snapshot when due, and with it the
        # registry's checkpoint, starting from the (damaged) newest one.
        checkpoints._KEPT.pop(log, None)
        writer = registry_view(log)
        writer.refresh()
        for n in range(6):
            writer.append([_spawned(f"late-{head}-{n}")])
        writer.refresh()
        assert views_at_scale.registry(log) == slow_registry(log)
        _drop(log, head)
        head = log.head()
    if log is not store:
        log.close()


def _spawned(instance_id: str) -> WorkerSpawned:
    return fake_spawned("s1", "w", instance_id, 1, "p/m")


def _drop(log: EventLog, version: int) -> None:
    """Remove the damaged row (the recorders have no delete: by kind of store)."""
    if log.kind == "memory":
        stored = log._snapshots._stored_events  # type: ignore[attr-defined]
        stored[:] = [
            e for e in stored if (e.originator_id, e.originator_version) != (saved_name(), version)
        ]
        log._snapshots._stored_events_index[saved_name()].pop(version)  # type: ignore[attr-defined]
        return
    table = log._snapshots.events_table_name  # type: ignore[attr-defined]
    schema = getattr(log._snapshots.datastore, "schema", "")  # type: ignore[attr-defined]
    table = f'"{schema}".{table}' if schema else table
    mark = "?" if log.kind == "sqlite" else "%s"
    sql = f"DELETE FROM {table} WHERE originator_id = {mark} AND originator_version = {mark}"
    with log._snapshots.datastore.transaction(commit=True) as curs:  # type: ignore[attr-defined]
        curs.execute(sql, (saved_name(), version))


# --- writers saving registry checkpoints at once -----------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from events import checkpoints, streams
from events.catalogue import WorkerReady, WorkerSpawned, WorkerStopped
from events.store import EventLog
from events.streams import registry_view
streams.SNAPSHOT_EVERY, checkpoints.CHECKPOINT_EVERY = 3, 2
url, prefix, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
log = EventLog(url)
registry = registry_view(log)
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
ids = {"session_id": "s1", "worker_id": "w"}
for n in range(50):
    iid = f"{prefix}-{n}"
    registry.append([WorkerSpawned(**ids, instance_id=iid, backend="server", host="h", pid=n + 1,
        pid_started_at=0.0, url="http://127.0.0.1:9", fingerprint="fp", model="p/m",
        model_policy="dynamic")])
    registry.append([WorkerReady(**ids, instance_id=iid)])
    if n % 2:
        registry.append([WorkerStopped(**ids, instance_id=iid)])
    registry.refresh()
log.close()
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_writers_saving_registry_checkpoints_at_once_save_only_the_fold_at_each_position(
    kind: str, tmp_path: Path
) -> None:
    """Processes appending to the registry at once save checkpoints at the same positions
    (the snapshot table's key conflicts, which is ignored): no writer fails, and every
    checkpoint saved is the fold of the registry up to its position, never more or less."""
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(postgres_schema())
            if kind == "postgresql"
            else f"sqlite:///{tmp_path / 'events.db'}"
        )
        EventLog(url).close()
        go = tmp_path / "go"
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, url, f"p{i}", str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(3)
        ]
        time.sleep(1.0)  # all of them opened the store
        go.touch()
        for writer in writers:
            _, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
        log = EventLog(url)
        stack.callback(log.close)
        events = list(log.select(Filter(types=checkpoints.REGISTRY_TYPES)))
        saved: list[int] = []
        at: int | None = None
        while (found := log.load_snapshot(saved_name(), at)) is not None:
            saved.append(found[0])
            at = found[0] - 1
        assert len(saved) > 3
        for position in saved:
            checkpoint = load_saved(log, position)
            assert checkpoint is not None and checkpoint.position == position
            fold = checkpoints.RegistryCheckpoints()
            for at_position, event in events:
                if at_position <= position:
                    fold.feed(at_position, event)
            rows = checkpoints.registry_rows(checkpoint.state, checkpoint.retired)
            assert rows == fold.rows(), position
            assert (checkpoint.starts, checkpoint.stops) == (fold.starts, fold.stops), position
        assert views_at_scale.registry(log) == slow_registry(log)


# --- one log's registry catch-up does not hold up another's -----------------------------------


def test_one_logs_registry_catch_up_does_not_hold_up_another_logs() -> None:
    """`registry_checkpoints` reads the store (and may save) for one log: a process-wide
    lock held across that I/O made every other log of the process (another session's
    orchestrator) wait on it, inside its registry refresh."""
    slow, other = EventLog("memory"), EventLog("memory")
    try:
        for log in (slow, other):
            log.append(REGISTRY_STREAM, [_spawned("i1")], 0)
        entered, release = threading.Event(), threading.Event()
        select = slow.select

        def stalled(where: Filter | None = None, *args: Any, **kwargs: Any) -> Any:
            if where is not None and where.types == checkpoints.REGISTRY_TYPES:
                entered.set()
                release.wait(20)  # a store that answers slowly
            return select(where, *args, **kwargs)

        slow.select = stalled  # type: ignore[method-assign]
        first = threading.Thread(target=registry_checkpoints, args=(slow,), daemon=True)
        first.start()
        assert entered.wait(10)
        done = threading.Event()

        def look() -> None:
            registry_checkpoints(other)
            done.set()

        second = threading.Thread(target=look, daemon=True)
        second.start()
        try:
            assert done.wait(5), "the other log's registry waited on the slow log's read"
        finally:
            release.set()
            first.join(10)
            second.join(10)
        assert [e.instance_id for e in views_at_scale.registry(other)] == ["i1"]
        assert [e.instance_id for e in views_at_scale.registry(slow)] == ["i1"]
    finally:
        slow.close()
        other.close()


# --- a model server's supervisor whose starter dies -------------------------------------------

STARTER = """
import json, os, subprocess, sys
supervisor, spec = sys.argv[1], json.loads(sys.argv[2])
sup = subprocess.Popen(
    [sys.executable, "-I", "-S", supervisor],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=open(spec["log"], "ab"),
    start_new_session=True,
)
if sys.argv[3] == "before":
    sup.stdout.close()  # killed before it read STARTED: nobody will ever read it
sup.stdin.write(json.dumps({**spec, "spawner_pid": os.getpid()}).encode())
sup.stdin.close()
if sys.argv[3] == "after":
    sup.stdout.readline()  # killed once it knew the server's pid, before registering it
print(sup.pid, flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_supervisor_whose_starter_dies_leaves_no_server_behind(tmp_path: Path, when: str) -> None:
    """The supervisor stops a server its starter never registered. A starter that died
    before reading `STARTED` made the supervisor die on the broken pipe instead, leaving
    the server it had just started running, unwatched, for good."""
    marker = f"server-of-{tmp_path.name}"  # in the server's command line only
    server = [sys.executable, "-c", "import sys, time; time.sleep(60)", marker]
    spec = {
        "command": server,
        "env": dict(os.environ),
        "dir": str(tmp_path),
        "log": str(tmp_path / "server.log"),
        "idle_timeout": 900,
        "adopt_timeout": 60,
    }
    started = subprocess.run(
        [sys.executable, "-c", STARTER, str(SUPERVISOR), json.dumps(spec), when],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    supervisor = int(started.stdout)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "exit").exists():  # written once the server is stopped
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.02)
        assert json.loads((tmp_path / "exit").read_text())["reason"] == "spawner gone"
        assert _gone_within(lambda: [*_servers(marker), *_alive([supervisor])], 10)
    finally:
        for left in [*_servers(marker), *_alive([supervisor])]:
            left.kill()


def _servers(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in (proc.info["cmdline"] or []):
            found.extend(_alive([proc.pid]))
    return found


def _alive(pids: list[int]) -> list[psutil.Process]:
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _gone_within(left: Callable[[], list[psutil.Process]], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while left():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- the inspector's processes page -------------------------------------------------------------


def test_the_processes_page_looks_at_each_other_host_once(tmp_path: Path) -> None:
    """Liveness of another host's processes is its host's lease: on PostgreSQL each look
    opens a connection and takes the host's advisory lock for a moment. The page looked
    once per process, so a host running a hundred processes cost a hundred of each."""
    from events.catalogue import WorkerReady
    from orchestrator.ui.data import Inspector

    url = f"sqlite:///{tmp_path / 'events.db'}"
    log = EventLog(url)
    for n in range(20):
        spawned = _spawned(f"far-{n}").model_copy(update={"host": "elsewhere", "pid": n + 1})
        version = log.stream_version(REGISTRY_STREAM)
        ready = WorkerReady(session_id="s1", worker_id="w", instance_id=f"far-{n}")
        log.append(REGISTRY_STREAM, [spawned, ready], version)
    log.close()
    data = Inspector(url)
    try:
        looked: list[str] = []

        def host_alive(host: str) -> bool:
            looked.append(host)
            return True

        data.log.host_alive = host_alive  # type: ignore[method-assign]
        rows = data.processes()
        assert [seen for _, seen in rows] == ["host alive"] * 20
        assert looked == ["elsewhere"]
    finally:
        data.close()


# --- an async open that is cancelled ----------------------------------------------------------


@pytest.fixture
def slow_open(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Orchestrator.open takes half a second, and each orchestrator it opens is listed."""
    from orchestrator.orchestrator import Orchestrator

    opened: list[Any] = []
    real = Orchestrator.__init__

    def init(self: Orchestrator, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)
        real(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(Orchestrator, "__init__", init)
    yield opened
    for orch in opened:
        orch.close()


def test_an_async_open_cancelled_midway_closes_what_it_opened(
    slow_open: list[Any], tmp_path: Path
) -> None:
    """`await AsyncOrchestrator.open(...)` cancelled (a timeout around it) while the open
    runs on its thread: the orchestrator that thread still opens is closed, not left
    holding the store (its connections, and on PostgreSQL this host's lease)."""
    from orchestrator.aio import AsyncOrchestrator

    url = f"sqlite:///{tmp_path / 'events.db'}"

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(AsyncOrchestrator.open(store=url), 0.1)
        deadline = time.monotonic() + 10
        while not (slow_open and slow_open[0]._closed):
            assert time.monotonic() < deadline, "the orchestrator opened after the cancel is open"
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(main(), 30))
    threads = [t.name for t in threading.enumerate() if t.name.startswith("aio")]
    deadline = time.monotonic() + 5
    while threads and time.monotonic() < deadline:
        time.sleep(0.05)
        threads = [t.name for t in threading.enumerate() if t.name.startswith("aio")]
    assert not threads


# --- an open whose constructor fails ----------------------------------------------------------


def test_an_open_whose_lease_fails_closes_its_log_and_says_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On PostgreSQL the host's lease takes a connection of its own: one refused is a
    one-line `StoreError` (not the driver's error), and the `EventLog` that `open` made for
    the orchestrator that was never built is closed, not left holding the store's pool."""
    import psycopg

    from events import store as store_module
    from orchestrator import Orchestrator

    closed: list[EventLog] = []
    real_close, real_hold = EventLog.close, EventLog.hold_host_lease

    def close(self: EventLog) -> None:
        closed.append(self)
        real_close(self)

    def refused(env: dict[str, str]) -> Any:
        raise psycopg.OperationalError("connection refused\nIs the server running?")

    def hold(self: EventLog, host: str) -> None:
        monkeypatch.setattr(store_module, "_connect", refused)  # the lease's connection only
        real_hold(self, host)

    monkeypatch.setattr(EventLog, "close", close)
    monkeypatch.setattr(EventLog, "hold_host_lease", hold)
    with postgres_schema() as url:
        with pytest.raises(StoreError) as caught:
            Orchestrator.open(store=url)
        assert "connection refused" in str(caught.value)
        assert "\n" not in str(caught.value)
        assert len(closed) == 1


def test_an_open_on_a_given_log_that_fails_leaves_that_log_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A log the caller passed in is the caller's to close, whatever the open did."""
    from orchestrator import Orchestrator

    def refuse(self: EventLog, host: str) -> None:
        raise StoreError("no lease today")

    monkeypatch.setattr(EventLog, "hold_host_lease", refuse)
    log = EventLog("memory")
    with pytest.raises(StoreError, match="no lease today"):
        Orchestrator.open(store=log)
    assert log.head() == 0  # still usable
    log.close()


# --- a worker that prints a malformed READY line ------------------------------------------------


@pytest.mark.parametrize("ready", ["READY not json", "READY {}", "READY []", 'READY {"url": 1}'])
def test_a_malformed_ready_line_kills_the_process_and_says_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ready: str
) -> None:
    """The launcher started the process, so it stops it: a READY line that is not JSON, or
    not an object with a url, leaves no worker running unwatched (it outlives us by design)."""
    from orchestrator.backends.spec import WorkerSpec
    from orchestrator.config import default_config
    from orchestrator.launcher import SpawnError, WorkerLauncher

    pid_file = tmp_path / "pid"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\necho '{ready}'\nexec sleep 60\n")
    fake.chmod(0o700)
    monkeypatch.setattr(sys, "executable", str(fake))  # the launcher runs `python -m ...`
    spec = WorkerSpec("coder", "echo/x", "dynamic", "fp", {}, "", default_config())
    try:
        with pytest.raises(SpawnError) as caught:
            WorkerLauncher(tmp_path / "logs").launch(spec, "coder-1", 60)
        message = str(caught.value)
        assert "\n" not in message and "READY" in message, message
        pid = int(pid_file.read_text())
        with contextlib.suppress(psutil.NoSuchProcess):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "the worker still runs"
            raise AssertionError(f"pid {pid} left unreaped")
    finally:
        with contextlib.suppress(OSError, ValueError, psutil.Error):  # nor does a failed run
            left = psutil.Process(int(pid_file.read_text()))
            if left.cmdline() == ["sleep", "60"]:
                left.kill()
                left.wait(5)


# --- a process that will not die at once -----------------------------------------------------


class _Stuck:
    """A child that outlives SIGKILL for a while (in uninterruptible sleep, say)."""

    pid = 424242

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("stuck", timeout or 0)
        return self.returncode


@pytest.mark.parametrize("grace", [0.0, 0.1])
def test_killing_a_stuck_process_raises_nothing_and_reaps_it_once_it_goes(grace: float) -> None:
    """`kill` is called while a spawn fails or a server stops: a child that does not go
    within the wait must not turn that into a `TimeoutExpired` for the caller. It is kept
    and collected by a later `reap_children`, once it has gone (no zombie)."""
    from orchestrator import launcher

    stuck = _Stuck()
    launcher.Launcher.kill(stuck, grace=grace)  # type: ignore[arg-type]
    assert stuck.signals[-1] == "KILL"
    owner = launcher.Launcher()
    owner.reap_children()
    assert stuck in launcher._killed_unreaped  # still going: kept
    stuck.returncode = -9
    owner.reap_children()
    assert stuck not in launcher._killed_unreaped


def test_abandoning_a_stuck_process_raises_nothing() -> None:
    """Closing on a store that went away stops every child; one stuck past SIGKILL is left
    to be collected later, and the rest are still stopped."""
    from orchestrator import launcher

    owner = launcher.Launcher(grace=0.01)
    stuck, other = _Stuck(), _Stuck()
    owner.keep("a", stuck)  # type: ignore[arg-type]
    owner.keep("b", other)  # type: ignore[arg-type]
    owner.abandon()
    assert stuck.signals == other.signals == ["TERM", "KILL"]
    assert {stuck, other} <= set(launcher._killed_unreaped)
    stuck.returncode = other.returncode = -9
    owner.reap_children()
    assert not {stuck, other} & set(launcher._killed_unreaped)


# --- drain watchers of a long-running orchestrator --------------------------------------------


def test_finished_drain_watchers_are_not_kept_but_running_ones_are_joined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each retired process gets a watcher thread that records its stop; a long-running
    orchestrator keeps only those still watching, and `join_watchers` still waits for them."""
    from datetime import UTC, datetime

    from events.projections import RegistryEntry
    from orchestrator import pool_processes
    from orchestrator.backends.client import WorkerClient

    leaving = threading.Event()
    slow_pid = 4242
    monkeypatch.setattr(WorkerClient, "drain", lambda self, *a, **k: None)
    monkeypatch.setattr(
        pool_processes,
        "process_state",
        lambda pid, started: "alive" if pid == slow_pid and not leaving.is_set() else "gone",
    )
    log = EventLog("memory")
    pool = pool_processes.PoolProcesses(log, tmp_path / "workers")
    now = datetime.now(UTC)

    def retire(n: int, pid: int) -> None:
        entry = RegistryEntry(
            **{**_spawned(f"w-{n}").model_dump(exclude={"timestamp", "type"}), "pid": pid},
            status="ready",
            started_at=now,
            updated_at=now,
        )
        pool.retire(entry, {"session_id": "s1", "worker_id": "w"}, "test")

    retire(0, slow_pid)
    for n in range(1, 30):
        retire(n, n)
        pool._watchers[-1].join(5)
    assert len(pool._watchers) <= 2, len(pool._watchers)  # the slow one and the newest
    slow = pool._watchers[0]
    assert slow.is_alive()
    leaving.set()
    pool.join_watchers(5)
    assert not slow.is_alive()
    log.close()


# --- an open for reading writes nothing -------------------------------------------------------

SHAPES = ["current", "before the index", "before the marker"]


def _made_store(url: str, shape: str, drop: Callable[[str], None]) -> None:
    """A store with two sessions' events and a snapshot, in the shape an older version left."""
    from events.catalogue import TaskStarted

    log = EventLog(url)
    log.append("session:a", [TaskStarted(session_id="a", task_id="t1", kind="op")], 0)
    log.append("session:b", [TaskStarted(session_id="b", task_id="t2", kind="op")], 0)
    log.save_snapshot("session:a", 1, {"x": 1})
    log.close()
    if shape == "before the index":
        drop("event_index")
    elif shape == "before the marker":
        drop("orchestrator_store")


def _reads(url: str) -> None:
    log = EventLog(url, create=False)
    try:
        assert log.head() == 2
        assert [p for p, _ in log.select(Filter(task_id="t2"))] == [2]
        assert [r.task_id for r in log.records()] == ["t1", "t2"]
        assert [e.version for e in log.read_stream("session:a")] == [1]
        assert log.stream_version("session:b") == 1
        assert log.load_snapshot("session:a") == (1, {"x": 1})
    finally:
        log.close()


def _read_or_refused(url: str, shape: str) -> None:
    """Read what a reader reads; a store not indexed yet is refused, saying what to do."""
    if shape != "before the index":
        _reads(url)
        return
    with pytest.raises(StoreError) as caught:
        EventLog(url, create=False)
    message = str(caught.value)
    assert "\n" not in message and "command that writes" in message, message


def _sqlite_state(db: Path) -> tuple[list[Any], dict[str, int]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        names = sorted(conn.execute("SELECT type, name FROM sqlite_master").fetchall())
        counts = {
            n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0]
            for kind, n in names
            if kind == "table"
        }
    return names, counts


@pytest.mark.parametrize("shape", SHAPES)
def test_opening_a_sqlite_store_to_read_changes_nothing(tmp_path: Path, shape: str) -> None:
    """`create=False` (every reading command, the inspector) makes no table, index, marker,
    index row or file, whatever version made the store; an unindexed store is refused
    until a writer indexes it, and then reads."""
    import sqlite3

    db = tmp_path / "events.db"
    url = f"sqlite:///{db}"

    def drop(table: str) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(f"DROP TABLE {table}")
            conn.commit()

    _made_store(url, shape, drop)
    (tmp_path / "events.db-lock").unlink()  # as if copied here without it
    before = _sqlite_state(db), sorted(os.listdir(tmp_path))
    _read_or_refused(url, shape)
    assert (_sqlite_state(db), sorted(os.listdir(tmp_path))) == before
    if shape == "before the index":
        EventLog(url).close()  # what the message says: a writer indexes it
        _reads(url)


def _pg_state(schema: str) -> tuple[list[Any], dict[str, int]]:
    import psycopg
    from psycopg import sql

    from tests.conftest import POSTGRES_URL

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        names = sorted(
            conn.execute(
                "SELECT c.relkind::text, c.relname::text FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s",
                (schema,),
            ).fetchall()
        )
        counts = {}
        for kind, name in names:
            if kind == "r":
                table = sql.Identifier(schema, name)
                query = sql.SQL("SELECT count(*) FROM {}").format(table)
                counts[name] = conn.execute(query).fetchone()[0]  # type: ignore[index]
    return names, counts


def _pg_drop(schema: str) -> Callable[[str], None]:
    def drop(table: str) -> None:
        import psycopg
        from psycopg import sql

        from tests.conftest import POSTGRES_URL

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, table)))

    return drop


def _schema_of(url: str) -> str:
    from urllib.parse import parse_qs, urlparse

    return parse_qs(urlparse(url).query)["schema"][0]


# Not "before the marker": its events table is not `stored_events`, so a PostgreSQL store
# without the marker is refused as foreign, by writers and readers alike.
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_opening_a_postgresql_store_to_read_changes_nothing(shape: str) -> None:
    """As on SQLite: no table, index, marker or index row is made by a reader."""
    with postgres_schema() as url:
        schema = _schema_of(url)
        _made_store(url, shape, _pg_drop(schema))
        before = _pg_state(schema)
        _read_or_refused(url, shape)
        assert _pg_state(schema) == before
        if shape == "before the index":
            EventLog(url).close()
            _reads(url)


def test_a_role_that_may_only_read_can_open_a_postgresql_store_to_read() -> None:
    """A reader runs no DDL at all (not even `IF NOT EXISTS`, which PostgreSQL checks the
    right to create for first): a role granted only SELECT opens the store and reads it."""
    import uuid
    from urllib.parse import urlparse

    import psycopg
    from psycopg import sql

    from tests.conftest import POSTGRES_URL

    with postgres_schema() as url:
        schema = _schema_of(url)
        _made_store(url, "current", _pg_drop(schema))
        role = f"ro_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'ro'").format(sql.Identifier(role)))
            for grant in (
                "GRANT USAGE ON SCHEMA {} TO {}",
                "GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}",
            ):
                conn.execute(sql.SQL(grant).format(sql.Identifier(schema), sql.Identifier(role)))
        try:
            parsed = urlparse(url)
            netloc = f"{role}:ro@{parsed.hostname}:{parsed.port or 5432}"
            _reads(parsed._replace(netloc=netloc).geturl())
        finally:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
