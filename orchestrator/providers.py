"""Providers: the code that actually asks a model. `echo` is offline; `openai` speaks HTTP.

Used both in-process (agent backend) and inside worker processes, so imports stay light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from typing import Any

from orchestrator.config import OrchestratorConfig, ProviderConfig


class ProviderError(RuntimeError):
    """The provider could not answer; the message says what to fix."""


def split_model(model: str) -> tuple[str, str]:
    """`provider/model` -> (provider, model)."""
    provider, _, name = model.partition("/")
    if not name:
        raise ProviderError(f'Model "{model}" is not of the form provider/model.')
    return provider, name


def complete(
    config: OrchestratorConfig,
    model: str,
    text: str,
    system_prompt: str = "",
    environ: Mapping[str, str] | None = None,
) -> str:
    """Send one message to `model` (a `provider/model`) and return the reply text."""
    provider_id, name = split_model(model)
    provider = config.providers.get(provider_id)
    if provider is None:
        raise ProviderError(f'Provider "{provider_id}" is not configured.')
    if provider.kind == "echo":
        return f"[{model}] {text}"
    return _openai_chat(provider_id, provider, name, text, system_prompt, environ or os.environ)


@cache
def _http() -> Any:
    import httpx

    return httpx.Client(timeout=120.0)  # one per process: building one loads the CA bundle


def _openai_chat(
    provider_id: str,
    provider: ProviderConfig,
    name: str,
    text: str,
    system_prompt: str,
    environ: Mapping[str, str],
) -> str:
    import httpx

    if not provider.base_url:
        raise ProviderError(f'Provider "{provider_id}" has no base_url.')
    headers = {"Content-Type": "application/json"}
    if provider.api_key_env:
        key = environ.get(provider.api_key_env)
        if not key:
            raise ProviderError(
                f'Provider "{provider_id}" needs an API key: set {provider.api_key_env}.'
            )
        headers["Authorization"] = f"Bearer {key}"
    messages = [{"role": "user", "content": text}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    url = provider.base_url.rstrip("/") + "/chat/completions"
    try:
        resp = _http().post(url, json={"model": name, "messages": messages}, headers=headers)
        resp.raise_for_status()
        content = resp.json()["choices"][0]["message"]["content"]
    except httpx.HTTPStatusError as exc:
        raise ProviderError(
            f'Provider "{provider_id}" answered HTTP {exc.response.status_code} for model "{name}".'
        ) from exc
    except httpx.HTTPError as exc:
        raise ProviderError(f'Provider "{provider_id}" at {url} did not answer: {exc}') from exc
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ProviderError(
            f'Provider "{provider_id}" sent a reply that is not a chat completion.'
        ) from exc
    return str(content)
