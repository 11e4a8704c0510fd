"""Providers: the code that actually asks a model. `echo` is offline; `openai` speaks HTTP.

Used both in-process (agent backend) and inside worker processes, so imports stay light.
Credentials come from the `credentials` mapping of each call (the asking orchestrator's
environment, read at call time), never from the process's own environment.

It stays one module over 400 lines because the request path (retries, `Retry-After`,
bounded reads, parsing a completion, redacting credentials from every error) is one flow
whose helpers nothing else uses, and the redaction is reviewed in one place.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping

from orchestrator.errors import OrchestratorError
from orchestrator.transport import (
    Request,
    Response,
    Transport,
    TransportInvalid,
    TransportTimeout,
    TransportUnreachable,
    default_provider_transport,
)

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
# Of an error reply only its excerpt is shown: this much of its body is read, the rest not.
ERROR_BODY_MAX = 64 * 1024
# `[limits] max_reply` when the caller names none (the configuration's default).
DEFAULT_MAX_REPLY = 1_000_000
REPLY_ALLOWANCE = 1024 * 1024
# A credential is redacted wherever this many of its characters appear in a row.
SECRET_RUN = 6


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


def with_base_url(providers: Providers, model: str, base_url: str | None) -> Providers:
    """`providers` with the provider of `model` sent to `base_url` (a managed model's
    server, known only per request); unchanged when `base_url` is None."""
    if base_url is None:
        return providers
    provider_id, provider = provider_of(providers, model)
    moved = ProviderSettings(
        provider.kind, base_url, provider.api_key_env, provider.timeout, provider.max_retries
    )
    return {**providers, provider_id: moved}


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
    max_reply: int = DEFAULT_MAX_REPLY,
    messages: list[dict[str, Any]] | None = None,
    transport: Transport | None = None,
) -> Completion:
    """Send one message to `model` (a `provider/model`) and return the answer. `messages`
    (a conversation: every message after the system prompt, the new one included) replaces
    the single user message `text`. A reply larger than `reply_limit(max_reply)` bytes is
    refused while it streams. HTTP goes through `transport` (the pooled sockets with a
    deadline when None)."""
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
        provider_id,
        provider,
        name,
        messages,
        system_prompt,
        credentials or {},
        tools,
        max_reply,
        transport or default_provider_transport(),
    )


def _backoff(attempt: int) -> float:
    return min(8.0, 0.25 * 2.0**attempt)


def reply_limit(max_reply: int) -> int:
    """Bytes of a provider's reply read at most: `max_reply` characters each escaped to six
    bytes (`\\uXXXX`), plus room for tool calls and the JSON around them."""
    return max_reply * 6 + REPLY_ALLOWANCE


def _openai_chat(
    provider_id: str,
    provider: Provider,
    name: str,
    messages: list[dict[str, Any]],
    system_prompt: str,
    credentials: Mapping[str, str],
    tools: list[dict[str, Any]] | None,
    max_reply: int,
    transport: Transport,
) -> Completion:
    if not provider.base_url:
        raise ProviderError(f'Provider "{provider_id}" has no base_url.')
    secrets = [v for v in credentials.values() if v]
    headers = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
    if provider.api_key_env:
        secret = credentials.get(provider.api_key_env, "")
        if not secret:
            raise ProviderError(
                f'Provider "{provider_id}" needs an API key: set {provider.api_key_env}.'
            )
        if not secret.isascii():
            raise ProviderError(
                f"The API key in {provider.api_key_env} holds characters an HTTP header "
                "cannot carry; check its value."
            )
        headers.append(("Authorization", f"Bearer {secret}"))
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    body: dict[str, Any] = {"model": name, "messages": messages}
    if tools:
        body["tools"] = tools
    try:
        payload = json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProviderError(f"The request cannot be sent as JSON: {exc}") from None
    url = provider.base_url.rstrip("/") + "/chat/completions"
    where = f'Provider "{provider_id}" for model "{name}"'
    last: ProviderError | None = None
    for attempt in range(provider.max_retries + 1):
        if attempt:
            time.sleep(_retry_delay(last, attempt - 1))
        try:
            request = Request("POST", url, headers, payload, provider.timeout)
            done = _one_request(where, transport, request, max_reply)
            return _redacted_completion(done, secrets)
        except ProviderError as exc:
            last = _redacted(exc, secrets)
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


def _redacted(exc: ProviderError, secrets: list[str]) -> ProviderError:
    text = redact(str(exc), secrets)
    if text == str(exc):
        return exc
    if isinstance(exc, _RetryAfter):
        return _RetryAfter(text, exc.delay)
    return type(exc)(text, exc.retryable)


def _redacted_completion(done: Completion, secrets: list[str]) -> Completion:
    # A provider that echoes the request's key into its answer must not get it stored.
    if not secrets:
        return done
    calls = done.tool_calls
    if calls is not None:
        calls = _redact_json(calls, secrets)
    return Completion(redact(done.text, secrets), calls, done.usage)


def _redact_json(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [_redact_json(v, secrets) for v in value]
    if isinstance(value, dict):
        return {redact(k, secrets): _redact_json(v, secrets) for k, v in value.items()}
    return value


# ASCII-only lower-casing keeps every character where it was, so spans found in the lowered
# text apply to the original (`str.lower` may change a string's length).
_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every credential of `secrets` replaced by `***`: whole or in part (any run
    of `SECRET_RUN` or more of its characters, so an echo cut short or partly masked leaks
    no prefix), in any letter case."""
    low = text.translate(_LOWER)
    spans: list[tuple[int, int]] = []
    for secret in secrets:
        key = secret.translate(_LOWER)
        run = min(len(key), SECRET_RUN)
        if not run:
            continue
        for gram in {key[i : i + run] for i in range(len(key) - run + 1)}:
            at = low.find(gram)
            while at >= 0:
                spans.append((at, at + run))
                at = low.find(gram, at + 1)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    kept = 0
    start, end = spans[0]
    for s, e in spans[1:]:
        if s <= end:
            end = max(end, e)
            continue
        out += [text[kept:start], "***"]
        kept = end
        start, end = s, e
    out += [text[kept:start], "***", text[end:]]
    return "".join(out)


