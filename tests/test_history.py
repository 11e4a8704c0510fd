"""Debugging at scale: indexed reads, light state, the configuration in the log,
`replay --check`, `whatif`, `session.fork` and `diff`, each against histories with known
answers, on every store."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events import EventLog
from events.catalogue import (
    ConfigRecorded,
    ModelResolved,
    SessionOpened,
    TaskCompleted,
    TaskStarted,
    WorkerModelReset,
    WorkerModelSet,
)
from events.projections import RECENT_TASKS
from events.store import Filter
from orchestrator import InvalidTaskArgs
from orchestrator.history import apply_diff, check, diff, flatten, recorded_config
from orchestrator.resolver import build_catalogue
from tests.conftest import STORES, OpenOrch, postgres_schema, postgres_unavailable
from tests.helpers import config_with, run, set_model

ORCHESTRATOR = str(Path(sys.executable).with_name("orchestrator"))


def cli(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ORCHESTRATOR, "--store", store, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _url(store: EventLog | str) -> EventLog:
    return store if isinstance(store, EventLog) else EventLog(store)


# --- indexed reads -----------------------------------------------------------------------------

SIDS = ["a", "b", "c"]
WIDS = [None, "coder", "docs"]
TIDS = [None, "t1", "t2", "t3"]


def _event(sid: str, wid: str | None, tid: str | None, kind: int) -> Any:
    if kind == 0:
        return SessionOpened(
            session_id=sid, worker_id=wid, task_id=tid, resumed=False, host="h", pid=1
        )
    if kind == 1:
        return TaskStarted(session_id=sid, worker_id=wid, task_id=tid, kind="op")
    return TaskCompleted(session_id=sid, worker_id=wid, task_id=tid)


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(SIDS), st.sampled_from(WIDS), st.sampled_from(TIDS), st.integers(0, 2)
    ),
    min_size=1,
    max_size=40,
)
FILTERS = st.fixed_dictionaries(
    {},
    optional={
        "session_id": st.sampled_from(SIDS),
        "worker_id": st.sampled_from(WIDS[1:]),
        "task_id": st.sampled_from(TIDS[1:]),
        "types": st.sampled_from([("TaskStarted",), ("SessionOpened", "TaskCompleted")]),
    },
)


@contextlib.contextmanager
def fresh_log(kind: str) -> Iterator[EventLog]:
    """A new, empty log of one kind (one per hypothesis example)."""
    with contextlib.ExitStack() as stack:
        if kind == "postgresql":
            if postgres_unavailable():
                pytest.skip(str(postgres_unavailable()))
            url = stack.enter_context(postgres_schema())
        elif kind == "sqlite":
            url = f"sqlite:///{stack.enter_context(tempfile.TemporaryDirectory())}/e.db"
        else:
            url = "memory"
        log = EventLog(url)
        stack.callback(log.close)
        yield log


@pytest.mark.parametrize("kind", STORES)
@settings(max_examples=15)
@given(events=EVENTS, where=FILTERS, data=st.data())
def test_every_filtered_read_equals_filtering_the_whole_log(
    kind: str, events: list[Any], where: dict[str, Any], data: st.DataObject
) -> None:
    with fresh_log(kind) as log:
        for sid, wid, tid, k in events:
            stream = f"session:{sid}"
            log.append(stream, [_event(sid, wid, tid, k)], log.stream_version(stream))
        after = data.draw(st.integers(0, len(events)))
        until = data.draw(st.none() | st.integers(after, len(events)))
        limit = data.draw(st.none() | st.integers(1, 50))
        newest_first = data.draw(st.booleans())
        f = Filter(**where)
        every = [
            (p, e)
            for p, e in log.read_log(after=after, until=until)
            if f.session_id in (None, e.session_id)
            and f.worker_id in (None, e.worker_id)
            and f.task_id in (None, e.task_id)
            and (not f.types or e.type_name() in f.types)
        ]
        if newest_first:
            every.reverse()
        want = every[:limit] if limit else every
        got = list(
            log.select(f, after=after, until=until, limit=limit, newest_first=newest_first, page=3)
        )
        assert got == want


def test_events_view_filters_and_rejects_bad_filters(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("agent"), session_id="ev")
    run(orch, "coder", "one")
    set_model(orch, "docs", "local/echo-small")
    rows = orch.task_list(view="events", worker_id="docs")
    assert rows and {r.worker_id for r in rows} == {"docs"}
    assert [r.type for r in orch.task_list(view="events", type="WorkerModelSet")] == [
        "WorkerModelSet"
    ]
    assert len(orch.task_list(view="events", limit=2)) == 2
    until = rows[0].position
    assert all(r.position <= until for r in orch.task_list(view="events", until=until))
    with pytest.raises(InvalidTaskArgs, match='Did you mean "worker_id"'):
        orch.task_list(view="events", worker="docs")
    with pytest.raises(InvalidTaskArgs, match='Did you mean "WorkerSpawned"'):
        orch.task_list(view="events", type="WorkerSpwned")
    with pytest.raises(InvalidTaskArgs, match="limit"):
        orch.task_list(view="events", limit=0)
    with pytest.raises(InvalidTaskArgs, match='Did you mean "whatif"'):
        orch.task_list(view="whatiff")


def test_a_store_written_before_the_index_is_indexed_when_opened(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    log = EventLog(url)
    log.append("session:a", [TaskStarted(session_id="a", task_id="t1", kind="op")], 0)
    log.append("session:b", [TaskStarted(session_id="b", task_id="t2", kind="op")], 0)
    log.close()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("DELETE FROM event_index")  # as a store from before the index was
    log = EventLog(url)
    try:
        assert [p for p, _ in log.select(Filter(task_id="t2"))] == [2]
    finally:
        log.close()


# --- light state -------------------------------------------------------------------------------


def test_finished_tasks_leave_the_session_state_but_every_read_finds_them(
    open_orch: OpenOrch,
) -> None:
    orch = open_orch(config=config_with("agent"), session_id="busy")
    ids = []
    for i in range(RECENT_TASKS + 6):
        handle = orch.task_start(kind="op", op="memory.put", memory={"key": f"k{i}", "value": "v"})
        ids.append(handle.task_id)
    state = orch.session.refresh()
    assert not state.running and len(state.recent) == RECENT_TASKS
    assert ids[0] not in state.recent
    assert orch.task_peek(ids[0]).status == "completed"  # read by id, through the index
    assert [t.task_id for t in orch.task_list(view="tasks")] == ids
    other = open_orch(config=config_with("agent"), session_id="elsewhere")
    assert other.task_await(ids[0], timeout=5).result == {"key": "k0", "value": "v", "tags": []}
    with pytest.raises(InvalidTaskArgs, match="Did you mean"):
        orch.task_peek(ids[0][:-1] + "x")


def test_stopped_processes_leave_the_live_registry_but_stay_in_the_registry_view(
    open_orch: OpenOrch,
) -> None:
    orch = open_orch(session_id="reg")
    assert run(orch, "coder", "hi").status == "completed"
    (entry,) = orch.pool.live_entries("coder")
    orch.task_await(
        orch.task_start(kind="op", op="worker.stop", worker={"worker_id": "coder"}).task_id,
        timeout=30,
    )
    assert entry.instance_id not in orch.pool.registry.refresh().entries
    rows = {e.instance_id: e.status for e in orch.task_list(view="registry")}
    assert rows[entry.instance_id] == "stopped"
    view = orch.task_list(view="replay")[0]
    assert {e.instance_id: e.status for e in view.registry} == rows


# --- the configuration in the log --------------------------------------------------------------


def test_a_configuration_is_recorded_once_and_named_by_every_decision(
    open_orch: OpenOrch,
) -> None:
    cfg = config_with("agent")
    cfg.providers["local"].base_url = "http://user:hunter2@127.0.0.1:9/v1"
    first = open_orch(config=cfg, session_id="c1")
    run(first, "coder", "a")
    run(first, "docs", "b")
    second = open_orch(config=cfg, session_id="c2")
    run(second, "coder", "c")
    recorded = first.task_list(view="events", type="ConfigRecorded")
    assert len(recorded) == 1
    digest = recorded[0].data["config_digest"]
    assert "hunter2" not in str(recorded[0].data)
    assert recorded[0].data["config"]["providers"]["local"]["base_url"] == "http://127.0.0.1:9/v1"
    resolved = first.task_list(view="events", type="ModelResolved")
    assert {r.data["config_digest"] for r in resolved} == {digest}
    changed = config_with("agent", small_model="local/echo-large")
    third = open_orch(config=changed, session_id="c3")
    run(third, "explorer", "d")
    assert len(third.task_list(view="events", type="ConfigRecorded")) == 2


# --- replay --check ----------------------------------------------------------------------------


def _hand_built(log: EventLog, coder_model: str, recorded_model: str) -> str:
    """A log with one worker task on `coder` decided as `recorded_model` by its profile,
    under a recorded configuration whose coder profile says `coder_model`."""
    cfg = config_with("agent")
    cfg.profiles["coder"].model = coder_model
    digest, payload = recorded_config(cfg, build_catalogue(cfg, {}))
    ids = {"session_id": "h", "worker_id": "coder", "task_id": "t-1"}
    log.append(
        "config",
        [ConfigRecorded(session_id="h", config_digest="sha256:fixed", **payload)],
        log.stream_version("config"),
    )
    log.append(
        "session:h",
        [
            TaskStarted(**ids, kind="worker", args={"task": "x"}),
            ModelResolved(
                **ids,
                model_ref=coder_model,
                resolved_model=recorded_model,
                model_policy="dynamic",
                source="profile",
                reason="profile default",
                config_digest="sha256:fixed",
            ),
            TaskCompleted(**ids, model=recorded_model, response="[x] x"),
        ],
        log.stream_version("session:h"),
    )
    return digest


def test_replay_check_reproduces_a_recorded_history(store: EventLog | str) -> None:
    log = _url(store)
    try:
        _hand_built(log, "local/echo-small", "local/echo-small")
        report = check(log)
        assert (report.checked, report.reproduced, report.differences) == (1, 1, [])
    finally:
        if log is not store:
            log.close()


def test_replay_check_fails_when_a_decision_no_longer_reproduces(store: EventLog | str) -> None:
    log = _url(store)
    try:
        # The configuration recorded under the digest says echo-large; the log says small.
        _hand_built(log, "local/echo-large", "local/echo-small")
        report = check(log)
        assert not report.ok
        (d,) = report.differences
        assert (d.task_id, d.recorded_model, d.now_model) == (
            "t-1",
            "local/echo-small",
            "local/echo-large",
        )
    finally:
        if log is not store:
            log.close()


def test_replay_check_cli_exit_codes(tmp_path: Path) -> None:
    good, bad = f"sqlite:///{tmp_path / 'good.db'}", f"sqlite:///{tmp_path / 'bad.db'}"
    for url, model in ((good, "local/echo-small"), (bad, "local/echo-large")):
        log = EventLog(url)
        _hand_built(log, model, "local/echo-small")
        log.close()
    ok = cli(good, "replay", "--check")
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok: 1 decisions reproduced")
    failed = cli(bad, "replay", "--check")
    assert failed.returncode == 1
    assert "t-1" in failed.stdout and "1 of 1 decisions came out differently" in failed.stdout
    usage = cli(good, "replay", "--until", "-3")
    assert usage.returncode == 2


def test_replay_check_on_a_live_log(open_orch: OpenOrch, store: EventLog | str) -> None:
    orch = open_orch(config=config_with("agent"), session_id="live")
    set_model(orch, "coder", "auto:fast", model_policy="dynamic")
    run(orch, "coder", "one")
    run(orch, "docs", "two", model="local/echo-vision")
    report = check(orch.log)
    assert (report.checked, report.reproduced) == (2, 2)


# --- whatif ------------------------------------------------------------------------------------


def test_whatif_says_which_tasks_a_new_configuration_changes(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("agent"), session_id="wi")
    set_model(orch, "docs", "local/echo-vision")  # sticky: no config change moves it
    a = run(orch, "coder", "a")  # profile `auto` -> echo-large
    b = run(orch, "docs", "b")
    c = run(orch, "explorer", "c")  # auto:fast -> small_model echo-small
    new = config_with("agent", small_model="local/echo-vision")
    new.model = "local/echo-small"
    rows = {r.task_id: r for r in orch.task_list(view="whatif", config=new)}
    assert (rows[a.task_id].served_model, rows[a.task_id].whatif_model) == (
        "local/echo-large",
        "local/echo-small",
    )
    assert rows[a.task_id].changed and not rows[b.task_id].changed
    assert rows[c.task_id].whatif_model == "local/echo-vision" and rows[c.task_id].changed
    assert orch.task_list(view="whatif", config=new, session_id="nobody") == []
    with pytest.raises(InvalidTaskArgs, match="config"):
        orch.task_list(view="whatif")


def test_whatif_cli_reads_a_config_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    assert cli(url, "run", "coder", "hi").returncode == 0
    conf = tmp_path / "new.toml"
    conf.write_text('model = "local/echo-small"\n')
    out = cli(url, "whatif", "--config", str(conf), "--json")
    assert out.returncode == 0, out.stderr
    import json

    (row,) = json.loads(out.stdout)
    assert (row["served_model"], row["whatif_model"], row["changed"]) == (
        "local/echo-large",
        "local/echo-small",
        True,
    )
    cli(url, "stop", "--all")


def test_whatif_and_replay_cli_print_a_page_when_asked(tmp_path: Path) -> None:
    """On a big log a user asks the CLI for a page: `whatif --since/--until/--limit` prints
    the matching slice of the whole answer, `replay --session` one session's tasks."""
    import json

    url = f"sqlite:///{tmp_path / 'p.db'}"
    for n in range(3):
        assert cli(url, "--session", f"s{n}", "run", "coder", f"task {n}").returncode == 0
    conf = tmp_path / "new.toml"
    conf.write_text('model = "local/echo-small"\n')
    whole = json.loads(cli(url, "whatif", "--config", str(conf), "--json").stdout)
    assert len(whole) == 3
    first = cli(url, "whatif", "--config", str(conf), "--limit", "2", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == whole[:2]
    # A page starts after a decision's position (the position each row was decided at).
    events = json.loads(cli(url, "events", "--type", "ModelResolved", "--json").stdout)
    after = str(events[1]["position"])
    rest = json.loads(cli(url, "whatif", "--config", str(conf), "--since", after, "--json").stdout)
    assert rest == whole[2:]
    head = str(events[-1]["position"] + 10)
    one = json.loads(cli(url, "replay", "--until", head, "--session", "s1", "--json").stdout)
    assert [t["session_id"] for t in one["tasks"]] == ["s1"]
    assert {o["session_id"] for o in one["overrides"]} <= {"s1"}
    cli(url, "stop", "--all")


# --- fork --------------------------------------------------------------------------------------


def test_fork_takes_the_overrides_as_of_a_position(open_orch: OpenOrch) -> None:
    src = open_orch(config=config_with("agent"), session_id="src")
    set_model(src, "coder", "local/echo-small")
    p1 = src.log.head()
    set_model(src, "docs", "auto:fast", model_policy="dynamic")
    p2 = src.log.head()
    src.task_await(
        src.task_start(kind="op", op="worker.model.reset", worker={"worker_id": "coder"}).task_id
    )
    p3 = src.log.head()
    other = open_orch(config=config_with("agent"), session_id="other")

    def fork(position: int) -> dict[str, Any]:
        handle = other.task_start(
            kind="op", op="session.fork", session={"from_session_id": "src", "position": position}
        )
        rec = other.task_await(handle.task_id, timeout=30)
        assert rec.status == "completed", rec.error
        assert rec.result is not None
        return rec.result

    assert {w: o["model_ref"] for w, o in fork(p1)["overrides"].items()} == {
        "coder": "local/echo-small"
    }
    assert set(fork(p2)["overrides"]) == {"coder", "docs"}
    at_p3 = fork(p3)
    assert set(at_p3["overrides"]) == {"docs"}
    assert at_p3["from_session_id"] == "src" and at_p3["position"] == p3
    # The new session serves with those overrides; the source is untouched.
    forked = open_orch(config=config_with("agent"), session_id=at_p3["session_id"])
    served = run(forked, "docs", "x")
    assert served.model == "local/echo-small"
    (why,) = forked.task_list(view="explain", task_id=served.task_id)
    assert f"from session src as of position {p3}" in why.summary[1]
    assert set(src.session.refresh().overrides) == {"docs"}
    forked_again = fork(p1)
    assert forked_again["session_id"] != at_p3["session_id"]


def test_fork_failures_are_clear(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("agent"), session_id="f")
    set_model(orch, "coder", "local/echo-small")

    def fork(**session: Any) -> Any:
        handle = orch.task_start(kind="op", op="session.fork", session=session)
        return orch.task_await(handle.task_id, timeout=30)

    rec = fork(from_session_id="nosuch", position=1)
    assert rec.status == "failed" and 'session "nosuch" has no events' in str(rec.error)
    rec = fork(from_session_id="f", position=10_000)
    assert rec.status == "failed" and "past the end of the log" in str(rec.error)
    with pytest.raises(InvalidTaskArgs, match=r"session\.position"):
        orch.task_start(
            kind="op", op="session.fork", session={"fromSessionId": "f", "position": -1}
        )
    with pytest.raises(InvalidTaskArgs, match="session: Field required"):
        orch.task_start(kind="op", op="session.fork")


def test_fork_cli_prints_the_new_session(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert cli(url, "set-model", "coder", "local/echo-small").returncode == 0
    out = cli(url, "fork", "cli", "--at", "3")
    assert out.returncode == 0, out.stderr
    new = out.stdout.strip()
    assert new.startswith("fork-")
    served = cli(url, "--session", new, "run", "coder", "hi")
    assert served.stdout.strip() == "[local/echo-small] hi"
    cli(url, "stop", "--all")


# --- diff --------------------------------------------------------------------------------------


def test_diff_lists_what_changed_between_two_positions(store: EventLog | str) -> None:
    log = _url(store)
    try:
        ids = {"session_id": "d", "worker_id": "coder"}
        set_ = WorkerModelSet(
            **ids,
            model_ref="local/echo-small",
            resolved_model="local/echo-small",
            model_policy="sticky",
            reason="explicit",
        )
        log.append("session:d", [set_], 0)  # 1
        log.append("session:d", [TaskStarted(**ids, task_id="t", kind="worker")], 1)  # 2
        log.append("session:d", [TaskCompleted(**ids, task_id="t", model="m")], 2)  # 3
        log.append("session:d", [WorkerModelReset(**ids)], 3)  # 4
        rows = diff(log, 0, 2)
        assert [(r.scope, r.key, r.change) for r in rows] == [
            ("override", "d/coder", "added"),
            ("task", "t", "added"),
        ]
        rows = diff(log, 2, 4)
        assert [(r.scope, r.key, r.change) for r in rows] == [
            ("override", "d/coder", "removed"),
            ("task", "t", "changed"),
        ]
        task = next(r for r in rows if r.scope == "task")
        assert task.before and task.after
        assert (task.before["status"], task.after["status"]) == ("running", "completed")
        assert diff(log, 4, 4) == []
        from events.replay import replay

        assert apply_diff(flatten(replay(log, until=1)), diff(log, 1, 4)) == flatten(replay(log))
    finally:
        if log is not store:
            log.close()


def test_diff_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    cli(url, "set-model", "coder", "local/echo-small")
    out = cli(url, "diff", "0", "3")
    assert out.returncode == 0, out.stderr
    assert "added    override  cli/coder" in out.stdout
    js = cli(url, "diff", "0", "--json")
    assert js.returncode == 0 and '"scope": "override"' in js.stdout
    assert cli(url, "diff", "3", "1").returncode == 2


# --- events --follow ---------------------------------------------------------------------------


def test_waiting_for_events_wakes_when_another_writer_appends(store: EventLog | str) -> None:
    log = _url(store)
    writer = log if isinstance(store, EventLog) else EventLog(store)
    try:
        head = log.head()
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(log.wait_for_events(head, 30.0)))
        waiter.start()
        time.sleep(0.2)
        writer.append("session:z", [TaskStarted(session_id="z", task_id="t", kind="op")], 0)
        waiter.join(timeout=40)
        assert woke == [True]
        assert log.wait_for_events(log.head(), 0.1) is False
    finally:
        if writer is not log:
            writer.close()
        if log is not store:
            log.close()


def test_replay_check_leaves_unchecked_what_it_cannot_rebuild() -> None:
    log = EventLog("memory")
    ids = {"session_id": "u", "worker_id": "coder", "task_id": "t-u"}
    bad = ConfigRecorded(session_id="u", config_digest="sha256:old", config={"pool": "?"})
    log.append("config", [bad], 0)
    log.append(
        "session:u",
        [
            TaskStarted(**ids, kind="worker"),
            ModelResolved(
                **ids,
                model_ref="auto",
                resolved_model="local/echo-large",
                model_policy="dynamic",
                source="profile",
                reason="profile default",
                config_digest="sha256:old",
            ),
            ModelResolved(  # recorded before configurations were
                **{**ids, "task_id": "t-v"},
                model_ref="auto",
                resolved_model="local/echo-large",
                model_policy="dynamic",
                source="profile",
                reason="profile default",
            ),
        ],
        0,
    )
    report = check(log)
    assert (report.checked, report.unchecked, report.ok) == (0, 2, True)
    log.close()
