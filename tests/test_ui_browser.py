"""The inspector in a real browser: Playwright driving the system's Chromium.

Skips (one line) where Chromium or the playwright package cannot be had. Screenshots of
every step land in the test's tmp dir; the timeline's also in docs/ for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chat import ChatServer
from tests.ui_session import SESSION, Recorded, record, start_task_elsewhere

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CLI = Path(sys.executable).parent / "orchestrator"
DOCS = Path(__file__).resolve().parent.parent / "docs"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHORT = 10_000  # ms: every wait for the page has a deadline


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return "no chromium here (apt-get install chromium)"
    return None


pytestmark = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


@pytest.fixture
def served(tmp_path: Path, chat_server: ChatServer) -> Iterator[tuple[Recorded, str]]:
    rec = record(f"sqlite:///{tmp_path / 'events.db'}", chat_server)
    config = tmp_path / "orchestrator.toml"
    config.write_text(_toml(rec.config))
    proc = subprocess.Popen(
        [str(CLI), "--store", rec.url, "--config", str(config), "ui", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert re.fullmatch(r"inspector: http://127\.0\.0\.1:\d+/\?token=\S+\n", line), line
    try:
        yield rec, line.split(" ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _toml(config: dict[str, Any]) -> str:
    """The recording's configuration as TOML (flat enough to write by hand)."""
    lab = config["providers"]["lab"]
    lines = [f'{k} = "{config[k]}"' for k in ("extends", "model", "small_model")]
    lines += [
        "[providers.lab]",
        'kind = "openai"',
        f'base_url = "{lab["base_url"]}"',
        "max_retries = 0",
    ]
    for name, cost in lab["models"].items():
        lines += [f"[providers.lab.models.{name}]"]
        lines += [f"{k} = {v}" for k, v in cost.items()]
    lines += ["[profiles.coder]", 'backend = "server"', 'fallback_models = ["lab/small"]']
    return "\n".join(lines) + "\n"


def test_a_debugger_looks_at_a_session(served: tuple[Recorded, str], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    rec, url = served
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(SHORT)
        outside: list[str] = []
        page.on(
            "request",
            lambda r: None if r.url.startswith(url.split("/?")[0]) else outside.append(r.url),
        )

        # The sessions page, opened with the token; the token leaves the address bar.
        page.goto(url)
        expect(page.locator("#sessions")).to_contain_text(SESSION)
        assert "token=" not in page.url
        page.screenshot(path=shots / "1-sessions.png", full_page=True)

        # The session: each task is a bar of the timeline.
        page.click(f"#sessions a:text-is('{SESSION}')")
        expect(page.locator("h1")).to_have_text(f"Session {SESSION}")
        for task_id in (rec.first, rec.after_set, rec.after_reset, rec.fallback, rec.cancelled):
            expect(page.locator(f".bar[data-task-id='{task_id}']")).to_have_count(1)
        for kind in ("set", "reset", "spawn", "reuse", "rejected", "fallback", "cancel"):
            assert page.locator(f".marker-{kind}").count() >= 1, kind
        page.locator("#timeline").screenshot(path=shots / "2-timeline.png")
        shutil.copy(shots / "2-timeline.png", DOCS / "inspector-timeline.png")

        # Time travel: before the set there is no override; from the set on there is.
        stops = _stops(page, url.split("/?")[0])
        set_stop = stops.index(rec.set_position)
        _slide(page, set_stop - 1)
        expect(page.locator("#overrides")).to_contain_text("no overrides")
        page.click("#mark-a")
        _slide(page, set_stop)
        expect(page.locator("#overrides tr.override")).to_contain_text("lab/small")
        page.screenshot(path=shots / "3-travel-after-set.png", full_page=True)
        _slide(page, set_stop + 6)
        page.click("#mark-b")
        expect(page.locator("#diff-rows")).to_contain_text(f"{SESSION}/coder")
        expect(page.locator("#diff-rows tr.diff-added").first).to_be_visible()
        page.screenshot(path=shots / "4-diff.png", full_page=True)

        # A task: its explain chain names the override and the process decision.
        page.click(f".bar[data-task-id='{rec.after_set}']")
        expect(page.locator("#explain")).to_contain_text("session override set at position")
        expect(page.locator("#explain")).to_contain_text("not reused")
        expect(page.locator("#explain")).to_contain_text("spawned process")
        page.screenshot(path=shots / "5-task.png", full_page=True)

        # What-if: a pasted configuration shows the tasks whose model would change.
        page.goto(url.split("/?")[0] + f"/whatif?session={SESSION}")
        page.fill("#config", 'model = "lab/small"\n')
        page.click("#whatif-run")
        expect(page.locator("#whatif-rows")).to_contain_text(rec.first)
        expect(page.locator("#whatif-rows")).to_contain_text("lab/small")
        page.screenshot(path=shots / "6-whatif.png", full_page=True)

        # Live: a task started by another process appears without a reload.
        page.goto(url.split("/?")[0] + f"/sessions/{SESSION}")
        expect(page.locator("#live.on")).to_have_count(1)
        page.evaluate("window.notReloaded = true")
        started = start_task_elsewhere(rec.url)
        expect(page.locator(f".bar[data-task-id='{started}']")).to_have_count(1, timeout=5000)
        assert page.evaluate("window.notReloaded") is True
        page.screenshot(path=shots / "7-live.png", full_page=True)
        browser.close()
    assert outside == []


def _stops(page: Any, base: str) -> list[int]:
    """The session's positions, one per slider stop (the events view of the session)."""
    rows = page.request.get(f"{base}/api/views/events?session_id={SESSION}").json()["rows"]
    return [int(r["position"]) for r in rows]


def _slide(page: Any, stop: int) -> None:
    page.locator("#slider").fill(str(stop))
    page.locator("#slider").dispatch_event("input")
    page.wait_for_selector(f"#travel .travel[data-index='{stop}']")