def _one_request(where: str, transport: Transport, request: Request, max_reply: int) -> Completion:
    from orchestrator.deadline import within

    timeout = request.timeout
    url = request.url
    limit = reply_limit(max_reply)
    try:
        # The attempt as a whole, not each socket read, ends after `timeout`: a provider
        # that drips its headers or body one byte at a time is cut off all the same.
        with within(timeout), transport.handle(request) as resp:
            status = resp.status
            if status >= 400:
                raw = _read(resp, ERROR_BODY_MAX)
            else:
                raw = _read(resp, limit)
                if raw is None:
                    raise ProviderError(
                        f"{where} sent a reply larger than {limit:,} bytes, more than an answer "
                        f"within [limits] max_reply ({max_reply:,} characters) needs; ask for "
                        "a shorter answer."
                    )
            retry_after = resp.header("retry-after")
    except TransportTimeout:
        raise ProviderError(f"{where} timed out after {timeout:g} s", True) from None
    except TransportUnreachable as exc:
        raise ProviderError(f"{where} at {url} did not answer: {exc}", True) from None
    except TransportInvalid as exc:
        raise ProviderError(f"{where}: the request to {url} cannot be sent: {exc}") from None
    body = raw or b""
    if status >= 400:
        message = f"{where} answered HTTP {status}: {_excerpt(body)}"
        if status == 429 or status >= 500:
            after = _retry_after(retry_after)
            if after is not None:
                raise _RetryAfter(message, after)
            raise ProviderError(message, True)
        raise ProviderError(message)
    return _completion(where, body)


