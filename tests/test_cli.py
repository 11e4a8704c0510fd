"""The `orchestrator` console script, run for real in subprocesses against a temporary store."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import postgres_schema, worker_processes

CLI = [str(Path(sys.executable).parent / "orchestrator")]


def cli(
    store: str, *args: str, session: str = "cli", code: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run the console script; assert its exit code."""
    proc = subprocess.run(
        [*CLI, "--store", store, "--session", session, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc


def cli_json(store: str, *args: str, session: str = "cli") -> Any:
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
    everything = cli_json(url, "events")
    positions = [e["position"] for e in everything]
    assert positions == sorted(positions) and len(positions) == len(set(positions))
    assert {e["worker_id"] for e in cli_json(url, "events", "--worker", "docs")} == {"docs"}
    assert {e["type"] for e in cli_json(url, "events", "--type", "WorkerSpawned")} == {
        "WorkerSpawned"
    }
    assert len(cli_json(url, "events", "--type", "WorkerSpawned")) == 2
    assert {e["session_id"] for e in cli_json(url, "events", "--session", "s2")} == {"s2"}
    middle = positions[len(positions) // 2]
    assert [e["position"] for e in cli_json(url, "events", "--since", str(middle))] == [
        p for p in positions if p > middle
    ]
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


def test_follow_tails_events_appended_by_other_processes(url: str) -> None:
    follower = subprocess.Popen(
        [*CLI, "--store", url, "events", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        cli(url, "set-model", "coder", "local/echo-small")
        deadline = time.monotonic() + 20
        seen: list[str] = []
        assert follower.stdout is not None
        while "WorkerModelSet" not in seen and time.monotonic() < deadline:
            line = follower.stdout.readline()
            if line:
                seen.append(json.loads(line)["type"])
        assert "WorkerModelSet" in seen
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
    assert follower.returncode == 0
    assert "following events" in (follower.stderr.read() if follower.stderr else "")


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
    assert _imported(tmp_path, "workers") == ["eventsourcing", "json", "logging", "pydantic"]
