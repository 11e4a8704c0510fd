"""Real LLM work against a local OpenAI-protocol server: usage and cost, fallbacks and
cooldowns, tool calls, configuration layering and its errors, store URLs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.store import EventLog, StoreError
from orchestrator import Orchestrator
from orchestrator.config import ConfigError, load_config
from tests.chat import ChatServer, Reply
from tests.chat import chat_server as serve_chat
from tests.conftest import OpenOrch
from tests.helpers import WEATHER_TOOL, lab_settings, run, run_command, weather_call

ROOT = Path(__file__).parent.parent
CLI = [str(Path(sys.executable).parent / "orchestrator")]


@pytest.fixture
def store(tmp_path: Path) -> str:
    """Provider behaviour does not depend on the store: one SQLite file per test."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def lab(port: int, backend: str = "agent", fallbacks: tuple[str, ...] = (), **extra: Any) -> dict:
    """A config with provider `lab` (models big, small, spare; priced) on a local port."""
    models = {
        "big": {"cost_input": 2.0, "cost_output": 10.0, "tool_call": True},
        "small": {"cost_input": 0.5, "cost_output": 1.0},
        "spare": {},
    }
    profiles = {"coder": {"backend": backend, "fallback_models": list(fallbacks)}}
    return lab_settings(port, models, **{"profiles": profiles, **extra})


def models_asked(server: ChatServer) -> list[str]:
    return [r.body["model"] for r in server.requests]


# --- usage and cost ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["agent", "server"])
def test_usage_and_cost_are_recorded_per_task_and_summed_in_the_view(
    open_orch: OpenOrch, chat_server: ChatServer, backend: str
) -> None:
    orch = open_orch(config=lab(chat_server.port, backend), session_id="u")
    chat_server.default.usage = {"prompt_tokens": 1000, "completion_tokens": 200}
    first, second = run(orch, "coder", "one"), run(orch, "coder", "two")
    assert first.usage == {"input_tokens": 1000, "output_tokens": 200, "cost_usd": 0.004}
    assert second.status == "completed"
    rows = orch.task_list(view="usage")
    assert [(r.worker_id, r.model, r.tasks, r.input_tokens, r.output_tokens) for r in rows] == [
        ("coder", "lab/big", 2, 2000, 400)
    ]
    assert rows[0].cost_usd == pytest.approx(0.008)
    chat_server.default.usage = None  # a server that reports no usage
    assert run(orch, "coder", "three").usage is None


def test_echo_counts_words_and_the_view_filters_by_session(open_orch: OpenOrch) -> None:
    a = open_orch(session_id="a")
    b = open_orch(session_id="b")
    rec = run(a, "coder", "three little words")
    assert rec.usage is not None
    assert (rec.usage["input_tokens"], rec.usage["output_tokens"]) == (3, 4)
    assert rec.usage["cost_usd"] == pytest.approx((3 * 3.0 + 4 * 15.0) / 1e6)
    run(b, "explorer", "hi")
    assert {r.session_id for r in a.task_list(view="usage")} == {"a"}
    assert {r.session_id for r in a.task_list(view="usage", session_id=None)} == {"a", "b"}
    last = a.task_list(view="events")[-1].position
    assert a.task_list(view="usage", session_id=None, since=last) == []


# --- fallbacks and cooldowns ---------------------------------------------------------------------


