"""Session-scoped worker model set/reset, seen through the echo replies."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Orchestrator
from orchestrator.config import ModelInfo
from tests.conftest import OpenOrch
from tests.helpers import config_with, reset_model, run, set_model


@pytest.mark.parametrize("backend", ["agent", "server"])
def test_set_then_reset_changes_the_serving_model_for_this_session_only(
    open_orch: OpenOrch, backend: str
) -> None:
    cfg = config_with(backend)  # type: ignore[arg-type]
    a = open_orch(config=cfg, session_id="a")
    b = open_orch(config=cfg, session_id="b")

    assert run(a, "coder", "hi").response == "[local/echo-large] hi"

    result = set_model(a, "coder", "local/echo-small").result
    assert result["model"] == "local/echo-small"
    assert result["model_policy"] == "sticky"
    assert set(result) == {
        "worker_id",
        "model_ref",
        "model",
        "model_policy",
        "reason",
        "running",
        "respawned",
    }

    assert run(a, "coder", "next").response == "[local/echo-small] next"
    assert run(b, "coder", "other").response == "[local/echo-large] other"

    reset = reset_model(a, "coder").result
    assert reset["model_policy"] == "dynamic"
    assert reset["model"] == "local/echo-large"
    assert run(a, "coder", "back").response == "[local/echo-large] back"


def test_override_survives_reopening_the_session_on_the_same_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    cfg = config_with("agent")
    with Orchestrator.open(config=cfg, store=url, session_id="keep") as first:
        set_model(first, "docs", "local/echo-vision")
    with Orchestrator.open(config=cfg, store=url, session_id="keep") as again:
        assert run(again, "docs", "x").response == "[local/echo-vision] x"
    with Orchestrator.open(config=cfg, store=url, session_id="fresh") as other:
        assert run(other, "docs", "x").response == "[local/echo-large] x"


def test_a_new_session_id_is_generated_when_none_is_given(open_orch: OpenOrch) -> None:
    one, two = open_orch(config=config_with()), open_orch(config=config_with())
    assert one.session_id != two.session_id
    set_model(one, "coder", "local/echo-small")
    assert run(two, "coder", "t").response == "[local/echo-large] t"


def test_per_task_model_beats_the_session_override_for_that_task_only(
    open_orch: OpenOrch,
) -> None:
    orch = open_orch(config=config_with())
    set_model(orch, "coder", "local/echo-small")
    assert run(orch, "coder", "t", model="local/echo-vision").response == ("[local/echo-vision] t")
    assert run(orch, "coder", "u").response == "[local/echo-small] u"


def _with_tiny_model(small_model: str) -> object:
    cfg = config_with("agent", small_model=small_model)
    cfg.providers["local"].models["echo-tiny"] = ModelInfo(name="Tiny", cost_input=0.01)
    return cfg


@pytest.mark.parametrize(
    ("policy", "after_change"),
    [("sticky", "local/echo-small"), ("dynamic", "local/echo-tiny")],
)
def test_sticky_pins_the_resolved_model_while_dynamic_follows_config(
    open_orch: OpenOrch, policy: str, after_change: str
) -> None:
    before = open_orch(config=_with_tiny_model("local/echo-small"), session_id="s")
    result = set_model(before, "coder", "auto:fast", model_policy=policy).result
    assert result["model"] == "local/echo-small"
    assert run(before, "coder", "one").response == "[local/echo-small] one"

    # The user edits small_model and the session resumes with the new config.
    after = open_orch(config=_with_tiny_model("local/echo-tiny"), session_id="s")
    assert run(after, "coder", "two").response == f"[{after_change}] two"


def test_a_known_worker_that_is_not_running_can_be_set(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with("server"))
    result = set_model(orch, "vision", "local/echo-vision").result
    assert result["running"] is False
    assert result["respawned"] is False
    assert orch.task_list(view="registry") == []  # setting did not start anything
    workers = {w.worker_id: w for w in orch.task_list(view="workers")}
    assert workers["vision"].model == "local/echo-vision"
    assert workers["vision"].model_policy == "sticky"


def test_unknown_model_fails_the_task_with_a_suggestion(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with())
    rec = set_model(orch, "coder", "local/echo-smal")
    assert rec.status == "failed"
    assert rec.error == 'Model "local/echo-smal" not found. Did you mean "local/echo-small"?'
    # Nothing changed: the default still serves.
    assert run(orch, "coder", "x").response == "[local/echo-large] x"


def test_unknown_worker_fails_with_the_closest_profile(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with())
    rec = run(orch, "dcos", "hello")
    assert rec.status == "failed"
    assert rec.error == 'Unknown worker "dcos". Did you mean "docs"?'
    assert set_model(orch, "codr", "auto").error == 'Unknown worker "codr". Did you mean "coder"?'


def test_every_attempt_is_in_the_log_even_failed_ones(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with())
    rec = run(orch, "dcos", "hello")
    types = [e.type for e in orch.task_list(view="events", task_id=rec.task_id)]
    assert types == ["TaskStarted", "TaskFailed"]
