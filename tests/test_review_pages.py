"""A hostile review of the paged views (`replay`/`whatif` pages, the inspector's API pages and
the what-if page, the CLI's page flags) and of read-only opens, on logs recorded by real
orchestrators: several sessions interleaved, a fork, sticky and dynamic overrides, a reset,
per-task models, a conversation, a fallback, a cancelled task, a task still running, failed
decisions and a second writer process on one session."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from events.catalogue import TaskStarted
from events.replay import replay as replay_log
from events.store import EventLog, NoStore, StoreError
from orchestrator import InvalidTaskArgs, Orchestrator, history, view_pages
from orchestrator.config import load_config
from orchestrator.explain import ReplayView, replay_view
from orchestrator.ui import app as app_module
from orchestrator.ui.app import API_PAGES, _rows
from orchestrator.ui.data import Inspector
from tests.chat import ChatServer, Reply
from tests.conftest import postgres_schema
from tests.helpers import config_with, lab_settings, op, reset_model, run, set_model, wait_for
from tests.ui_session import api_client, inspecting

CLI = Path(sys.executable).parent / "orchestrator"


def lab(port: int) -> dict[str, Any]:
    """`lab` (big, mid, small) on a local chat server; coder falls back to small; ghost's
    model does not exist, so its decisions fail."""
    profiles = {
        "coder": {"backend": "agent", "fallback_models": ["lab/small"]},
        "docs": {"backend": "agent", "model": "lab/mid"},
        "ghost": {"backend": "agent", "model": "lab/nowhere"},
    }
    return lab_settings(port, {"big": {}, "mid": {}, "small": {}}, profiles=profiles)


OTHER_WRITER = """
import sys
from orchestrator import Orchestrator
from tests.helpers import run, set_model
with Orchestrator.open(config={config!r}, store={url!r}, session_id="a") as o:
    for i in range(6):
        run(o, "coder", f"other {{i}}")
        if i == 2:
            set_model(o, "docs", "lab/small", model_policy="dynamic")
        run(o, "docs", f"other docs {{i}}", model="lab/big" if i % 2 else None)
