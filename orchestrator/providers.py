"""Providers: the code that actually asks a model. `echo` is offline; `openai` speaks HTTP.

Used both in-process (agent backend) and inside worker processes, so imports stay light.
Credentials come from the `credentials` mapping of each call (the asking orchestrator's
environment, read at call time), never from the process's own environment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from functools import cache

from orchestrator.errors import OrchestratorError

# `typing` stays out of a worker's imports (4 ms of its start-up, ADR-0008): what this
# module needs of it is for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object


class Provider(Protocol):
    """What a call needs of a provider: `ProviderConfig` in an orchestrator, the plain
    `ProviderSettings` in a worker process (which never imports the config models)."""

    @property
    def kind(self) -> str: ...
    @property
    def base_url(self) -> str | None: ...
    @property
    def api_key_env(self) -> str | None: ...
    @property
    def timeout(self) -> float: ...
    @property
    def max_retries(self) -> int: ...


# Plain classes, not dataclasses or NamedTuples: `dataclasses` pulls in `inspect` and
# `typing` is not otherwise imported by a worker (ADR-0008).
class ProviderSettings:
    """A provider's identity as a plain value (see `ProviderConfig.identity`)."""

    __slots__ = ("api_key_env", "base_url", "kind", "max_retries", "timeout")

    def __init__(
        self,
        kind: str,
        base_url: str | None,
        api_key_env: str | None,
        timeout: float,
        max_retries: int,
    ) -> None:
        self.kind = kind
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries


if TYPE_CHECKING:
    Providers = Mapping[str, Provider]

# A Retry-After longer than this is not waited for: the attempt fails and fallbacks decide.
MAX_RETRY_AFTER = 30.0
BODY_EXCERPT = 200


class ProviderError(OrchestratorError, RuntimeError):
    """The provider could not answer; the message says what happened and what to fix.

    `retryable` is true for failures another attempt (or another model) could avoid:
    connection errors, time-outs, 429 and 5xx.
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Completion:
    """One model answer: its text (possibly empty), tool calls, and reported usage."""

    __slots__ = ("text", "tool_calls", "usage")

    def __init__(
        self,
        text: str,
        tool_calls: list[dict[str, Any]] | None = None,
        usage: dict[str, int] | None = None,
    ) -> None:
        self.text = text
        self.tool_calls = tool_calls
        self.usage = usage


def split_model(model: str) -> tuple[str, str]:
    """`provider/model` -> (provider, model)."""
    provider, _, name = model.partition("/")
    if not name:
        raise ProviderError(f'Model "{model}" is not of the form provider/model.')
    return provider, name


def provider_of(providers: Providers, model: str) -> tuple[str, Provider]:
    """The configured provider a `provider/model` is sent to."""
    provider_id, _ = split_model(model)
    provider = providers.get(provider_id)
    if provider is None:
        raise ProviderError(f'Provider "{provider_id}" is not configured.')
    return provider_id, provider


def credentials_for(providers: Providers, model: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The credentials a request to `model` needs, read from `environ` now (may be empty)."""
    try:
        _, provider = provider_of(providers, model)
    except ProviderError:
        return {}
    name = provider.api_key_env
    if name and environ.get(name):
        return {name: environ[name]}
    return {}


def request_budget(providers: Providers, model: str) -> float:
    """Seconds one request to `model` may take at most, retries and their back-off included."""
    try:
        _, provider = provider_of(providers, model)
    except ProviderError:
        return 10.0
    attempts = provider.max_retries + 1
    return provider.timeout * attempts + sum(
        min(MAX_RETRY_AFTER, _backoff(i)) for i in range(attempts)
    )


