"""LiteLLM's proxy, a real OpenAI-compatible server, as a provider on both backends.

The proxy runs as its own process from its own environment, with models that answer with
`mock_response` / `mock_tool_calls` (and one that fails with a 500), behind a master key the
orchestrator reads from the environment at call time like any API key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from interop.conftest import OpenOrch
from interop.peers import free_port, peer_command, serving

KEY_ENV = "INTEROP_LITELLM_KEY"
ANSWER = "hello from the proxy"
TOOL_TEXT = "checking the weather"
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
BACKENDS = ["server", "agent"]


def proxy_config() -> dict[str, Any]:
    """The proxy's config.yaml (JSON is YAML): its model names and what each answers."""

    def mock(name: str, **params: Any) -> dict[str, Any]:
        # `openai/...` is only a label here: a mock answers without calling anything.
        return {
            "model_name": name,
            "litellm_params": {"model": f"openai/{name}", "api_key": "unused", **params},
        }

    return {
        "model_list": [
            mock("mock-chat", mock_response=ANSWER),
            mock("mock-tools", mock_response=TOOL_TEXT, mock_tool_calls=[TOOL_CALL]),
            mock("mock-500", mock_response="litellm.InternalServerError"),
        ],
        # Each failure reaches the orchestrator as it happened: no retries or cooldowns here.
        "litellm_settings": {"num_retries": 0},
        "router_settings": {"num_retries": 0, "disable_cooldowns": True},
    }


@dataclass
class Proxy:
    """A running proxy: its URL and the master key its clients send."""

    url: str
    key: str


@pytest.fixture(scope="session")
def litellm() -> Path:
    """The installed `litellm` command (skips when LiteLLM could not be installed)."""
    return peer_command("litellm")


def start_proxy(command: Path, workdir: Path) -> Any:
    """Run the proxy on a free port until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yaml"
    config.write_text(json.dumps(proxy_config(), indent=2))
    key = f"sk-{secrets.token_hex(16)}"
    port = free_port()
    env = {
        "LITELLM_MASTER_KEY": key,
        # The price list ships in the package: no fetch at start.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    cmd = [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return Proxy(url, key), serving(
        cmd, env, f"{url}/health/liveliness", workdir / "proxy.log", deadline=180
    )


@pytest.fixture(scope="session")
def proxy(litellm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy for the tests that do not stop it."""
    found, running = start_proxy(litellm, tmp_path_factory.mktemp("litellm"))
    with running:
        yield found


@pytest.fixture(autouse=True)
def _key(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy's key is in the environment of the orchestrator, as an API key would be."""
    if "proxy" in request.fixturenames:
        monkeypatch.setenv(KEY_ENV, request.getfixturevalue("proxy").key)


def config(
    url: str, backend: str, model: str = "proxy/mock-chat", fallbacks: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A user config whose provider `proxy` is the LiteLLM proxy; `dead` listens nowhere."""
    return {
        "model": model,
        "providers": {
            "proxy": {
                "kind": "openai",
                "base_url": f"{url}/v1",
                "api_key_env": KEY_ENV,
                "max_retries": 0,
                "timeout": 60,
                "models": {
                    "mock-chat": {"tool_call": True},
                    "mock-tools": {"tool_call": True},
                    "mock-500": {},
                    "missing": {},  # known to us, not to the proxy
                },
            },
            "dead": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "max_retries": 0,
                "models": {"gone": {}},
            },
        },
        "profiles": {
            "coder": {"backend": backend, "model": model, "fallback_models": list(fallbacks)}
        },
    }


def run(orch: Any, text: str, **kwargs: Any) -> Any:
    """Start a coder task and wait for its record."""
    handle = orch.task_start(kind="worker", worker_id="coder", task=text, **kwargs)
    return orch.task_await(handle.task_id, timeout=120)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_task_is_answered_by_the_proxy(proxy: Proxy, open_orch: OpenOrch, backend: str) -> None:
    orch = open_orch(config=config(proxy.url, backend))
    rec = run(orch, "say hello")
    assert rec.status == "completed", rec.error
    assert rec.response == ANSWER
    assert rec.model == "proxy/mock-chat"
    assert rec.usage is not None and rec.usage["output_tokens"] > 0
    assert rec.attempts == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tool_call_answer_is_recorded(proxy: Proxy, open_orch: OpenOrch, backend: str) -> None:
    orch = open_orch(config=config(proxy.url, backend))
    rec = run(orch, "what is the weather in Paris?", model="proxy/mock-tools", tools=[WEATHER_TOOL])
    assert rec.status == "completed", rec.error
    assert rec.model == "proxy/mock-tools"
    assert rec.tool_calls == [TOOL_CALL]
    assert rec.response == TOOL_TEXT


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unknown_model_fails_with_the_proxys_4xx_and_no_fallback(
    proxy: Proxy, open_orch: OpenOrch, backend: str
) -> None:
    orch = open_orch(config=config(proxy.url, backend, fallbacks=("proxy/mock-chat",)))
    rec = run(orch, "anyone there?", model="proxy/missing")
    assert rec.status == "failed"
    assert "400" in (rec.error or "")
    assert "Invalid model name passed in model=missing" in (rec.error or "")
    assert rec.response is None
    assert rec.model != "proxy/mock-chat"
    assert all(a["model"] == "proxy/missing" for a in rec.attempts)  # the fallback never ran


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stopped_proxy_fails_the_task_with_the_connection_error(
    litellm: Path, open_orch: OpenOrch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:  # fmt: skip
    found, running = start_proxy(litellm, tmp_path / "proxy")
    monkeypatch.setenv(KEY_ENV, found.key)
    orch = open_orch(config=config(found.url, backend))
    with running:
        assert run(orch, "while it is up").status == "completed"
    rec = run(orch, "after it stopped")
    assert rec.status == "failed"
    assert "Connection refused" in (rec.error or ""), rec.error
    assert rec.response is None


FIRST = {
    # The first model fails retryably: nothing listens at its URL, or the proxy answers 500.
    "connection": ("dead/gone", "Connection refused"),
    "5xx": ("proxy/mock-500", "mock internal server error"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cause", list(FIRST))
def test_a_fallback_model_on_the_proxy_serves_after_a_retryable_failure(
    proxy: Proxy, open_orch: OpenOrch, backend: str, cause: str
) -> None:
    first, error = FIRST[cause]
    orch = open_orch(config=config(proxy.url, backend, model=first, fallbacks=("proxy/mock-chat",)))
    rec = run(orch, "hello through a fallback")
    assert rec.status == "completed", rec.error
    assert rec.model == "proxy/mock-chat"
    assert rec.response == ANSWER
    assert [a["model"] for a in rec.attempts] == [first]
    assert error in rec.attempts[0]["error"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cause", list(FIRST))
def test_without_fallback_models_the_retryable_failure_fails_the_task(
    proxy: Proxy, open_orch: OpenOrch, backend: str, cause: str
) -> None:
    first, error = FIRST[cause]
    orch = open_orch(config=config(proxy.url, backend, model=first))
    rec = run(orch, "hello without a fallback")
    assert rec.status == "failed"
    assert error in (rec.error or ""), rec.error
    assert rec.response is None
    assert rec.model != "proxy/mock-chat"