"""


def record(url: str, server: ChatServer) -> dict[str, Any]:
    """Record the sessions on `url`; returns the configuration they ran with."""
    config = lab(server.port)
    a = Orchestrator.open(config=config, store=url, session_id="a")
    b = Orchestrator.open(config=config, store=url, session_id="b")
    try:
        first = run(a, "coder", "one")
        run(b, "docs", "two")
        set_model(a, "coder", "lab/small", model_policy="sticky")
        run(a, "coder", "three")
        set_model(b, "coder", "lab/mid", model_policy="dynamic")
        run(b, "coder", "four", model="lab/big")
        run(b, "ghost", "a decision that fails")
        run(a, "coder", "a task model that fails", model="lab/nowhere")
        forked = op(a, "session.fork", session={"from_session_id": "a", "position": a.log.head()})
        fork_id = forked.result["session_id"]
        with Orchestrator.open(config=config, store=url, session_id=fork_id) as c:
            run(c, "coder", "in the fork")
            reset_model(a, "coder")
            second = run(a, "coder", "turn two", continue_from=first.task_id)
            run(a, "coder", "turn three", continue_from=second.task_id)
            server.script = [Reply(status=500, error="mid is down")]
            assert run(b, "coder", "fall back").attempts  # mid failed, small served
            # A second writer process on session a, while this one writes to it too.
            code = OTHER_WRITER.format(config=config, url=url)
            other = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
            try:
                for i in range(4):
                    run(a, "docs", f"here {i}")
                    set_model(a, "coder", "lab/big" if i % 2 else "lab/mid")
                assert other.wait(timeout=60) == 0, other.stderr.read() if other.stderr else ""
            finally:
                other.kill()
                other.wait()
            server.script = [Reply(delay=30)]
            slow = a.task_start(kind="worker", worker_id="coder", task="cancel me").task_id
            wait_for(lambda: any("cancel me" in json.dumps(r.body) for r in server.requests))
            a.task_cancel(slow)
            a.task_await(slow, timeout=30)
            server.script = [Reply(delay=0.5)]
            late = a.task_start(kind="worker", worker_id="coder", task="still running").task_id
            run(b, "coder", "meanwhile")
            set_model(c, "docs", "lab/big")
            a.task_await(late, timeout=30)
            run(c, "docs", "after")
    finally:
        a.close()
        b.close()
    return config


@pytest.fixture(params=["sqlite", "postgresql"])
def recorded(
    request: pytest.FixtureRequest, tmp_path: Path, chat_server: ChatServer
) -> Iterator[tuple[str, dict[str, Any]]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
        yield url, record(url, chat_server)
    else:
        with postgres_schema() as url:
            yield url, record(url, chat_server)


WHATIF = {
    "extends": "none",
    "model": "lab/small",
    "small_model": "lab/big",
    "providers": {
        "lab": {
            "kind": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "models": {"big": {}, "mid": {}, "small": {}},
        }
    },
    "profiles": {"coder": {"backend": "agent"}, "docs": {"backend": "agent", "model": "lab/big"}},
}


def _sessions(log: EventLog) -> list[str | None]:
    seen = {e.session_id for _, e in log.read_log()}
    return [None, *sorted(seen), "never-seen"]


def _windows(head: int, rng: random.Random, count: int) -> list[tuple[int, int | None]]:
    """(since, until) at odd places: 0, head, beyond head, and random ones (inside batches)."""
    fixed = [(0, 0), (0, 1), (head, None), (head + 5, None), (0, head + 5), (head - 1, head)]
    picked = [tuple(sorted(rng.sample(range(head + 3), 2))) for _ in range(count)]
    return [*fixed, *((s, rng.choice([u, None])) for s, u in picked)]  # type: ignore[misc]


def assert_whatif_pages(log: EventLog, rng: random.Random, count: int) -> None:
    config = load_config(WHATIF)
    head = log.head()
    for sid in _sessions(log):
        whole = history.whatif(log, config, {}, sid)
        positions = [d.position for d, _ in history.recorded_decisions(log, sid)]
        for since, until in _windows(head, rng, count):
            last = head if until is None else until
            expected = [r for r, p in zip(whole, positions, strict=True) if since < p <= last]
            for limit in (None, 1, 2, 7):
                if since == 0 and until is None and limit is None:
                    continue
                page = view_pages.whatif(log, config, {}, sid, since, until, limit)
                assert page == expected[:limit], (sid, since, until, limit)


def _started_at(log: EventLog, until: int | None) -> dict[str, int]:
    """Each task's (newest) `TaskStarted` position up to `until`, read the slow way."""
    return {str(e.task_id): p for p, e in log.read_log(until=until) if isinstance(e, TaskStarted)}


def assert_replay_pages(log: EventLog, rng: random.Random, count: int) -> None:
    head = log.head()
    for until in (None, 0, 1, head, head + 3, *rng.sample(range(head), count)):
        whole = replay_view(replay_log(log, until=until))
        started = _started_at(log, until)
        for sid in _sessions(log):
            for since in (0, 1, whole.position, *rng.sample(range(head), 3)):
                for limit in (None, 1, 3):
                    if sid is None and since == 0 and limit is None:
                        continue
                    tasks = [
                        t
                        for t in whole.tasks
                        if sid in (None, t.session_id) and started[t.task_id] > since
                    ]
                    in_log_order = sorted(tasks, key=lambda t: started[t.task_id])
                    kept = {t.task_id for t in in_log_order[:limit]}
                    expected = ReplayView(
                        position=whole.position,
                        registry=whole.registry,
                        overrides=[o for o in whole.overrides if sid in (None, o.session_id)],
                        tasks=[t for t in tasks if t.task_id in kept],
                    )
                    page = view_pages.replay(log, until, sid, since, limit)
                    assert page == expected, (sid, until, since, limit)


