"""The `orchestrator` console script, run for real in subprocesses against a temporary store."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import postgres_schema, worker_processes

CLI = [str(Path(sys.executable).parent / "orchestrator")]


def cli(
    store: str, *args: str, session: str | None = "cli", code: int = 0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the console script (with `--session` unless None); assert its exit code."""
    proc = subprocess.run(
        [*CLI, "--store", store, *(["--session", session] if session else []), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc


def cli_json(store: str, *args: str, session: str | None = "cli") -> Any:
    return json.loads(cli(store, *args, "--json", session=session).stdout)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The CLI on every persistent store."""
    if request.param == "postgresql":
        with postgres_schema() as pg_url:
            yield pg_url
    else:
        yield f"sqlite:///{tmp_path / 'cli.db'}"


def test_set_model_then_run_in_two_invocations_is_one_session(url: str) -> None:
    assert cli(url, "run", "coder", "hi").stdout.strip() == "[local/echo-large] hi"
    result = cli_json(url, "set-model", "coder", "local/echo-small")
    assert result["result"]["model"] == "local/echo-small"
    assert cli(url, "run", "coder", "again").stdout.strip() == "[local/echo-small] again"
    assert cli(url, "run", "coder", "x", session="other").stdout.strip() == "[local/echo-large] x"
    cli(url, "reset-model", "coder")
    assert cli(url, "run", "coder", "back").stdout.strip() == "[local/echo-large] back"
    workers = {w["worker_id"]: w for w in cli_json(url, "workers")}
    assert workers["coder"]["model"] == "local/echo-large"
    cli(url, "stop", "--all")


def test_events_filters(url: str) -> None:
    cli(url, "run", "coder", "one")
    cli(url, "run", "docs", "two", session="s2")
    everything = cli_json(url, "events", session=None)  # no --session: every session's
    positions = [e["position"] for e in everything]
    assert positions == sorted(positions) and len(positions) == len(set(positions))
    assert {e["session_id"] for e in everything} == {"cli", "s2"}
    docs = cli_json(url, "events", "--worker", "docs", session=None)
    assert docs and {e["worker_id"] for e in docs} == {"docs"}
    assert {
        e["type"] for e in cli_json(url, "events", "--type", "WorkerSpawned", session=None)
    } == {"WorkerSpawned"}
    assert len(cli_json(url, "events", "--type", "WorkerSpawned", session=None)) == 2
    middle = positions[len(positions) // 2]
    assert [
        e["position"] for e in cli_json(url, "events", "--since", str(middle), session=None)
    ] == [p for p in positions if p > middle]
    cli(url, "stop", "--all")


def test_the_global_session_works_after_the_command_and_events_honours_it(url: str) -> None:
    # Before or after the command name, as option or environment: the same session.
    assert cli(url, "run", "coder", "one", "--session", "s1", session=None).stdout.strip() == (
        "[local/echo-large] one"
    )
    cli(url, "run", "--session=s2", "docs", "two", session=None)
    cli(url, "set-model", "coder", "local/echo-small", "--session", "s1", session=None)
    assert cli(url, "run", "coder", "x", session="s1").stdout.strip() == "[local/echo-small] x"
    assert cli(url, "run", "coder", "--store", url, "y", session="s2").stdout.strip() == (
        "[local/echo-large] y"
    )
    spellings = [
        cli_json(url, "events", session="s2"),
        cli_json(url, "events", "--session", "s2", session=None),
        json.loads(
            subprocess.run(
                [*CLI, "events", "--json", "--store", url],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "ORCHESTRATOR_SESSION": "s2"},
            ).stdout
        ),
    ]
    assert spellings[0] and {e["session_id"] for e in spellings[0]} == {"s2"}
    assert spellings[1] == spellings[0] == spellings[2]
    workers = {w["worker_id"]: w["model"] for w in cli_json(url, "workers", "--session", "s1")}
    assert workers["coder"] == "local/echo-small"
    cli(url, "stop", "--all")


def test_replay_before_and_after_a_set_shows_the_override_absent_then_present(url: str) -> None:
    set_result = cli_json(url, "set-model", "docs", "local/echo-small", "--policy", "dynamic")
    set_event = cli_json(url, "events", "--type", "WorkerModelSet")[0]
    assert set_event["task_id"] == set_result["task_id"]
    before = cli_json(url, "replay", "--until", str(set_event["position"] - 1))
    after = cli_json(url, "replay", "--until", str(set_event["position"]))
    assert before["overrides"] == []
    assert [
        (o["session_id"], o["worker_id"], o["resolved_model"], o["model_policy"])
        for o in after["overrides"]
    ] == [("cli", "docs", "local/echo-small", "dynamic")]
    human = cli(url, "replay", "--until", str(set_event["position"])).stdout
    assert "session overrides" in human and "local/echo-small" in human


def test_explain_task_names_the_override_position_and_the_spawn_or_reuse(url: str) -> None:
    cli(url, "run", "coder", "warm up", session="other")  # a default-model process to refuse
    cli(url, "set-model", "coder", "local/echo-small")
    set_pos = cli_json(url, "events", "--type", "WorkerModelSet")[0]["position"]
    task = cli_json(url, "run", "coder", "explain me")
    expl = cli_json(url, "explain", "task", task["task_id"])
    assert expl["model"] == "local/echo-small"
    assert expl["source"] == "session"
    assert expl["override"]["position"] == set_pos
    assert expl["override"]["model_policy"] == "sticky"
    assert expl["process"]["action"] == "spawned"
    assert [r["reason"] for r in expl["rejections"]] == ["model_mismatch"]
    assert any(f"set at position {set_pos}" in line for line in expl["summary"])

    reuse_task = cli_json(url, "run", "coder", "warm again", session="other")
    reused = cli_json(url, "explain", "task", reuse_task["task_id"])
    assert reused["process"]["action"] == "reused"
    assert reused["source"] == "profile"

    worker = cli_json(url, "explain", "worker", "coder")
    assert worker["model"] == "local/echo-small"
    assert worker["override"]["position"] == set_pos
    assert len(worker["processes"]) == 2
    human = cli(url, "explain", "task", task["task_id"]).stdout
    assert f"set at position {set_pos}" in human
    cli(url, "stop", "--all")


def test_errors_are_one_line_with_the_right_exit_code(url: str, tmp_path: Path) -> None:
    failed = cli(url, "run", "dcos", "x", code=1)
    assert failed.stderr.strip() == 'error: Unknown worker "dcos". Did you mean "docs"?'
    bad_store = cli("mysql://nope", "workers", code=2)
    assert len(bad_store.stderr.strip().splitlines()) == 1
    assert "bad store URL" in bad_store.stderr
    unreadable = tmp_path / "garbage.db"
    unreadable.write_bytes(b"this is not a database" * 100)
    broken = cli(f"sqlite:///{unreadable}", "workers", code=2)
    assert len(broken.stderr.strip().splitlines()) == 1
    assert "cannot open store" in broken.stderr
    unknown = cli(url, "explain", "worker", "codr", code=2)
    assert unknown.stderr.strip() == 'error: Unknown worker "codr". Did you mean "coder"?'
    cli(url, "frobnicate", code=2)
    cli(url, "stop", code=2)


class Lines:
    """A pipe's lines, read on a thread so that every wait for one has a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.queue.put(line)

    def until(self, enough: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
        """The lines read until they are `enough` (fails the test at the deadline)."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while not seen or not enough(seen):
            left = deadline - time.monotonic()
            assert left > 0, f"no such line by the deadline; got {seen}"
            with contextlib.suppress(queue.Empty):
                seen.append(self.queue.get(timeout=left))
        return seen


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup, or a CI runner


@pytest.mark.parametrize(
    ("stop_with", "inherited"),
    [
        (signal.SIGINT, "default"),
        (signal.SIGINT, "ignored"),
        (signal.SIGTERM, "ignored"),
    ],
)
def test_follow_tails_events_appended_by_other_processes_and_stops_on_a_signal(
    url: str, stop_with: signal.Signals, inherited: str
) -> None:
    cli(url, "set-model", "coder", "local/echo-large")  # a store to follow
    follower = subprocess.Popen(
        [*CLI, "--store", url, "events", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint if inherited == "ignored" else None,  # noqa: PLW1509
    )
    try:
        assert follower.stdout is not None and follower.stderr is not None
        stdout, stderr = Lines(follower.stdout), Lines(follower.stderr)
        stderr.until(lambda lines: "following events after position" in lines[-1])
        cli(url, "set-model", "coder", "local/echo-small")
        sets = lambda lines: [json.loads(x)["type"] for x in lines].count("WorkerModelSet")  # noqa: E731
        assert sets(stdout.until(lambda lines: sets(lines) == 2)) == 2
        follower.send_signal(stop_with)
        assert follower.wait(timeout=30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=10)


def test_demo_exits_zero_and_leaves_no_worker_behind(state_home: Path) -> None:
    # Runs on its own temporary SQLite store, whatever the matrix says.
    proc = subprocess.run(
        [*CLI, "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    for step in (
        "reuses the default-model process",
        "refuses reuse",
        "force_new",
        "explain task",
        "WorkerReuseRejected",
        "stopped 4 worker processes",
    ):
        assert step in proc.stdout
    assert worker_processes(state_home) == []


# What each command imports is what it costs to start (ADR-0008): these guard the lazy
# imports without timing anything.
IMPORTS = """
import sys
sys.argv = ["orchestrator", *sys.argv[1:]]
from orchestrator.cli import main
try:
    main()
except SystemExit:
    pass
heavy = ("pydantic", "json", "logging", "psutil", "rapidfuzz", "ssl", "httpx", "http.server",
         "structlog", "eventsourcing")
sys.stderr.write(repr(sorted(m for m in heavy if m in sys.modules)))
"""


def _imported(tmp_path: Path, *argv: str) -> list[str]:
    env = {**os.environ, "ORCHESTRATOR_STORE": f"sqlite:///{tmp_path / 'i.db'}"}
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    return list(ast.literal_eval(out.stderr.strip().splitlines()[-1]))


def test_help_imports_neither_the_store_nor_pydantic_nor_json(tmp_path: Path) -> None:
    assert _imported(tmp_path, "--help") == []


def test_workers_reads_the_log_without_process_http_or_fuzzy_matching_imports(
    tmp_path: Path,
) -> None:
    # The store and the models are needed; liveness probes, HTTP and "did you mean" are not.
    cli(f"sqlite:///{tmp_path / 'i.db'}", "set-model", "coder", "auto")  # a store to read
    assert _imported(tmp_path, "workers") == ["eventsourcing", "json", "logging", "pydantic"]


# --- reading never creates ---------------------------------------------------------------------

READERS = [
    ["events"],
    ["workers"],
    ["registry"],
    ["replay", "--until", "1"],
    ["replay", "--check"],
    ["explain", "task", "t-1"],
    ["explain", "worker", "coder"],
    ["diff", "0"],
    ["usage"],
]


def test_reading_where_there_is_no_sqlite_store_makes_nothing(tmp_path: Path) -> None:
    here = tmp_path / "here"
    here.mkdir()
    conf = tmp_path / "other.toml"
    conf.write_text('model = "local/echo-small"\n')
    for args in [*READERS, ["whatif", "--config", str(conf)]]:
        proc = cli("sqlite:///typo.db", *args, session=None, code=2, cwd=here)
        assert proc.stderr == "error: no orchestrator store at sqlite:///typo.db\n", args
    for command, row in (("models", "local/echo"), ("profiles", "coder")):
        assert row in cli("sqlite:///typo.db", command, cwd=here).stdout  # no store needed
    assert list(here.iterdir()) == []
    missing = cli("sqlite:///nodir/typo.db", "events", code=2, cwd=here)
    assert "directory" in missing.stderr and "does not exist" in missing.stderr
    # Relative to the working directory, and made by a command that writes.
    cli("sqlite:///typo.db", "set-model", "coder", "local/echo-small", cwd=here)
    assert (here / "typo.db").is_file()
    assert cli_json(f"sqlite:///{here / 'typo.db'}", "events")[-1]["type"] == "TaskCompleted"


def test_reading_where_there_is_no_postgresql_store_makes_nothing() -> None:
    from tests.test_events import schema_objects

    with postgres_schema() as url:
        for args in READERS[:3]:
            proc = cli(url, *args, code=2)
            assert proc.stderr == f"error: no orchestrator store at {url}\n"
        assert schema_objects(url.rsplit("schema=", 1)[1]) == {}


# --- help, sentences, numbers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        (["run"], "run [OPTIONS] WORKER TEXT"),
        (["set-model"], "set-model [OPTIONS] WORKER MODEL"),
        (["diff"], "diff [OPTIONS] N [M]"),
        (["explain", "task"], "explain task [OPTIONS] TASK_ID"),
        (["events"], "events [OPTIONS]"),
    ],
)
def test_help_shows_plain_metavars(command: list[str], usage: str) -> None:
    shown = subprocess.run(
        [*CLI, *command, "--help"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert f"Usage: orchestrator {usage}\n" in shown
    for typer_ism in ("{", "<str>", "<int", "range>"):
        assert typer_ism not in shown, shown


def test_set_and_reset_model_say_what_they_did_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    said = cli(url, "set-model", "coder", "auto:fast").stdout
    assert said == (
        "coder uses local/echo-small in session cli "
        "(sticky: tag auto:fast -> small_model local/echo-small)\n"
    )
    back = cli(url, "reset-model", "coder").stdout
    assert back.startswith("coder is back to its profile's model local/echo-large in session cli")
    assert len(back.splitlines()) == 1
    assert cli_json(url, "reset-model", "coder")["result"]["model"] == "local/echo-large"


def test_costs_are_shown_without_float_noise(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    # echo-small: 3 words in at 0.1, 4 out at 0.4 per million = 1.9e-06 (in floats, not quite)
    ran = cli(url, "run", "explorer", "a b c", "--json").stdout
    assert json.loads(ran)["usage"]["cost_usd"] == 1.9e-06 and "1.9e-06" in ran
    usage = cli(url, "usage", "--json").stdout
    assert '"cost_usd": 1.9e-06' in usage
    cli(url, "stop", "--all")


# --- events on a long log ----------------------------------------------------------------------


def _long_log(url: str, count: int) -> None:
    """`count` events of about 1 kB each, written straight to the store."""
    from events.catalogue import TaskStarted
    from events.store import EventLog

    log = EventLog(url)
    batch = 2000
    for start in range(0, count, batch):
        events = [
            TaskStarted(
                session_id="long", task_id=f"t-{n}", kind="worker", args={"task": "x" * 1000}
            )
            for n in range(start, min(start + batch, count))
        ]
        log.append("session:long", events, start)
    log.close()


def _peak_rss_mb(args: list[str], row: str = '"position"') -> tuple[int, float]:
    """Run the CLI with its output read and thrown away: (rows printed, its peak RSS in MB)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        rows = sum(1 for line in proc.stdout if row in line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0
    return rows, usage.ru_maxrss / 1024  # KB on Linux


def test_events_streams_a_long_log_in_flat_memory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'long.db'}"
    _long_log(url, 20_000)
    base = [*CLI, "--store", url, "events", "--json"]
    few, small = _peak_rss_mb([*base, "--limit", "10"])
    every, big = _peak_rss_mb([*base, "--limit", "1000000000"])
    assert (few, every) == (10, 20_000)
    # 20 MB of events: holding them (or their JSON) would show; paging keeps it flat.
    assert big - small < 15, (small, big)
    lines, people = _peak_rss_mb([*base[:-1], "--limit", "1000000000"], row="position=")
    assert lines == 20_000 and people - small < 15, (small, people)
    json.loads(cli(url, "events", "--json", "--limit", "1000000000", session=None).stdout)