def _read(resp: Response, limit: int) -> bytes | None:
    """At most `limit` bytes of the body, read as they stream: None when there is more. A
    status >= 400 keeps what fits (its excerpt is all that is shown)."""
    declared = resp.header("content-length")
    if resp.status < 400 and declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > limit:
            if resp.status >= 400:
                chunks.append(chunk[: len(chunk) - (size - limit)])
                break
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _completion(where: str, body: bytes) -> Completion:
    """The reply as a `Completion`, or a `ProviderError` saying what is wrong with it."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise ProviderError(f"{where} sent a reply nested too deeply to read") from None
    except ValueError:
        raise ProviderError(
            f"{where} sent a reply that is not a chat completion: {_excerpt(body)}"
        ) from None
    try:
        message = data["choices"][0]["message"]
        content = message.get("content")
        tool_calls = message.get("tool_calls") or None
        usage = data.get("usage")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ProviderError(
            f"{where} sent a reply that is not a chat completion: {_excerpt(body)}"
        ) from None
    if content is not None and not isinstance(content, str):
        raise ProviderError(f"{where} sent a reply whose content is not text")
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
            raise ProviderError(f"{where} sent a reply whose tool_calls is not a list of objects")
        problem = json_problem(tool_calls)
        if problem:
            raise ProviderError(f"{where} sent tool calls that cannot be stored: {problem}")
    if content is not None and _SURROGATE.search(content):
        raise ProviderError(f"{where} sent text that is not valid Unicode (a lone surrogate)")
    return Completion(text=content or "", tool_calls=tool_calls, usage=_usage(where, usage))


_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_JSON_DEPTH = 32
_INT64 = 2**63


def json_problem(
    value: Any, path: str = "", depth: int = 0, max_depth: int = MAX_JSON_DEPTH
) -> str | None:
    """What keeps `value` from being stored as JSON (a lone surrogate, a non-finite or
    64-bit-overflowing number, a type JSON lacks, nesting deeper than `max_depth`), named by
    its path; None when it can be stored."""
    where = path or "the value"
    if depth > max_depth:
        return f"{where}: nested deeper than {max_depth} levels"
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (
            f"{where}: not valid Unicode text (a lone surrogate \\u{ord(found.group()):04x})"
            if found
            else None
        )
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else f"{where}: a number beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where}: {value} is not a JSON number"
    if isinstance(value, list | tuple):
        items: Iterable[tuple[str, Any]] = ((str(i), v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                return f"{where}: a key that is not text ({type(key).__name__})"
            if _SURROGATE.search(key):
                return f"{where}: a key that is not valid Unicode text (a lone surrogate)"
        items = value.items()
    else:
        return f"{where}: a {type(value).__name__}, which JSON cannot hold"
    for key, item in items:
        problem = json_problem(item, f"{path}.{key}" if path else key, depth + 1, max_depth)
        if problem:
            return problem
    return None


def _usage(where: str, raw: Any) -> dict[str, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProviderError(f"{where} sent a reply whose usage is not an object")
    counts = {}
    for ours, theirs in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        value = raw.get(theirs)
        if value is None:
            value = 0
        if isinstance(value, float) and value.is_integer() and 0 <= value < 2**53:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
            raise ProviderError(
                f"{where} sent a reply whose usage.{theirs} is not a token count: "
                f"{_excerpt(repr(value).encode())}"
            )
        counts[ours] = value
    return counts


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        delay = float(value)
    except ValueError:
        return None  # an HTTP date: rare from model servers; the usual back-off applies
    return max(0.0, delay) if math.isfinite(delay) else None


def _excerpt(raw: bytes) -> str:
    """The provider's own message when its body is an OpenAI-style error, else its start."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif parsed.get("message"):
            text = str(parsed["message"])
    text = _SURROGATE.sub("\ufffd", " ".join(text.split()))
    if not text:
        return "(empty body)"
    return text if len(text) <= BODY_EXCERPT else text[: BODY_EXCERPT - 3] + "..."


def internal_error(exc: BaseException) -> str:
    """One line for a bug: the exception's type and where it was raised, never its message
    or the values around it, which may quote a reply or a credential."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    ours = [f for f in frames if "/orchestrator/" in f.filename or "/events/" in f.filename]
    where = ""
    if ours or frames:
        frame = (ours or frames)[-1]
        tail = frame.filename.replace("\\", "/").rsplit("/", 2)
        where = f" at {'/'.join(tail[-2:])}:{frame.lineno} in {frame.name}"
    return (
        f"internal error: {type(exc).__name__}{where} (details withheld: they may quote a "
        "secret); please report it"
    )
