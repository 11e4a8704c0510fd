"""Tags once a user's configuration has providers of its own, `config check`'s report, and
configuration-file errors on the command line (one line each, never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_config
from orchestrator.resolver import ResolutionError, build_catalogue, resolve
from tests.chat import ChatServer
from tests.conftest import OpenOrch
from tests.helpers import run

CLI = [str(Path(sys.executable).parent / "orchestrator")]


@pytest.fixture
def store(tmp_path: Path) -> str:
    """Tag choice does not depend on the store: one SQLite file per test."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def lab(**extra: Any) -> dict[str, Any]:
    """A user's file adding provider `lab` (no vision model) to the built-in default."""
    return {
        "providers": {
            "lab": {
                "kind": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "models": {
                    "big": {"tool_call": True, "context": 128_000, "cost_input": 2.0},
                    "small": {"context": 32_000, "cost_input": 0.1},
                },
            }
        },
        **extra,
    }


def _resolve(ref: str, raw: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    cfg = load_config(raw)
    return resolve(ref, cfg, build_catalogue(cfg, env or {}))


# --- tags and the user's own providers -----------------------------------------------------------


def test_tags_pick_among_the_users_providers_never_a_built_in_echo_model() -> None:
    raw = lab()
    picked = {ref: _resolve(ref, raw) for ref in ("auto", "node", "auto:docs", "node:docs")}
    assert {ref: r.resolved_model for ref, r in picked.items()} == dict.fromkeys(picked, "lab/big")
    assert picked["auto"].reason == (
        "tag auto -> best usable model by auto:docs score lab/big, since model is not set"
    )
    fast = _resolve("auto:fast", raw)
    assert (fast.resolved_model, fast.reason) == (
        "lab/small",
        "tag auto:fast -> cheapest usable model lab/small",
    )
    assert _resolve("node:fast", raw).resolved_model == "lab/small"
    for tag in ("auto:vision", "node:vision"):
        with pytest.raises(ResolutionError) as raised:
            _resolve(tag, raw)
        assert str(raised.value) == (
            f'No usable vision model for "{tag}" in this configuration\'s providers ("lab"): '
            "add a model with vision = true to a provider, or set the API key of a provider "
            'that has one (the built-in echo provider "local" is only used when named '
            "explicitly)."
        )
    # Named explicitly, a built-in echo model still serves.
    explicit = _resolve("local/echo-vision", raw)
    assert (explicit.resolved_model, explicit.reason) == (
        "local/echo-vision",
        "explicit model local/echo-vision",
    )


def test_the_users_model_and_small_model_are_what_auto_and_auto_fast_mean() -> None:
    raw = lab(model="lab/small", small_model="lab/big")
    assert _resolve("auto", raw).reason == "tag auto -> model lab/small"
    assert _resolve("auto:fast", raw).reason == "tag auto:fast -> small_model lab/big"
    # Even set by the user, a built-in echo model is not what a tag picks.
    raw = lab(model="local/echo-large", small_model="local/echo-small")
    assert _resolve("auto", raw).reason == (
        "tag auto -> best usable model by auto:docs score lab/big, since model "
        "local/echo-large is a built-in echo model"
    )
    assert _resolve("auto:fast", raw).reason == (
        "tag auto:fast -> cheapest usable model lab/small, since small_model "
        "local/echo-small is a built-in echo model"
    )


def test_a_provider_of_the_users_needing_a_key_makes_tags_fail_not_fall_back_to_echo() -> None:
    raw = lab()
    raw["providers"]["lab"].update(source="api", api_key_env="LAB_KEY")
    with pytest.raises(ResolutionError) as raised:
        _resolve("auto", raw)
    assert str(raised.value) == (
        'No usable model for "auto" in this configuration\'s providers ("lab" needs LAB_KEY) '
        '(the built-in echo provider "local" is only used when named explicitly).'
    )
    assert _resolve("auto", raw, {"LAB_KEY": "k"}).resolved_model == "lab/big"


def test_a_users_own_local_provider_replaces_the_built_in_one_and_tags_use_it() -> None:
    raw = {"providers": {"local": lab()["providers"]["lab"]}}
    auto = _resolve("auto", raw)
    assert (auto.resolved_model, auto.reason) == (
        "local/big",
        "tag auto -> best usable model by auto:docs score local/big, since model is not set",
    )
    assert _resolve("auto:fast", raw).resolved_model == "local/small"
    with pytest.raises(ResolutionError, match='Model "local/echo-large" not found'):
        _resolve("local/echo-large", raw)


@pytest.mark.parametrize(
    "raw", [{}, {"profiles": {"docs": {"model": "auto:fast"}}, "pool": {"max_processes": 2}}]
)
def test_without_a_provider_of_the_users_the_echo_models_serve_tags(raw: dict[str, Any]) -> None:
    assert _resolve("auto", raw).reason == "tag auto -> model local/echo-large"
    assert _resolve("auto:fast", raw).reason == "tag auto:fast -> small_model local/echo-small"
    assert _resolve("auto:vision", raw).resolved_model == "local/echo-vision"


def test_a_dumped_configuration_passed_back_keeps_what_tags_skip() -> None:
    dumped = load_config(lab()).model_dump()
    assert dumped["inherited"] == {
        "providers": ["local"],
        "profiles": ["coder", "docs", "explorer", "vision", "architect"],
        "keys": ["model", "small_model"],
    }
    assert _resolve("auto", dumped).resolved_model == "lab/big"
    assert _resolve("auto:fast", dumped).resolved_model == "lab/small"


def test_a_worker_on_a_tag_is_served_by_the_users_provider(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    raw = lab()
    raw["providers"]["lab"]["base_url"] = chat_server.url
    raw["profiles"] = {
        "docs": {"model": "auto:docs", "backend": "agent"},
        "explorer": {"model": "node:fast", "backend": "agent"},
    }
    orch = open_orch(config=raw)
    docs, explorer = run(orch, "docs", "hello"), run(orch, "explorer", "hi")
    assert (docs.status, docs.model, docs.response) == ("completed", "lab/big", "big says hello")
    assert (explorer.model, explorer.response) == ("lab/small", "small says hi")
    vision = run(orch, "vision", "look")
    assert vision.status == "failed"
    assert 'No usable vision model for "auto:vision"' in str(vision.error)


# --- the command line ---------------------------------------------------------------------------


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "ORCHESTRATOR_STORE": f"sqlite:///{cwd / 'e.db'}", **env}
    environ.pop("LAB_KEY", None)
    environ.update(env)
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=cwd, env=environ, timeout=60, check=False
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


LAB_TOML = """
[providers.lab]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
{extra}
[providers.lab.models.big]
tool_call = true
context = 128000
cost_input = 2.0
[providers.lab.models.small]
cost_input = 0.1
"""


def test_config_check_says_what_each_tag_resolves_to(tmp_path: Path) -> None:
    done = _cli(tmp_path, "config", "check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "ok: built-in default: 1 providers, 5 profiles",
        "auto -> local/echo-large (tag auto -> model local/echo-large)",
        "auto:fast -> local/echo-small (tag auto:fast -> small_model local/echo-small)",
        "auto:vision -> local/echo-vision "
        "(tag auto:vision -> best vision model by score local/echo-vision)",
        "auto:docs -> local/echo-large "
        "(tag auto:docs -> best tool_call + context score local/echo-large)",
    ]
    assert done.stderr == ""


def test_config_check_on_a_users_provider_warns_of_built_in_profiles_it_cannot_serve(
    tmp_path: Path,
) -> None:
    (tmp_path / "orchestrator.toml").write_text(LAB_TOML.format(extra=""))
    done = _cli(tmp_path, "config", "check")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ok: orchestrator.toml: 2 providers, 5 profiles (1 warning)"
    assert lines[1] == (
        "auto -> lab/big (tag auto -> best usable model by auto:docs score lab/big, "
        "since model is not set)"
    )
    assert lines[2] == "auto:fast -> lab/small (tag auto:fast -> cheapest usable model lab/small)"
    assert lines[3].startswith('auto:vision does not resolve: No usable vision model for "auto')
    assert done.stderr.splitlines() == [
        "warning: orchestrator.toml: profiles.vision.model: built-in profile, its tasks will "
        f"fail: {lines[3].removeprefix('auto:vision does not resolve: ')}"
    ]


def test_config_check_fails_on_a_users_profile_that_does_not_resolve(tmp_path: Path) -> None:
    (tmp_path / "orchestrator.toml").write_text(
        LAB_TOML.format(extra="") + '[profiles.eyes]\nmodel = "auto:vision"\n'
    )
    done = _cli(tmp_path, "config", "check")
    assert done.returncode == 2
    assert not done.stdout.startswith("ok")
    assert (
        'orchestrator.toml: profiles.eyes.model: No usable vision model for "auto:vision"'
        in done.stderr
    )


def test_config_check_warns_of_an_unset_api_key_variable_and_still_passes(tmp_path: Path) -> None:
    (tmp_path / "orchestrator.toml").write_text(LAB_TOML.format(extra='api_key_env = "LAB_KEY"'))
    done = _cli(tmp_path, "config", "check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: orchestrator.toml: 2 providers, 5 profiles (2 warnings)")
    assert (
        "warning: orchestrator.toml: providers.lab.api_key_env: LAB_KEY is not set in the "
        "environment; requests to its models fail until it is"
    ) in done.stderr.splitlines()
    keyed = _cli(tmp_path, "config", "check", LAB_KEY="k")
    assert "LAB_KEY" not in keyed.stderr
    assert "(1 warning)" in keyed.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ["error: missing.toml: cannot read: No such file or directory"]),
        (
            "model = [\n",
            ["error: missing.toml: TOML syntax error: Invalid value (at end of document)"],
        ),
        (
            '[providers.lab]\nkind = "opanai"\n[pool]\nmax_processes = 0\n',
            [
                'error: missing.toml: providers.lab.kind: must be "openai" or "echo", got "opanai"',
                "error: missing.toml: pool.max_processes: input should be greater than or equal "
                "to 1, got 0",
            ],
        ),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["whatif", "--config", "missing.toml"],
        ["--config", "missing.toml", "workers"],
        ["--config", "missing.toml", "config", "check"],
        ["--config", "missing.toml", "run", "coder", "hi"],
    ],
)
def test_a_bad_config_file_is_one_line_per_problem_and_exit_2(
    tmp_path: Path, text: str | None, expected: list[str], command: list[str]
) -> None:
    if text is not None:
        (tmp_path / "missing.toml").write_text(text)
    done = _cli(tmp_path, *command)
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (2, "", expected)