def test_pages_of_a_recorded_log_equal_the_whole_answers(
    recorded: tuple[str, dict[str, Any]],
) -> None:
    url, _ = recorded
    log = EventLog(url, create=False)
    try:
        # The log is what it should be: both writers of session a are in it, and so on.
        started = [e for _, e in log.read_log() if isinstance(e, TaskStarted)]
        assert len({e.pid for e in started if e.session_id == "a"}) == 2
        assert {e.session_id for e in started} >= {"a", "b"} and len(_sessions(log)) == 5
        rng = random.Random(11)
        fast = url.startswith("sqlite")
        assert_whatif_pages(log, rng, 12 if fast else 3)
        assert_replay_pages(log, rng, 6 if fast else 2)
    finally:
        log.close()


# --- SQLite: a second open in one process must not drop the first one's locks ---------------

APPEND_ELSEWHERE = """
from events.catalogue import MemoryPut
from events.store import EventLog
log = EventLog({url!r})
for i in range(20):
    put = MemoryPut(session_id="other", key=f"k{{i}}", value="v")
    log.append("memory", [put], log.stream_version("memory"))
log.close()
"""


def test_a_second_open_in_one_process_keeps_another_process_s_writes(tmp_path: Path) -> None:
    """Opening a store touched its file with a raw `open`/`close`, and closing a descriptor
    drops every POSIX lock the process holds on the file, SQLite's included: another
    process closing its connection then took the store for unused, checkpointed and removed
    the WAL under this process's connections, whose next writes went into the removed WAL.
    Its writes were lost and the file could end up malformed."""
    from events.catalogue import MemoryPut

    url = f"sqlite:///{tmp_path / 'events.db'}"
    first = EventLog(url)
    first.append("memory", [MemoryPut(session_id="a", key="a0", value="v")], 0)
    second = EventLog(url)  # a second orchestrator of this process on the same store
    try:
        code = APPEND_ELSEWHERE.format(url=url)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        for i in range(1, 4):
            first.append(
                "memory",
                [MemoryPut(session_id="a", key=f"a{i}", value="v")],
                first.stream_version("memory"),
            )
    finally:
        first.close()
        second.close()
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    log = EventLog(url, create=False)
    try:
        keys = [e.key for _, e in log.read_log()]  # type: ignore[attr-defined]
    finally:
        log.close()
    assert sorted(keys) == sorted(["a0", "a1", "a2", "a3", *(f"k{i}" for i in range(20))])


# --- the inspector: bad numbers, default pages and their `next` links ------------------------


def small_store(url: str, tasks: int = 9) -> None:
    """Two sessions of offline tasks (the built-in echo models), an override between."""
    config = config_with("agent")
    with (
        Orchestrator.open(config=config, store=url, session_id="a") as a,
        Orchestrator.open(config=config, store=url, session_id="b") as b,
    ):
        for i in range(tasks):
            model = {"model": "auto:fast"} if i % 4 == 0 else {}
            run(a if i % 3 else b, "coder", f"task {i}", **model)
            if i == tasks // 2:
                set_model(a, "coder", "local/echo-small")


@pytest.fixture
def inspector(tmp_path: Path) -> Iterator[Inspector]:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    small_store(url)
    with inspecting(url, None) as data:
        yield data