def complete(
    providers: Providers,
    model: str,
    text: str,
    system_prompt: str = "",
    credentials: Mapping[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
    messages: list[dict[str, Any]] | None = None,
) -> Completion:
    """Send one message to `model` (a `provider/model`) and return the answer. `messages`
    (a conversation: every message after the system prompt, the new one included) replaces
    the single user message `text`."""
    provider_id, provider = provider_of(providers, model)
    _, name = split_model(model)
    if messages is None:
        messages = [{"role": "user", "content": text}]
    if provider.kind == "echo":
        # The last user message is what it answers; every message's words are its input.
        said = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")
        reply = f"[{model}] {said}"
        words = sum(len(str(m.get("content") or "").split()) for m in messages)
        return Completion(
            text=reply, usage={"input_tokens": words, "output_tokens": len(reply.split())}
        )
    return _openai_chat(
        provider_id, provider, name, messages, system_prompt, credentials or {}, tools
    )


@cache
def _http() -> Any:
    import socket
    import ssl

    import httpx

    # One client per process (building one loads the CA bundle); Nagle off for small bodies.
    transport = httpx.HTTPTransport(
        verify=ssl.create_default_context(),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    return httpx.Client(transport=transport, trust_env=False)


def _backoff(attempt: int) -> float:
    return min(8.0, 0.25 * 2.0**attempt)


def _openai_chat(
    provider_id: str,
    provider: Provider,
    name: str,
    messages: list[dict[str, Any]],
    system_prompt: str,
    credentials: Mapping[str, str],
    tools: list[dict[str, Any]] | None,
) -> Completion:
    if not provider.base_url:
        raise ProviderError(f'Provider "{provider_id}" has no base_url.')
    headers = {"Content-Type": "application/json"}
    secret = ""
    if provider.api_key_env:
        secret = credentials.get(provider.api_key_env, "")
        if not secret:
            raise ProviderError(
                f'Provider "{provider_id}" needs an API key: set {provider.api_key_env}.'
            )
        headers["Authorization"] = f"Bearer {secret}"
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    body: dict[str, Any] = {"model": name, "messages": messages}
    if tools:
        body["tools"] = tools
    url = provider.base_url.rstrip("/") + "/chat/completions"
    last: ProviderError | None = None
    for attempt in range(provider.max_retries + 1):
        if attempt:
            time.sleep(_retry_delay(last, attempt - 1))
        try:
            return _one_request(provider_id, provider, name, url, body, headers)
        except ProviderError as exc:
            last = _redacted(exc, secret)
            if not last.retryable or _retry_delay(last, attempt) > MAX_RETRY_AFTER:
                break
    assert last is not None
    if provider.max_retries and last.retryable:
        raise ProviderError(f"{last} (after {provider.max_retries + 1} attempts)", True)
    raise last


class _RetryAfter(ProviderError):
    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message, retryable=True)
        self.delay = delay


def _retry_delay(exc: ProviderError | None, attempt: int) -> float:
    if isinstance(exc, _RetryAfter):
        return float(exc.delay)
    return _backoff(attempt)


def _redacted(exc: ProviderError, secret: str) -> ProviderError:
    if secret and secret in str(exc):
        cls = type(exc)
        text = str(exc).replace(secret, "***")
        if isinstance(exc, _RetryAfter):
            return _RetryAfter(text, exc.delay)
        return cls(text, exc.retryable)
    return exc


def _one_request(
    provider_id: str,
    provider: Provider,
    name: str,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> Completion:
    import httpx

    where = f'Provider "{provider_id}" for model "{name}"'
    try:
        resp = _http().post(url, json=body, headers=headers, timeout=provider.timeout)
    except httpx.TimeoutException:
        raise ProviderError(f"{where} timed out after {provider.timeout:g} s", True) from None
    except httpx.HTTPError as exc:
        raise ProviderError(f"{where} at {url} did not answer: {exc}", True) from None
    if resp.status_code >= 400:
        message = f"{where} answered HTTP {resp.status_code}: {_excerpt(resp.text)}"
        if resp.status_code == 429 or resp.status_code >= 500:
            after = _retry_after(resp.headers.get("Retry-After"))
            if after is not None:
                raise _RetryAfter(message, after)
            raise ProviderError(message, True)
        raise ProviderError(message)
    try:
        data = resp.json()
        message_obj = data["choices"][0]["message"]
        content = message_obj.get("content")
        tool_calls = message_obj.get("tool_calls") or None
        usage = data.get("usage")
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise ProviderError(
            f"{where} sent a reply that is not a chat completion: {_excerpt(resp.text)}"
        ) from None
    return Completion(
        text="" if content is None else str(content),
        tool_calls=list(tool_calls) if tool_calls else None,
        usage=_usage(usage),
    )


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    try:
        return {
            "input_tokens": int(raw.get("prompt_tokens", 0)),
            "output_tokens": int(raw.get("completion_tokens", 0)),
        }
    except (TypeError, ValueError):
        return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from model servers; the usual back-off applies


def _excerpt(body: str) -> str:
    """The provider's own message when its body is an OpenAI-style error, else its start."""
    text = body.strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif parsed.get("message"):
            text = str(parsed["message"])
    text = " ".join(text.split())
    if not text:
        return "(empty body)"
    return text if len(text) <= BODY_EXCERPT else text[: BODY_EXCERPT - 3] + "..."
