"""Hostile input and broken stores: bounded events, validated ids, one-line errors, nothing
hangs. Each numbered item of the issue has a test here, on the stores it concerns."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from events import replay
from events.catalogue import WorkerReady, WorkerSpawned
from events.store import EventLog, Filter, StoreError
from orchestrator import InvalidTaskArgs, Orchestrator
from orchestrator.processes import host_id, start_time, worker_token
from tests.chat import ChatServer, Reply
from tests.conftest import postgres_schema
from tests.helpers import config_with, lab_config, op, run

ROOT = Path(__file__).parent.parent
CLI = str(Path(sys.executable).parent / "orchestrator")
BIG = "x" * 1_600_000


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL on SQLite and on PostgreSQL (skipped with a reason without a server)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'e.db'}"
    else:
        with postgres_schema() as pg:
            yield pg


# 1. A large event never reaches the store ------------------------------------------------------


def test_oversized_payloads_are_refused_before_anything_is_written(url: str) -> None:
    with Orchestrator.open(config=config_with(), store=url) as orch:
        began = time.monotonic()
        with pytest.raises(InvalidTaskArgs, match=r"memory\.value: too long: the limit is 200000"):
            orch.task_start(kind="op", op="memory.put", memory={"key": "k", "value": BIG})
        with pytest.raises(InvalidTaskArgs, match=r"task: too long: the limit is 200000"):
            orch.task_start(kind="worker", worker_id="coder", task=BIG)
        many = ["y" * 150_000] * 10
        with pytest.raises(InvalidTaskArgs, match=r"arguments: .* the limit for one task"):
            orch.task_start(kind="worker", worker_id="coder", task="t", attachments=many)
        assert time.monotonic() - began < 10
        assert orch.task_list(view="events") == []
        rec = op(orch, "memory.put", memory={"key": "k", "value": "y" * 199_000})
        assert rec.status == "completed"  # under the limit it is stored, on every store


def test_limits_are_configurable_within_bounds(tmp_path: Path) -> None:
    raw = {**config_with().model_dump(), "limits": {"max_text": 1000}}
    with Orchestrator.open(config=raw, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        with pytest.raises(InvalidTaskArgs, match="task: too long: the limit is 1000 "):
            orch.task_start(kind="worker", worker_id="coder", task="t" * 1001)
        assert run(orch, "coder", "t" * 1000).status == "completed"
    from orchestrator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"limits\.max_text: input should be less than"):
        load_config({"limits": {"max_text": 50_000_000}})


def test_a_reply_over_the_limit_fails_the_task(tmp_path: Path, chat_server: ChatServer) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    with Orchestrator.open(config=lab_config(chat_server.port, "agent"), store=url) as orch:
        chat_server.script = [Reply(content="r" * 1_000_001)]
        rec = run(orch, "coder", "tell me everything")
        assert rec.status == "failed"
        assert rec.error == (
            "The reply of lab/slow is 1,000,001 characters; the limit is 1,000,000. "
            "Ask for a shorter answer."
        )
        assert run(orch, "coder", "short").status == "completed"


# 2. Ids are validated ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["s" * 1_000_000, "s" * 4000, "a\x00b", "../x", "-x"])
def test_session_ids_follow_the_id_rule(url: str, bad: str) -> None:
    with pytest.raises(InvalidTaskArgs) as raised:
        Orchestrator.open(config=config_with(), store=url, session_id=bad)
    message = str(raised.value)
    assert "a session id must be 1-64 characters" in message
    assert len(message) < 300


# 3. A locked store gives one clear error after a bounded wait -----------------------------


def test_a_locked_sqlite_store_is_a_store_error_and_leaves_no_half_attempt(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    url = f"sqlite:///{db}?timeout=1"
    with Orchestrator.open(config=config_with(), store=url, session_id="locked") as orch:
        assert op(orch, "memory.put", memory={"key": "a", "value": "1"}).status == "completed"
        holder = sqlite3.connect(db, timeout=1, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            began = time.monotonic()
            with pytest.raises(StoreError) as raised:
                orch.task_start(kind="op", op="memory.put", memory={"key": "b", "value": "2"})
            assert time.monotonic() - began < 15
            assert "locked" in str(raised.value) and "\n" not in str(raised.value)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        rec = op(orch, "memory.put", memory={"key": "c", "value": "3"})
        assert rec.status == "completed"
        keys = [e.data.get("key") for e in orch.task_list(view="events", type="MemoryPut")]
        assert keys == ["a", "c"]  # nothing of the failed attempt was written


# 4. Damaged and foreign stores --------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def test_a_damaged_sqlite_store_is_one_line_and_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    with Orchestrator.open(config=config_with(), store=f"sqlite:///{db}") as orch:
        for i in range(300):
            orch.task_start(kind="op", op="memory.put", memory={"key": str(i), "value": "v" * 500})
    data = bytearray(db.read_bytes())
    for offset in range(4096 * 2, len(data), 4096):  # every page but the header page
        data[offset : offset + 64] = b"\xff" * 64
    db.write_bytes(bytes(data))
    for args in (["events"], ["run", "coder", "hi"], ["workers"]):
        out = _cli("--store", f"sqlite:///{db}", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    with (
        pytest.raises(StoreError),
        Orchestrator.open(config=config_with(), store=f"sqlite:///{db}") as orch,
    ):
        orch.task_list(view="events")


def test_a_foreign_sqlite_file_is_refused_not_read_as_empty(tmp_path: Path) -> None:
    db = tmp_path / "theirs.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE stored_events (originator_id TEXT, originator_version INT)")
    conn.execute("INSERT INTO stored_events VALUES ('their-aggregate', 1)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    for args in (["events"], ["run", "coder", "hi"]):
        out = _cli("--store", f"sqlite:///{db}", *args)
        assert out.returncode == 2
        assert "is not an orchestrator store" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    with pytest.raises(StoreError, match="not an orchestrator store"):
        EventLog(f"sqlite:///{db}")
    assert db.read_bytes() == before  # not even a table was added
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("theirs"))
    assert beside == ["theirs.db"]  # nor a file beside it


def test_a_store_made_before_the_marker_is_adopted(url: str) -> None:
    with Orchestrator.open(config=config_with(), store=url) as orch:
        op(orch, "memory.put", memory={"key": "k", "value": "v"})
    _drop_marker(url)  # as the first version left it
    reader = EventLog(url, create=False)  # a reader adopts it too, and writes nothing
    assert len(list(reader.select(Filter(types=("MemoryPut",))))) == 1
    reader.close()
    with Orchestrator.open(config=config_with(), store=url) as orch:
        assert len(orch.task_list(view="events", type="MemoryPut")) == 1


def _drop_marker(url: str) -> None:
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            conn.execute("DROP TABLE orchestrator_store")
            conn.commit()
        return
    schema = url.rsplit("schema=", 1)[1]
    with psycopg.connect(url.split("?", 1)[0], autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{schema}".orchestrator_store')


# 5. Replies from a worker are validated ---------------------------------------------------------


class _FakeWorker(ThreadingHTTPServer):
    instance_id: str
    fingerprint: str


class _FakeHandler(BaseHTTPRequestHandler):
    server: _FakeWorker

    def log_message(self, *args: Any) -> None:
        return

    def _send(self, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(
            {
                "worker_id": "coder",
                "instance_id": self.server.instance_id,
                "pid": 1,
                "fingerprint": self.server.fingerprint,
                "model": "local/echo-large",
                "status": "ready",
            }
        )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"text": "no model and no identity"})  # breaks the protocol


def test_a_malformed_prompt_reply_fails_the_task_clearly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    with Orchestrator.open(config=config_with("server"), store=url) as orch:
        spec = orch.worker_spec("coder", orch.session_decision("coder"))
        fake = _FakeWorker(("127.0.0.1", 0), _FakeHandler)
        fake.instance_id, fake.fingerprint = "coder-fake", spec.fingerprint
        threading.Thread(target=fake.serve_forever, daemon=True).start()
        sleeper = subprocess.Popen(["sleep", "60"])  # a live pid for the entry
        try:
            ids = {"session_id": "x", "worker_id": "coder"}
            orch.pool.registry.append(
                [
                    WorkerSpawned(
                        **ids,
                        instance_id="coder-fake",
                        backend="server",
                        host=host_id(),
                        pid=sleeper.pid,
                        pid_started_at=start_time(sleeper.pid),
                        url=f"http://127.0.0.1:{fake.server_address[1]}",
                        fingerprint=spec.fingerprint,
                        model=spec.model,
                        model_policy=spec.model_policy,
                    ),
                    WorkerReady(**ids, instance_id="coder-fake"),
                ]
            )
            assert worker_token("coder-fake")  # the fake ignores tokens; ours still sends one
            rec = run(orch, "coder", "hi")
            assert rec.status == "failed"
            assert "breaks the protocol" in str(rec.error)
            assert "internal error" not in str(rec.error)
        finally:
            sleeper.kill()
            sleeper.wait()
            fake.shutdown()
            fake.server_close()


# 6. Model text cannot drive the terminal ----------------------------------------------------------


def test_run_strips_terminal_control_sequences_but_json_stays_exact(
    tmp_path: Path, chat_server: ChatServer
) -> None:
    bidi = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
    nasty = f"safe\x1b]0;pwned\x07 {bidi}\x1b[2J\x1b[Hline\ttab\nnext"
    chat_server.default.content = nasty
    cfg = lab_config(chat_server.port, "agent").model_dump()
    (tmp_path / "orchestrator.toml").write_text(_toml(cfg))
    store = f"sqlite:///{tmp_path / 'e.db'}"
    env_args = ["--store", store, "--config", str(tmp_path / "orchestrator.toml")]
    plain = _cli(*env_args, "run", "coder", "hi")
    assert plain.returncode == 0, plain.stderr
    assert "\x1b" not in plain.stdout and "\x07" not in plain.stdout
    assert not set(bidi) & set(plain.stdout), "a bidi control reached the terminal"
    assert "line\ttab\nnext" in plain.stdout
    as_json = _cli(*env_args, "run", "coder", "hi", "--json")
    assert json.loads(as_json.stdout)["response"].endswith(f"{bidi}\x1b[2J\x1b[Hline\ttab\nnext")


def _toml(cfg: dict[str, Any]) -> str:
    lines = [
        'extends = "none"',
        f'model = "{cfg["model"]}"',
        f'small_model = "{cfg["small_model"]}"',
    ]
    lab = cfg["providers"]["lab"]
    lines += ["[providers.lab]", 'kind = "openai"', f'base_url = "{lab["base_url"]}"']
    for name in lab["models"]:
        lines.append(f'[providers.lab.models."{name}"]')
    lines += ["[profiles.coder]", 'backend = "agent"']
    return "\n".join(lines) + "\n"


# 7. Validation quirks ---------------------------------------------------------------------


def test_validation_quirks(tmp_path: Path) -> None:
    with Orchestrator.open(config=config_with(), store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        assert op(orch, "memory.put", memory={"key": "k", "value": ""}).status == "completed"
        with pytest.raises(InvalidTaskArgs) as both:
            orch.task_start(worker_id="coder", workerId="coder", task="x")
        assert str(both.value) == (
            "Invalid task_start arguments: worker_id: given twice, as worker_id and workerId; "
            "give one."
        )
        with pytest.raises(InvalidTaskArgs, match='task: belongs to kind="worker"'):
            orch.task_start(kind="op", op="worker.spawn", worker={"worker_id": "coder"}, task="x")
        with pytest.raises(InvalidTaskArgs, match='model: belongs to kind="worker"'):
            orch.task_start(
                kind="op", op="memory.put", memory={"key": "k", "value": "v"}, model="m"
            )
        with pytest.raises(InvalidTaskArgs, match='op: belongs to kind="op"'):
            orch.task_start(kind="worker", worker_id="coder", task="x", op="worker.spawn")


# The property: any payload ends as InvalidTaskArgs or a finished task, and the store stays
# readable and replayable.

_KEYS = st.sampled_from(
    [
        "kind",
        "op",
        "worker_id",
        "workerId",
        "task",
        "model",
        "memory",
        "worker",
        "force_new",
        "attachments",
        "tools",
        "bogus",
        "autoSpawn",
    ]
)
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from(
        [
            "worker",
            "op",
            "coder",
            "docs",
            "memory.put",
            "worker.spawn",
            "worker.model.set",
            "auto:fast",
            "local/echo-small",
            "",
            "../x",
        ]
    ),
    st.text(max_size=20),
    st.builds(lambda n: "w" * n, st.sampled_from([0, 10, 200_001])),
)
_VALUE = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=8,
)
_WORKERS = st.sampled_from(["coder", "docs", "explorer", "dcos"])
_MODELS = st.sampled_from(["auto", "auto:fast", "local/echo-small", "local/echo-smal"])
# Well-formed requests of every kind (some fail when run: an unknown worker, a misspelt
# model), in either key spelling ...
_VALID = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.just("worker"), "task": st.text(max_size=20)},
        optional={"model": _MODELS, "force_new": st.booleans()},
    ).flatmap(
        lambda base: st.sampled_from(["worker_id", "workerId"]).flatmap(
            lambda key: _WORKERS.map(lambda w: {**base, key: w})
        )
    ),
    st.builds(
        lambda w, m: {
            "kind": "op",
            "op": "worker.model.set",
            "worker": {"worker_id": w, "model": m},
        },
        _WORKERS,
        _MODELS,
    ),
    st.builds(
        lambda w: {"kind": "op", "op": "worker.model.reset", "worker": {"workerId": w}}, _WORKERS
    ),
    st.builds(
        lambda k, v: {"kind": "op", "op": "memory.put", "memory": {"key": k, "value": v}},
        st.text(min_size=1, max_size=10),
        st.text(max_size=20),
    ),
)
# ... then, often, broken: a key dropped, added or given any value.
_MUTATION = st.tuples(st.sampled_from(["drop", "set"]), _KEYS, _VALUE)


def _mutated(payload: dict[str, Any], mutations: list[tuple[str, str, Any]]) -> dict[str, Any]:
    payload = dict(payload)
    for how, key, value in mutations:
        if how == "drop":
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


PAYLOADS = st.builds(_mutated, _VALID, st.lists(_MUTATION, max_size=2))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_property_any_payload_is_refused_or_finishes(kind: str, tmp_path: Path) -> None:
    if kind == "sqlite":
        check_payloads(f"sqlite:///{tmp_path / 'p.db'}")
    else:
        with postgres_schema() as pg:
            check_payloads(pg)


def check_payloads(url: str) -> None:
    outcomes = {"refused": 0, "finished": 0}
    with Orchestrator.open(config=config_with(), store=url, session_id="fuzz") as orch:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(payload=PAYLOADS)
        def one(payload: dict[str, Any]) -> None:
            try:
                handle = orch.task_start(**payload)
            except InvalidTaskArgs as exc:
                assert str(exc) and "\n" not in str(exc)
                outcomes["refused"] += 1
                event("refused")
                return
            rec = orch.task_await(handle.task_id, timeout=30)
            assert rec.status in ("completed", "failed"), rec
            outcomes["finished"] += 1
            event(f"finished {rec.status}")

        one()
        # Both branches ran: a property that only ever refuses proves nothing of the rest.
        assert outcomes["refused"] > 0 and outcomes["finished"] > 0, outcomes
        state = replay(orch.log)
        tasks = [t for t in state.tasks.values() if t.session_id == "fuzz"]
        assert len(tasks) == outcomes["finished"]  # each accepted payload is a task ...
        assert all(t.status in ("completed", "failed") for t in tasks)  # ... that ended
        assert state.sessions["fuzz"].running == {}
        orch.task_list(view="events")


def test_view_filters_are_checked_with_suggestions(tmp_path: Path) -> None:
    with Orchestrator.open(config=config_with(), store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        with pytest.raises(InvalidTaskArgs, match='Did you mean "worker_id"'):
            orch.task_list(view="events", worker="coder")
        with pytest.raises(InvalidTaskArgs, match='Did you mean "WorkerSpawned"'):
            orch.task_list(view="events", type="WorkerSpwned")
        with pytest.raises(InvalidTaskArgs, match="a log position is a whole number"):
            orch.task_list(view="replay", until=-3)
    bad = _cli("--store", f"sqlite:///{tmp_path / 'e.db'}", "replay", "--until", "-3")
    assert bad.returncode == 2
    typo = _cli("--store", f"sqlite:///{tmp_path / 'e.db'}", "events", "--type", "WorkerSpwned")
    assert typo.returncode == 2
    assert typo.stderr.strip().endswith('Did you mean "WorkerSpawned"?')


OPENER = """
import sys, time
from orchestrator import Orchestrator
url, go_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, go_at - time.time()))
with Orchestrator.open(store=url, session_id="s" + sys.argv[3]) as orch:
    orch.task_start(kind="op", op="memory.put", memory={"key": sys.argv[3], "value": "v"})
print("opened")
"""


def test_many_processes_opening_a_new_sqlite_store_at_once_all_open_it(tmp_path: Path) -> None:
    # Without one opener at a time, an opener whose read of the schema predates another's
    # DDL commit fails at once with "database is locked", whatever the store's timeout.
    url = f"sqlite:///{tmp_path / 'new.db'}"
    go_at = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, url, str(go_at), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(8)
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [out.strip() for out, _ in outcomes] == ["opened"] * 8, [e for _, e in outcomes]
    log = EventLog(url)
    try:
        keys = {e.key for _, e in log.select() if hasattr(e, "key")}
    finally:
        log.close()
    assert keys == {str(n) for n in range(8)}
    lock = tmp_path / "new.db-lock"
    assert lock.exists() and (lock.stat().st_mode & 0o077) == 0