@pytest.fixture
def client(inspector: Inspector) -> Iterator[TestClient]:
    with api_client(inspector, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("value", ["²", "١٢", "9" * 5000, "-²"])
def test_a_number_filter_that_is_not_plain_digits_is_a_400_naming_it(
    client: TestClient, value: str, tmp_path: Path
) -> None:
    """`str.isdigit` is true of superscripts and other scripts' digits, which `int` refuses
    (and of digit strings longer than `int` reads): those raised out of the API as a 500."""
    other = tmp_path / "other.toml"
    other.write_text('model = "local/echo-small"\n')
    for view in ("events", "replay", "whatif", "diff"):
        for name in ("since", "until", "limit"):
            query = {name: value, **({"config": str(other)} if view == "whatif" else {})}
            reply = client.get(f"/api/views/{view}", params=query)
            assert reply.status_code == 400, (view, name, reply.text)
            assert f"{name}:" in reply.json()["error"] or "no filter" in reply.json()["error"]
    assert client.get("/events", params={"limit": value}).status_code == 400
    page = client.post("/whatif", data={"config": 'model = "local/echo-small"', "since": value})
    assert page.status_code == 200 and "since:" in page.text


# --- bad filters: one line naming the filter, whatever the path ------------------------------


@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
def test_every_bad_page_filter_is_invalid_task_args_naming_it(
    tmp_path: Path, store_kind: str
) -> None:
    """`whatif` checked its session only when asked for a page (the whole answer took a
    non-text or over-long id); `events` took `limit=True` for 1; `usage` checked neither
    `since` nor its session (on PostgreSQL a StoreError from the query, elsewhere rows)."""
    with contextlib.ExitStack() as stack:
        if store_kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'events.db'}"
        else:
            url = stack.enter_context(postgres_schema())
        small_store(url, tasks=3)
        orch = stack.enter_context(Orchestrator.open(store=url, session_id="a"))
        other = {"model": "local/echo-small"}
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("whatif", {"config": other, "session_id": 5}, "session_id"),
            ("whatif", {"config": other, "session_id": "x" * 65}, "session_id"),
            ("whatif", {"config": other, "session_id": "\ud800"}, "session_id"),
            ("events", {"limit": True}, "limit"),
            ("usage", {"since": "abc"}, "since"),
            ("usage", {"since": -1}, "since"),
            ("usage", {"since": True}, "since"),
            ("usage", {"since": 2**70}, "since"),
            ("usage", {"session_id": 5}, "session_id"),
        ]
        for view, filters, name in cases:
            with pytest.raises(InvalidTaskArgs, match=rf"^Invalid task_list arguments: {name}: "):
                orch.task_list(view=view, **filters)
        # An unknown session is an empty answer, whole or paged.
        for view, filters in (("whatif", {"config": other}), ("usage", {})):
            for page in ({}, {"since": 1}, {"limit": 1}):
                if view == "usage" and "limit" in page:
                    continue
                assert orch.task_list(view=view, session_id="never-seen", **filters, **page) == []


# --- reading a store while a writer makes it ---------------------------------------------------


