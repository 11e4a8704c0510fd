"""Hostile providers and hostile requests: a provider's reply cannot crash an orchestrator,
leak a key, outlast its timeout or fill memory, and a worker process refuses what it cannot
afford to read, on both backends."""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator import InvalidTaskArgs, Orchestrator
from orchestrator.config import BackendKind
from orchestrator.processes import worker_token
from tests.chat import ChatServer, Reply
from tests.helpers import config_with, lab_config, op, run, run_command

ROOT = Path(__file__).parent.parent
KEY = "sk-SECRETkey0123456789abcdefXYZ"
BACKENDS: list[BackendKind] = ["agent", "server"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendKind:
    """Each provider test runs in-process (agent) and in a worker process (server)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def evil_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The key the orchestrator sends with every request to the `lab` provider."""
    monkeypatch.setenv("EVIL_KEY", KEY)
    return KEY


def _leaks(text: str) -> list[str]:
    """What of the key, or of a traceback, shows in `text`."""
    low = text.lower()
    found = [run for run in (KEY[:6], KEY[6:14], KEY[-8:]) if run.lower() in low]
    return found + [word for word in ("Traceback", "locals") if word in text]


def _worker_logs(state_home: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in state_home.rglob("*.log"))


# 1. Malformed replies end the task failed with one line, and nothing prints a traceback ----

MALFORMED = {
    "a 200,000-deep JSON body": b"[" * 200_000 + b"]" * 200_000,
    "a usage count of 1e400": (
        b'{"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 1e400}}'
    ),
    "tool_calls that are a number": b'{"choices": [{"message": {"tool_calls": 5}}]}',
    "a lone surrogate": b'{"choices": [{"message": {"content": "a \\ud800 b"}}]}',
}

SCRIPT = """
import json, sys
from orchestrator import Orchestrator
from tests.helpers import lab_config
port, backend, store, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
if sys.argv[5] == "bug":  # a bug where the provider's reply is read, with the key around
    import orchestrator.providers as providers
    def broken(where, body, credentials={"EVIL_KEY": __import__("os").environ["EVIL_KEY"]}):
        raise KeyError(credentials["EVIL_KEY"])
    providers._completion = broken
cfg = lab_config(port, backend, api_key_env="EVIL_KEY", max_retries=0)
with Orchestrator.open(config=cfg, store=store) as orch:
    for _ in range(count):
        handle = orch.task_start(kind="worker", worker_id="coder", task="hi")
        rec = orch.task_await(handle.task_id, timeout=60)
        print(json.dumps({"status": rec.status, "error": rec.error}))
"""


def _run_script(
    chat_server: ChatServer, backend: str, tmp_path: Path, count: int, mode: str = ""
) -> tuple[list[dict[str, Any]], str]:
    """Tasks run by a fresh orchestrator process with the library's default logging."""
    store = f"sqlite:///{tmp_path / 'e.db'}"
    argv = [sys.executable, "-c", SCRIPT, str(chat_server.port), backend, store, str(count), mode]
    out = run_command(argv, ROOT, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def test_malformed_replies_fail_the_task_with_one_line(
    backend: BackendKind,
    chat_server: ChatServer,
    evil_key: str,
    tmp_path: Path,
    state_home: Path,
) -> None:
    chat_server.script = [Reply(raw=raw) for raw in MALFORMED.values()]
    records, stderr = _run_script(chat_server, backend, tmp_path, len(MALFORMED))
    for what, rec in zip(MALFORMED, records, strict=True):
        assert rec["status"] == "failed", (what, rec)
        error = rec["error"]
        assert error.startswith('Provider "lab" for model "slow" sent '), (what, error)
        assert "\n" not in error and not _leaks(error), (what, error)
    assert not _leaks(stderr), stderr[:3000]
    assert not _leaks(_worker_logs(state_home))


def test_a_bug_ends_the_task_with_one_line_and_prints_no_locals(
    chat_server: ChatServer, evil_key: str, tmp_path: Path
) -> None:
    records, stderr = _run_script(chat_server, "agent", tmp_path, 1, "bug")
    [rec] = records
    assert rec["status"] == "failed"
    assert rec["error"].startswith("internal error: KeyError at ")
    assert "\n" not in rec["error"] and not _leaks(rec["error"])
    assert not _leaks(stderr), stderr[:3000]
    [line] = [line for line in stderr.splitlines() if "task crashed" in line]
    assert "internal error: KeyError" in line


# 2. A key echoed in any case, or cut short, is redacted before it is stored --------------------


def test_an_echoed_key_is_redacted_in_any_case_and_in_part(
    backend: BackendKind, chat_server: ChatServer, evil_key: str, tmp_path: Path
) -> None:
    cfg = lab_config(chat_server.port, backend, api_key_env="EVIL_KEY", max_retries=0)
    echoes = [
        Reply(status=401, error=f"Incorrect API key provided: {KEY.lower()}."),
        Reply(status=400, error="x" * 190 + " " + KEY),  # the excerpt cuts the key short
        Reply(status=500, error=f"upstream refused Bearer {KEY.upper()}"),
        Reply(content=f"your key is {KEY}"),
    ]
    chat_server.script = list(echoes)
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        records = [run(orch, "coder", "hi") for _ in echoes]
        assert [r.status for r in records] == ["failed"] * 3 + ["completed"]
        assert records[0].error.endswith("Incorrect API key provided: ***.")
        assert "***" in records[1].error
        assert "Bearer ***" in records[2].error
        assert records[3].response == "your key is ***"
        for rec in records:
            assert not _leaks(rec.model_dump_json()), rec
        events = json.dumps([e.model_dump(mode="json") for e in orch.task_list(view="events")])
        assert "ModelAttemptFailed" in events
        assert not _leaks(events)
    assert [seen.auth for seen in chat_server.requests] == [f"Bearer {KEY}"] * len(echoes)


# 3. A dripping provider fails the request within its timeout -----------------------------------


@pytest.mark.parametrize("drip", ["head", "body"])
def test_a_dripping_provider_times_out_within_the_timeout(
    backend: BackendKind, drip: str, chat_server: ChatServer, tmp_path: Path
) -> None:
    chat_server.default = Reply(drip=drip, drip_every=0.5)
    cfg = lab_config(chat_server.port, backend, timeout=2, max_retries=1)
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        handle = orch.task_start(kind="worker", worker_id="coder", task="hi")
        rec = orch.task_await(handle.task_id, timeout=20)
        assert rec.status == "failed", rec
        assert rec.error == 'Provider "lab" for model "slow" timed out after 2 s (after 2 attempts)'


# 4. An endless reply is cut off at the reply limit while it streams ----------------------------


def test_an_endless_reply_is_refused_while_it_streams(
    backend: BackendKind, chat_server: ChatServer, tmp_path: Path, state_home: Path
) -> None:
    chat_server.default = Reply(flood=300 * 1024 * 1024)
    cfg = lab_config(chat_server.port, backend, max_retries=0)
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        process = psutil.Process()
        if backend == "server":
            assert op(orch, "worker.spawn", worker={"worker_id": "coder"}).status == "completed"
            [row] = orch.task_list(view="registry")
            process = psutil.Process(row.pid)
        before = process.memory_info().rss
        rec = run(orch, "coder", "tell me everything")
        assert rec.status == "failed"
        assert rec.error == (
            'Provider "lab" for model "slow" sent a reply larger than 7,048,576 bytes, more '
            "than an answer within [limits] max_reply (1,000,000 characters) needs; ask for a "
            "shorter answer."
        )
        grown = process.memory_info().rss - before
        assert grown < 150 * 1024 * 1024, f"RSS grew by {grown:,} bytes"


# 5. A worker reads nothing for an unauthenticated request, and holds a bounded number of ----
#    connections for a bounded time


@pytest.fixture
def worker(tmp_path: Path, chat_server: ChatServer) -> Iterator[tuple[Orchestrator, Any]]:
    """An orchestrator and the registry row of its running worker process."""
    cfg = lab_config(chat_server.port, "server", max_retries=0)
    with Orchestrator.open(config=cfg, store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        assert op(orch, "worker.spawn", worker={"worker_id": "coder"}).status == "completed"
        [row] = orch.task_list(view="registry")
        yield orch, row
        orch.close(stop_workers=True)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _unauthenticated_upload(url: str) -> bytes:
    with socket.create_connection(_address(url), timeout=10) as sock:
        head = (
            "POST /prompt HTTP/1.1\r\nHost: worker\r\nAuthorization: Bearer wrong\r\n"
            "Content-Type: application/json\r\nContent-Length: 62914560\r\n\r\n"
        )
        sock.sendall(head.encode() + b"x" * 65536)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_an_unauthenticated_body_is_refused_unread(worker: tuple[Orchestrator, Any]) -> None:
    _, row = worker
    process = psutil.Process(row.pid)
    before = process.memory_info().rss
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: answers.append(_unauthenticated_upload(row.url)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 8
    assert all(a.startswith(b"HTTP/1.1 401 ") for a in answers), answers
    grown = process.memory_info().rss - before
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown:,} bytes"


def test_idle_connections_do_not_each_hold_a_thread(worker: tuple[Orchestrator, Any]) -> None:
    orch, row = worker
    process = psutil.Process(row.pid)
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(_address(row.url), timeout=10))
        most = 0
        for _ in range(20):  # the accept loop takes them at its own pace: sample a while
            most = max(most, process.num_threads())
            time.sleep(0.1)
        assert most <= 48, f"{most} threads for 300 idle connections"
        # A real request still gets through: an idle connection makes room for it.
        assert run(orch, "coder", "still there?").status == "completed"
    finally:
        for sock in socks:
            sock.close()


def test_a_slowloris_request_is_hung_up_on(worker: tuple[Orchestrator, Any]) -> None:
    _, row = worker
    with socket.create_connection(_address(row.url), timeout=10) as sock:
        sock.sendall(b"POST /prompt HTTP/1.1\r\nHost: worker\r\n")
        deadline = time.monotonic() + 25
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"X")
                readable, _, _ = select.select([sock], [], [], 0.5)
                closed = bool(readable) and sock.recv(4096) == b""
            except OSError:  # reset: closed all the same
                closed = True
        assert closed, "the worker still holds a request that drips one byte at a time"


# 6. A body nested too deeply is a 400 with one line -------------------------------------------


def test_a_deeply_nested_body_is_a_400(worker: tuple[Orchestrator, Any], state_home: Path) -> None:
    import httpx

    _, row = worker
    body = b"[" * 100_000 + b"]" * 100_000
    token = worker_token(row.instance_id)
    resp = httpx.post(
        f"{row.url}/prompt",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 400
    assert resp.json() == {"error": "body is not JSON this worker reads: it nests too deeply"}
    assert "\n" not in resp.text.strip()
    assert "Traceback" not in _worker_logs(state_home)


# 12. Text the store cannot hold is InvalidTaskArgs naming the field ---------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"kind": "worker", "worker_id": "coder", "task": "a \ud800 b"}, "task"),
        (
            {"kind": "op", "op": "memory.put", "memory": {"key": "k", "value": "\udfff"}},
            "memory.value",
        ),
        (
            {"kind": "op", "op": "memory.put", "memory": {"key": "k\ud800", "value": "v"}},
            "memory.key",
        ),
        (
            {"kind": "worker", "worker_id": "coder", "task": "t", "tools": [{"x": "\ud800"}]},
            "tools.0.x",
        ),
        (
            {"kind": "worker", "worker_id": "coder", "task": "t", "tools": [{"\ud800": 1}]},
            "tools.0",
        ),
        (
            {"kind": "worker", "worker_id": "coder", "task": "t", "tools": [{"n": 10**30}]},
            "tools.0.n",
        ),
        (
            {"kind": "worker", "worker_id": "coder", "task": "t", "tools": [{"n": float("nan")}]},
            "tools.0.n",
        ),
        (
            {
                "kind": "op",
                "op": "session.fork",
                "session": {"from_session_id": "s", "position": 10**30},
            },
            "session.position",
        ),
    ],
)
def test_text_and_numbers_the_store_cannot_hold_are_invalid_args(
    payload: dict[str, Any], field: str, tmp_path: Path
) -> None:
    with Orchestrator.open(config=config_with(), store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        with pytest.raises(InvalidTaskArgs) as raised:
            orch.task_start(**payload)
        message = str(raised.value)
        assert f"{field}: " in message, message
        message.encode()  # printable: the bad text is not in the message
        assert orch.task_list(view="events") == []


def test_a_task_id_the_store_cannot_hold_is_invalid_args(tmp_path: Path) -> None:
    with Orchestrator.open(config=config_with(), store=f"sqlite:///{tmp_path / 'e.db'}") as orch:
        for call in (orch.task_peek, orch.task_await, orch.task_cancel):
            with pytest.raises(InvalidTaskArgs, match=r"task_id: .*\\ud800") as raised:
                call("t-\ud800")
            str(raised.value).encode()


CLI_BUG = """
import os, sys
from orchestrator import Orchestrator
def broken(self, view="tasks", **filters):  # a bug, with the key in a local and the message
    credentials = {"EVIL_KEY": os.environ["EVIL_KEY"]}
    raise KeyError(credentials["EVIL_KEY"])
Orchestrator.task_list = broken
from events import EventLog
EventLog(sys.argv[1]).close()  # a store to read: reading never creates one
sys.argv = ["orchestrator", "--store", sys.argv[1], "events"]
from orchestrator.cli import main
main()
"""


def test_a_cli_bug_prints_one_line_and_no_locals(evil_key: str, tmp_path: Path) -> None:
    out = run_command([sys.executable, "-c", CLI_BUG, f"sqlite:///{tmp_path / 'e.db'}"], ROOT)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: internal error: KeyError at "), line
    assert not _leaks(out.stderr)


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"task_id": "t-\ud800"}, "task_id"),
        ({"session_id": "s-\udfff"}, "session_id"),
        ({"worker_id": "x" * 500}, "worker_id"),
        ({"since": 10**30}, "since"),
        ({"until": 10**30}, "until"),
        ({"limit": 10**30}, "limit"),
    ],
)
def test_events_filters_a_store_cannot_hold_are_invalid_args(
    tmp_path: Path, filters: dict[str, Any], field: str
) -> None:
    store = f"sqlite:///{tmp_path / 'e.db'}"
    with (
        Orchestrator.open(config=config_with(), store=store) as orch,
        pytest.raises(InvalidTaskArgs, match=rf"^Invalid task_list arguments: {field}: "),
    ):
        orch.task_list(view="events", **filters)
