"""The inspector's JSON API, token, stream and read-only promise (`orchestrator ui`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("starlette", reason="the ui extra is not installed")

from starlette.testclient import TestClient

from events.store import EventLog
from orchestrator import Orchestrator, views
from orchestrator.ui import app
from orchestrator.ui.app import API_PAGES, create_app
from orchestrator.ui.data import Inspector
from tests.chat import ChatServer
from tests.ui_session import (
    SESSION,
    TOKEN,
    Recorded,
    api_client,
    inspecting,
    record,
    start_task_elsewhere,
    view_queries,
)

CLI = Path(sys.executable).parent / "orchestrator"


@pytest.fixture
def recorded(tmp_path: Path, chat_server: ChatServer) -> Recorded:
    return record(f"sqlite:///{tmp_path / 'events.db'}", chat_server)


@pytest.fixture
def inspector(recorded: Recorded) -> Iterator[Inspector]:
    with inspecting(recorded.url, recorded.config) as data:
        yield data


@pytest.fixture
def client(inspector: Inspector) -> Iterator[TestClient]:
    with api_client(inspector, follow_redirects=False) as c:
        yield c


def as_query(filters: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in filters.items()}


def test_every_view_through_the_api_equals_task_list(
    client: TestClient, recorded: Recorded, tmp_path: Path
) -> None:
    whatif_file = tmp_path / "whatif.toml"
    whatif_file.write_text('model = "lab/small"\n')
    with Orchestrator.open(config=recorded.config, store=recorded.url, session_id=SESSION) as o:
        for view, filters in view_queries(recorded, whatif_file):
            reply = client.get(
                f"/api/views/{view}", params={"session_id": SESSION, **as_query(filters)}
            )
            assert reply.status_code == 200, (view, reply.text)
            # The filters the API applied: the session to the views that take one, and the
            # default page to the paged views.
            applied = dict(filters)
            if "session_id" in views.filters_of(views.VIEWS[view]):
                applied.setdefault("session_id", SESSION)
            if view in API_PAGES:
                applied.setdefault("limit", API_PAGES[view])
            expected = [r.model_dump(mode="json") for r in o.task_list(view, **applied)]
            assert reply.json()["rows"] == json.loads(json.dumps(expected)), (view, filters)
            assert reply.json()["rows"], (view, filters)
            assert set(reply.json()) <= {"rows", "next"}, (view, filters)


def test_paged_views_say_where_the_next_page_starts(
    client: TestClient, recorded: Recorded, tmp_path: Path
) -> None:
    whatif_file = tmp_path / "whatif.toml"
    whatif_file.write_text('model = "lab/small"\n')
    with Orchestrator.open(config=recorded.config, store=recorded.url, session_id=SESSION) as o:
        wholes = {
            "events": o.task_list("events"),
            "whatif": o.task_list("whatif", config=str(whatif_file)),
            "replay": o.task_list("replay", until=recorded.set_position + 30)[0].tasks,
        }
    queries = {
        "events": {"limit": "4"},
        "whatif": {"config": str(whatif_file), "limit": "2"},
        "replay": {"until": str(recorded.set_position + 30), "limit": "2"},
    }
    for view, query in queries.items():
        walked: list[Any] = []
        reply = client.get(f"/api/views/{view}", params=query)
        while True:
            assert reply.status_code == 200, (view, reply.text)
            body = reply.json()
            walked += body["rows"][0]["tasks"] if view == "replay" else body["rows"]
            if "next" not in body:
                break
            assert body["next"].startswith(f"/api/views/{view}?") and "since=" in body["next"]
            reply = client.get(body["next"])
        whole = [r.model_dump(mode="json") for r in wholes[view]]
        if view == "replay":  # pages in log order, each oldest first
            whole.sort(key=lambda t: t["task_id"])
            walked.sort(key=lambda t: t["task_id"])
        assert walked == json.loads(json.dumps(whole)), view
        assert len(walked) > 2, view


def test_the_whatif_page_shows_a_page_of_decisions_and_the_next(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "WHATIF_PAGE", 2)
    config = 'model = "lab/small"'
    seen = 0
    form = {"config": config, "session": ""}
    for _ in range(10):
        page = client.post("/whatif", data=form)
        assert page.status_code == 200
        seen += page.text.count('<tr><td><a href="/tasks/')
        found = re.search(r'name="since" value="(\d+)"', page.text)
        if found is None:
            break
        form = {"config": config, "session": "", "since": found.group(1)}
    else:
        raise AssertionError("no last page")
    assert seen >= 2  # the changed rows of every page
    bad = client.post("/whatif", data={"config": config, "since": "x"})
    assert "since: a log position" in bad.text


def test_unknown_view_or_filter_is_400_with_did_you_mean(client: TestClient) -> None:
    reply = client.get("/api/views/taks")
    assert reply.status_code == 400
    assert 'unknown view "taks"' in reply.json()["error"]
    assert 'Did you mean "tasks"' in reply.json()["error"]
    reply = client.get("/api/views/events", params={"wroker_id": "coder"})
    assert reply.status_code == 400
    assert 'Did you mean "worker_id"' in reply.json()["error"]


def test_requests_without_the_token_get_401_and_the_query_token_sets_a_strict_cookie(
    inspector: Inspector,
) -> None:
    with TestClient(create_app(inspector, TOKEN), follow_redirects=False) as c:
        for path in ("/", f"/sessions/{SESSION}", "/api/views/tasks", "/static/app.js"):
            assert c.get(path).status_code == 401, path
        assert c.get("/", params={"token": "wrong"}).status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        first = c.get("/events", params={"token": TOKEN, "limit": "5"})
        assert first.status_code == 303
        assert first.headers["location"] == "/events?limit=5"  # the token leaves the URL
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert c.get("/events?limit=5").status_code == 200  # the cookie carries it now
    with TestClient(create_app(inspector, TOKEN)) as c:
        ok = c.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and SESSION in ok.text
        assert "default-src 'self'" in ok.headers["content-security-policy"]


def test_serving_every_page_and_api_call_appends_nothing(
    client: TestClient, recorded: Recorded, tmp_path: Path
) -> None:
    log = EventLog(recorded.url)
    before = log.head()
    whatif_file = tmp_path / "whatif.toml"
    whatif_file.write_text('model = "lab/small"\n')
    pages = [
        "/",
        f"/sessions/{SESSION}",
        f"/sessions/{SESSION}/timeline",
        f"/sessions/{SESSION}/at?index=0",
        f"/sessions/{SESSION}/at",
        f"/sessions/{SESSION}/diff?a=0&b=20",
        f"/tasks/{recorded.cancelled}",
        f"/tasks/{recorded.after_set}",
        "/processes",
        "/events",
        "/events?type=TaskStarted&limit=2",
        "/usage",
        "/whatif",
    ]
    for page in pages:
        assert client.get(page).status_code == 200, page
    posted = client.post("/whatif", data={"config": 'model = "lab/small"', "session": SESSION})
    assert posted.status_code == 200
    for view, filters in view_queries(recorded, whatif_file):
        client.get(f"/api/views/{view}", params={"session_id": SESSION, **as_query(filters)})
    client.get("/api/views/tasks", params={"session_id": "never-seen"})
    assert log.head() == before
    log.close()


def test_the_time_travel_diff_is_the_diff_views_rows_for_the_session(
    inspector: Inspector, recorded: Recorded
) -> None:
    past = inspector.history(SESSION)
    a, b = 3, past.stops.index(recorded.set_position) + 5
    rows = inspector.travel_diff(SESSION, a, b)
    whole = inspector.view("diff", {"since": past.stops[a], "until": past.stops[b]})
    ours = {r.key for r in rows}
    assert [r for r in whole if r.key in ours] == rows
    assert [r.key for r in whole if r.scope == "override"] == [f"{SESSION}/coder"]
    assert {r.key for r in whole if r.scope == "task"} <= ours
    before = inspector.travel(SESSION, past.stops.index(recorded.set_position) - 1)
    after = inspector.travel(SESSION, past.stops.index(recorded.set_position))
    assert before.overrides == {}
    assert after.overrides["coder"].resolved_model == "lab/small"


def test_a_sessions_whatif_equals_the_view(inspector: Inspector) -> None:
    from orchestrator.config import load_config

    config = load_config({"model": "lab/small"} | inspector.config.model_dump(exclude={"model"}))
    rows = inspector.whatif(config, SESSION)
    assert rows == inspector.view("whatif", {"config": config, "session_id": SESSION})
    assert [r.changed for r in rows].count(True) >= 2


def _serve(url: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(CLI), "--store", url, "ui", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the one line (the CLI prints it once it listens)
    return proc, line


def test_cli_prints_one_line_and_the_stream_delivers_another_process_append(
    recorded: Recorded,
) -> None:
    proc, line = _serve(recorded.url)
    try:
        found = re.fullmatch(r"inspector: (http://127\.0\.0\.1:\d+)/\?token=(\S+)\n", line)
        assert found, line
        base, token = found.groups()
        assert httpx.get(f"{base}/api/views/tasks", timeout=10).status_code == 401
        head = EventLog(recorded.url).head()
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.stream(
            "GET", f"{base}/api/stream", params={"after": head}, headers=auth, timeout=10
        ) as stream:
            started = start_task_elsewhere(recorded.url)
            deadline = time.monotonic() + 20
            seen: list[dict[str, Any]] = []
            for text in stream.iter_lines():
                if text.startswith("data: "):
                    seen.append(json.loads(text[6:]))
                if any(r["task_id"] == started and r["type"] == "TaskStarted" for r in seen):
                    break
                assert time.monotonic() < deadline, seen
        assert all(r["position"] > head for r in seen)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_on_a_missing_store_says_so_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    done = subprocess.run(
        [str(CLI), "--store", f"sqlite:///{missing}", "ui", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: no orchestrator store at sqlite:///{missing}"
    assert not missing.exists()


def test_a_continued_tasks_page_shows_the_conversation_it_carried(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'conv.db'}"
    with Orchestrator.open(store=url, session_id="talk") as orch:
        first = orch.task_start(kind="worker", worker_id="coder", task="first question")
        assert orch.task_await(first.task_id, timeout=30).status == "completed"
        second = orch.task_start(
            kind="worker", worker_id="coder", task="follow-up", continue_from=first.task_id
        )
        rec = orch.task_await(second.task_id, timeout=30)
        assert rec.status == "completed", rec.error
        config = orch.config
    with inspecting(url, config) as data, api_client(data, follow_redirects=False) as c:
        page = c.get(f"/tasks/{second.task_id}")
    assert page.status_code == 200
    table = page.text[page.text.index('id="conversation"') :]
    table = table[: table.index("</table>")]
    for text in ("first question", f"[{rec.model}] first question", "follow-up"):
        assert text in table, text
    assert f'href="/tasks/{first.task_id}"' in table