def test_a_sqlite_store_half_made_by_a_writer_is_no_store_yet(tmp_path: Path) -> None:
    """A writer makes a SQLite store in three transactions (the events and index tables, the
    snapshot table, the marker) and a reader takes no lock: one that opened in between was
    let in and failed at its first read with "no such table: stored_snapshots"."""
    db = tmp_path / "events.db"
    url = f"sqlite:///{db}"
    EventLog(url).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:  # as it is between the first two
        conn.execute("DROP TABLE orchestrator_store")
        conn.execute("DROP TABLE stored_snapshots")
        conn.commit()
    with pytest.raises(NoStore, match=r"^no orchestrator store at "):
        EventLog(url, create=False)
    for command in (["workers"], ["events"], ["replay", "--until", "1", "--limit", "1"]):
        done = subprocess.run(
            [str(CLI), "--store", url, *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stderr) == (2, f"error: no orchestrator store at {url}\n")
    EventLog(url).close()  # a writer finishes it
    EventLog(url, create=False).close()


def _read_while_made(directory: str, current: Any, stop: Any, found: Any) -> None:
    seen: set[str] = set()
    while not stop.is_set():
        try:
            log = EventLog(f"sqlite:///{directory}/s{current.value}.db", create=False)
            try:
                log.load_snapshot("registry")
                list(log.read_log())
            finally:
                log.close()
            seen.add("read")
        except NoStore:
            seen.add("no store")
        except StoreError as exc:
            seen.add(str(exc))
    found.put(sorted(seen))


def test_readers_while_writers_make_sqlite_stores_read_or_find_no_store(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    current, stop, found = context.Value("i", 0), context.Event(), context.Queue()
    reader = context.Process(target=_read_while_made, args=(str(tmp_path), current, stop, found))
    reader.start()
    try:
        deadline = time.monotonic() + 8
        for i in range(1, 121):
            current.value = i
            time.sleep(0.002)
            EventLog(f"sqlite:///{tmp_path}/s{i}.db").close()
            if time.monotonic() > deadline:
                break
        stop.set()
        assert set(found.get(timeout=30)) <= {"read", "no store"}
    finally:
        stop.set()
        reader.join(timeout=30)
        reader.kill()


def _walk(client: TestClient, view: str, query: dict[str, str]) -> list[dict[str, Any]]:
    """Every page of an API query, following `next` to the end."""
    pages: list[dict[str, Any]] = []
    reply = client.get(f"/api/views/{view}", params=query)
    for _ in range(100):
        assert reply.status_code == 200, (view, query, reply.text)
        pages.append(reply.json())
        if "next" not in reply.json():
            return pages
        reply = client.get(reply.json()["next"])
    raise AssertionError(f"no last page of {view} {query}")


def test_default_pages_followed_by_next_give_the_whole_answer(
    client: TestClient, inspector: Inspector, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No `limit` asks for the default page (`API_PAGES`); its `next` links, followed to the
    end, give exactly the whole answer, whatever else the query says."""
    for view, size in (("events", 7), ("whatif", 2), ("replay", 2)):
        monkeypatch.setitem(API_PAGES, view, size)
    other = tmp_path / "other.toml"
    other.write_text('model = "local/echo-small"\n')
    head = inspector.head
    queries: list[tuple[str, dict[str, str]]] = [
        ("events", {}),
        ("events", {"session_id": "a"}),
        ("events", {"type": "TaskStarted", "until": str(head - 4), "since": "3"}),
        ("whatif", {"config": str(other)}),
        ("whatif", {"config": str(other), "session_id": "b"}),
        ("whatif", {"config": str(other), "since": "5", "until": str(head - 6)}),
        ("replay", {}),
        ("replay", {"session_id": "a"}),
        ("replay", {"until": str(head // 2)}),
        ("replay", {"session_id": "b", "since": "4", "until": str(head - 3)}),
    ]
    for view, query in queries:
        pages = _walk(client, view, query)
        filters = inspector.view_filters(view, {**query, "limit": ""})
        whole = _rows(inspector.view(view, filters, query.get("session_id") or "cli"))
        if view == "replay":
            assert all(p["rows"][0] | {"tasks": []} == whole[0] | {"tasks": []} for p in pages)
            walked = [t for p in pages for t in p["rows"][0]["tasks"]]
            whole = whole[0]["tasks"]
            walked.sort(key=lambda t: t["task_id"])
            whole.sort(key=lambda t: t["task_id"])
        else:
            walked = [r for p in pages for r in p["rows"]]
        assert walked == whole, (view, query)
        assert len(pages) >= 2, (view, query)  # more rows than a page


def test_the_whatif_page_s_next_form_walks_every_decision(
    client: TestClient, inspector: Inspector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "WHATIF_PAGE", 2)
    config = 'model = "local/echo-small"\nsmall_model = "local/echo-large"\n'
    whole = inspector.whatif(load_config(tomllib.loads(config)), "a")
    form = {"config": config, "session": "a"}
    changed: list[str] = []
    unchanged = 0
    for _ in range(50):
        page = client.post("/whatif", data=form)
        assert page.status_code == 200, page.text
        changed += re.findall(r'<tr><td><a href="/tasks/([^"]+)">', page.text)
        unchanged += int((re.search(r"\((\d+) would not\)", page.text) or [0, 0])[1])
        nxt = re.search(
            r'<form method="post" action="/whatif" id="whatif-next">(.*?)</form>', page.text, re.S
        )
        if nxt is None:
            break
        form = {k: unescape(v) for k, v in re.findall(r'name="(\w+)" value="([^"]*)"', nxt[1])}
    else:
        raise AssertionError("no last page")
    assert changed == [r.task_id for r in whole if r.changed]  # the config's newline kept
    assert unchanged == len([r for r in whole if not r.changed]) and changed and unchanged


# --- the CLI's page flags ----------------------------------------------------------------------


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "--store", url, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_cli_page_flags_answer_the_view_s_page(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    small_store(url)
    other = tmp_path / "other.toml"
    other.write_text('model = "local/echo-small"\n')
    log = EventLog(url, create=False)
    config = load_config(other)
    try:
        head = log.head()
        for since, until, limit, sid in (
            (3, head - 5, 2, None),
            (0, None, 1, "b"),
            (head, None, 3, None),
        ):
            args = ["whatif", "--config", str(other), "--json", "--since", str(since)]
            args += ["--limit", str(limit)] + (["--until", str(until)] if until else [])
            args += ["--session", sid] if sid else []
            done = _cli(url, *args)
            assert done.returncode == 0, done.stderr
            page = view_pages.whatif(log, config, {}, sid, since, until, limit)
            assert json.loads(done.stdout) == [r.model_dump(mode="json") for r in page]
        for args, (sid, since, limit) in (
            (
                [
                    "replay",
                    "--until",
                    str(head - 2),
                    "--session",
                    "a",
                    "--since",
                    "4",
                    "--limit",
                    "2",
                ],
                ("a", 4, 2),
            ),
            (["--session", "b", "replay", "--until", str(head), "--limit", "1"], ("b", 0, 1)),
            (["replay", "--until", str(head + 9), "--since", "6"], (None, 6, None)),
        ):
            done = _cli(url, *args, "--json")
            assert done.returncode == 0, done.stderr
            until = int(args[args.index("--until") + 1])
            expected = view_pages.replay(log, until, sid, since, limit)
            assert json.loads(done.stdout) == expected.model_dump(mode="json"), args
    finally:
        log.close()
    for args, name in (
        (["whatif", "--config", str(other), "--limit", "9" * 25], "limit"),
        (["whatif", "--config", str(other), "--since", "9" * 25], "since"),
        (["whatif", "--config", str(other), "--session", "x" * 65, "--limit", "1"], "session_id"),
        (["replay", "--until", "9" * 25, "--limit", "1"], "until"),
        (["replay", "--until", "3", "--session", "\udcff", "--limit", "1"], "session_id"),
    ):
        done = _cli(url, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(f"error: Invalid task_list arguments: {name}: "), done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    for args in (["whatif", "--config", str(other), "--limit", "0"], ["replay", "--until", "-1"]):
        done = _cli(url, *args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


def test_reading_commands_on_a_fresh_machine_find_no_store_and_make_nothing(
    tmp_path: Path,
) -> None:
    """Before any command wrote, the default store's directory (the per-user state
    directory, ours to make) does not exist: a reading command said to create it first,
    which would not help, and `models` and `profiles`, which need no store, failed."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    if os.environ.get("PYTHONPATH"):  # this tree, not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    url = f"sqlite:///{home}/.local/state/orchestrator/events.db"
    other = tmp_path / "other.toml"
    other.write_text('model = "local/echo-small"\n')
    for command in (
        ["events"],
        ["workers"],
        ["replay", "--until", "1", "--limit", "1"],
        ["whatif", "--config", str(other), "--since", "1"],
    ):
        done = subprocess.run(
            [str(CLI), *command], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert (done.returncode, done.stderr) == (2, f"error: no orchestrator store at {url}\n")
    assert list(home.iterdir()) == []
    for command, row in ((["models"], "local/echo"), (["profiles"], "coder")):
        done = subprocess.run(
            [str(CLI), *command], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert done.returncode == 0 and row in done.stdout, done.stderr
    assert list(home.iterdir()) == []  # not even the state directory: they only read