def test_a_500_falls_back_to_the_next_model_and_explain_shows_the_chain(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    orch = open_orch(config=lab(chat_server.port, fallbacks=("lab/small",)))
    chat_server.script = [Reply(status=500, error="big is down")]
    rec = run(orch, "coder", "hello")
    assert rec.status == "completed", rec.error
    assert rec.model == "lab/small" and rec.response == "small says hello"
    assert models_asked(chat_server) == ["big", "small"]
    assert rec.attempts == [
        {
            "model": "lab/big",
            "error": 'Provider "lab" for model "big" answered HTTP 500: big is down',
        }
    ]
    failed = orch.task_list(view="events", type="ModelAttemptFailed", task_id=rec.task_id)
    assert [(e.data["model"], e.data["retryable"]) for e in failed] == [("lab/big", True)]
    expl = orch.task_list(view="explain", task_id=rec.task_id)[0]
    assert any("attempt with lab/big failed" in line for line in expl.summary)
    assert "served by model lab/small" in expl.summary


def test_a_400_the_request_caused_does_not_fall_back(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    orch = open_orch(config=lab(chat_server.port, fallbacks=("lab/small",)))
    chat_server.script = [Reply(status=400, error="context too long")]
    rec = run(orch, "coder", "hello")
    assert rec.status == "failed"
    assert rec.error == 'Provider "lab" for model "big" answered HTTP 400: context too long'
    assert models_asked(chat_server) == ["big"]
    assert len(rec.attempts) == 1


def test_a_dead_endpoint_is_cooled_down_and_the_cooldown_lapses(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    pool = {"cooldown_after": 3, "cooldown_window": 60, "cooldown_for": 1.0}
    orch = open_orch(config=lab(chat_server.port, fallbacks=("lab/small",), pool=pool))
    chat_server.script = [
        Reply(status=503),
        Reply(),
        Reply(status=503),
        Reply(),
        Reply(status=503),
        Reply(),
    ]
    for i in range(3):
        rec = run(orch, "coder", str(i))
        assert rec.model == "lab/small", rec.error
    cooled = orch.task_list(view="events", type="ModelCooledDown")
    assert [e.data["model"] for e in cooled] == ["lab/big"]
    # The fourth task does not hammer big again: it goes straight to small.
    asked = len(chat_server.requests)
    rec = run(orch, "coder", "fourth")
    assert rec.model == "lab/small" and rec.attempts == []
    assert models_asked(chat_server)[asked:] == ["small"]
    # After the cooldown big is tried again (and now answers).
    from tests.helpers import wait_for

    wait_for(lambda: run(orch, "coder", "later").model == "lab/big", timeout=10, every=0.3)


def test_an_explicit_model_is_tried_even_while_cooling_down(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    pool = {"cooldown_after": 1, "cooldown_for": 60}
    orch = open_orch(config=lab(chat_server.port, fallbacks=("lab/small",), pool=pool))
    chat_server.script = [Reply(status=503)]
    assert run(orch, "coder", "x").model == "lab/small"
    assert run(orch, "coder", "y", model="lab/big").model == "lab/big"  # explicit: tried
    assert run(orch, "coder", "z").model == "lab/small"  # the tag's big is skipped


OUTCOMES = st.lists(st.sampled_from(["ok", "500", "400"]), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(outcomes=OUTCOMES)
def test_property_served_model_follows_the_fallback_and_cooldown_rule(
    tmp_path_factory: pytest.TempPathFactory, outcomes: list[str]
) -> None:
    pool = {"cooldown_after": 2, "cooldown_window": 600, "cooldown_for": 600}
    chain = ["lab/big", "lab/small", "lab/spare"]
    with serve_chat() as server:
        server.script = [Reply(status=int(o)) if o != "ok" else Reply() for o in outcomes]
        cfg = lab(server.port, fallbacks=("lab/small", "lab/spare"), pool=pool)
        url = f"sqlite:///{tmp_path_factory.mktemp('p') / 'e.db'}"
        # The oracle: per task, try the chain minus cooled models; 5xx moves on, 400 ends.
        fails: dict[str, int] = {}
        cooled: set[str] = set()
        served: list[str | None] = []
        expected_attempts = 0
        replies = list(outcomes)
        with Orchestrator.open(config=cfg, store=url) as orch:
            while replies:
                rec = run(orch, "coder", "q")
                got = None
                for model in [m for m in chain if m not in cooled]:
                    outcome = replies.pop(0) if replies else "ok"
                    if outcome == "ok":
                        got = model
                        break
                    expected_attempts += 1
                    if outcome == "400":
                        break
                    fails[model] = fails.get(model, 0) + 1
                    if fails[model] >= 2:
                        cooled.add(model)
                        fails[model] = 0
                served.append(got)
                assert rec.model == got, (outcomes, rec.attempts, rec.error)
                if not [m for m in chain if m not in cooled]:
                    break
            logged = orch.task_list(view="events", type="ModelAttemptFailed")
            assert len(logged) == expected_attempts
            cooled_logged = {
                e.data["model"] for e in orch.task_list(view="events", type="ModelCooledDown")
            }
            assert cooled_logged == cooled


# --- tool calls ----------------------------------------------------------------------------------

TOOL = WEATHER_TOOL
CALL = weather_call(1, "Paris")


@pytest.mark.parametrize("backend", ["agent", "server"])
def test_tools_reach_the_model_and_tool_calls_come_back(
    open_orch: OpenOrch, chat_server: ChatServer, backend: str
) -> None:
    orch = open_orch(config=lab(chat_server.port, backend))
    chat_server.script = [Reply(content=None, tool_calls=[CALL])]
    rec = run(orch, "coder", "weather in Paris?", tools=[TOOL])
    assert rec.status == "completed", rec.error
    assert rec.tool_calls == [CALL]
    assert rec.response == ""  # never the text "None"
    assert chat_server.requests[-1].body["tools"] == [TOOL]


# --- configuration -------------------------------------------------------------------------------

README_TOML = """
model = "openai/gpt-4o-mini"

[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "OPENAI_API_KEY"
[providers.openai.models."gpt-4o-mini"]
tool_call = true
context = 128000

[profiles.docs]
model = "openai/gpt-4o-mini"
"""


def test_a_file_extends_the_built_in_default(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.toml"
    path.write_text(README_TOML)
    cfg = load_config(path)
    assert set(cfg.providers) == {"local", "openai"}
    assert set(cfg.profiles) == {"coder", "docs", "explorer", "vision", "architect"}
    assert cfg.profiles["docs"].model == "openai/gpt-4o-mini"
    assert cfg.model == "openai/gpt-4o-mini" and cfg.small_model == "local/echo-small"
    path.write_text('extends = "none"\n' + README_TOML)
    bare = load_config(path)
    assert set(bare.providers) == {"openai"} and set(bare.profiles) == {"docs"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[providers.lab]\nkind = "opanai"\n',
            'orchestrator.toml: providers.lab.kind: must be "openai" or "echo", got "opanai"',
        ),
        ('modle = "x"\n', 'orchestrator.toml: modle: unknown key; did you mean "model"?'),
        ("[pool]\nmax_processes = 0\n", "orchestrator.toml: pool.max_processes: "),
        ("model = [\n", "orchestrator.toml: TOML syntax error: "),
    ],
)
def test_config_errors_name_the_file_and_key_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "orchestrator.toml").write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(None)
    message = str(raised.value)
    assert message.startswith(expected), message
    assert "\n" not in message and "pydantic" not in message and "http" not in message


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATOR_STORE": f"sqlite:///{cwd / 'e.db'}"}
    return run_command([*CLI, *args], cwd, env)


def test_config_check_on_good_and_bad_files(tmp_path: Path) -> None:
    ok = _cli(tmp_path, "config", "check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: built-in default")
    (tmp_path / "orchestrator.toml").write_text(README_TOML)
    assert _cli(tmp_path, "config", "check").returncode == 0
    (tmp_path / "orchestrator.toml").write_text(
        README_TOML.replace('model = "openai/gpt-4o-mini"\n\n', 'model = "lab/llama4"\n\n', 1)
    )
    bad = _cli(tmp_path, "config", "check")
    assert bad.returncode == 2
    assert 'orchestrator.toml: model: model "lab/llama4" is not in any provider' in bad.stderr
    (tmp_path / "orchestrator.toml").write_text('[providers.lab]\nkind = "opanai"\n')
    broken = _cli(tmp_path, "config", "check")
    assert broken.returncode == 2
    assert broken.stderr.strip() == (
        'error: orchestrator.toml: providers.lab.kind: must be "openai" or "echo", got "opanai"'
    )


def _readme_example() -> tuple[str, list[list[str]]]:
    """The README's configuration example: its TOML and its `orchestrator ...` lines."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1]
    toml = section.split("```toml", 1)[1].split("```", 1)[0]
    shell = section.split("```sh", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line.split("#")[0]) for line in shell.splitlines()]
    return toml, [words[1:] for words in lines if words[:1] == ["orchestrator"]]


def test_the_readme_toml_works_with_the_readme_shell_lines(
    tmp_path: Path, chat_server: ChatServer
) -> None:
    toml, commands = _readme_example()
    assert "11434" in toml and commands
    (tmp_path / "orchestrator.toml").write_text(toml.replace("11434", str(chat_server.port)))
    for args in commands:
        out = _cli(tmp_path, *args)
        assert out.returncode == 0, (args, out.stderr)
    assert chat_server.requests, "the example's lab profile never reached the server"


# --- store URLs ----------------------------------------------------------------------------------


def test_relative_and_absolute_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    EventLog("sqlite:///relative.db").close()
    assert (tmp_path / "relative.db").is_file()
    absolute = tmp_path / "abs.db"
    EventLog(f"sqlite:///{absolute}").close()  # four slashes: absolute
    assert absolute.is_file()
    with pytest.raises(StoreError) as missing:
        EventLog("sqlite:///no/such/dir/e.db")
    assert str(missing.value) == (
        "cannot open store sqlite:///no/such/dir/e.db: directory "
        f"{tmp_path / 'no/such/dir'} does not exist (create it first)"
    )
    assert not (tmp_path / "no").exists()


def test_cli_store_errors_print_the_url_as_written(tmp_path: Path) -> None:
    out = run_command([*CLI, "--store", "sqlite:///missing/e.db", "workers"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: cannot open store sqlite:///missing/e.db: directory")
