"""OpenTelemetry spans for worker tasks (the `otel` extra), live and from a recorded log.

Each worker task is one span `chat {model}` with the GenAI semantic-convention attributes
and the decisions behind it (the session's model set, reuse or spawn, failed attempts) as
span events. The same builder (`task_span`) serves a live task and `export-otel`, so both
give the same spans. A live task's span is the child of the span its caller had open when
it started the task. Without the extra installed nothing here imports OpenTelemetry.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from events.reads import OVERRIDE_TYPES
from events.store import EventRecord
from orchestrator.config import ConfigError
from orchestrator.explain import OverrideCause, override_cause

TRACER = "orchestrator"
SERVICE_NAME = "orchestrator"  # the resource's service.name when the user set none
EXPORT_BATCH = 512  # spans per OTLP request (the SDK batch processor's default)
# How long past the exporter's own timeout export-otel waits for one request: exporters
# older than 1.34 retry for up to a minute whatever their timeout says.
EXPORT_GRACE = 2.0


@cache
def available() -> bool:
    """Is the OpenTelemetry API installed (the `otel` extra)?"""
    return importlib.util.find_spec("opentelemetry") is not None


def enabled() -> bool:
    """Is a real tracer provider installed? Until the application installs one, spans would
    go nowhere, so a task does not pay for building them."""
    if not available():
        return False
    from opentelemetry import trace

    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def in_callers_context(work: Callable[[], None]) -> Callable[[], None]:
    """`work`, to run on another thread in the caller's OpenTelemetry context (captured now),
    so a span the caller has open (an agent's step) is the parent of the task's span and of
    any span made while serving it; `work` unchanged without a tracer provider."""
    if not enabled():
        return work
    from opentelemetry import context

    caller = context.get_current()

    def attached() -> None:
        token = context.attach(caller)
        try:
            work()
        finally:  # pool threads are reused: the next task must not inherit this parent
            context.detach(token)

    return attached


@dataclass
class SpanData:
    """One worker task as a span: name, times, attributes and events."""

    name: str
    start: datetime
    end: datetime
    attributes: dict[str, Any]
    events: list[tuple[str, datetime, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None


_DECISIONS = {
    "ModelResolved": "orchestrator.model.resolved",
    "WorkerReuseRejected": "orchestrator.worker.reuse_rejected",
    "WorkerReused": "orchestrator.worker.reused",
    "WorkerSpawnRequested": "orchestrator.worker.spawn_requested",
    "WorkerSpawned": "orchestrator.worker.spawned",
    "ModelAttemptFailed": "orchestrator.model.attempt_failed",
    "TaskQueued": "orchestrator.task.queued",
}
_EVENT_FIELDS = (
    "model_ref",
    "resolved_model",
    "model_policy",
    "source",
    "reason",
    "instance_id",
    "fingerprint",
    "model",
    "error",
    "retryable",
    "detail",
)


def task_span(chain: list[EventRecord], override: OverrideCause | None) -> SpanData | None:
    """The span of one finished worker task from its events (None for an op or a task
    still running)."""
    started = next((r for r in chain if r.type == "TaskStarted"), None)
    end = next((r for r in chain if r.type in ("TaskCompleted", "TaskFailed")), None)
    if started is None or end is None or started.data.get("kind") != "worker":
        return None
    resolved = next((r for r in chain if r.type == "ModelResolved"), None)
    # A task that failed before a model was chosen has only the model it asked for, if any.
    asked = (started.data.get("args") or {}).get("model")
    requested = resolved.data["resolved_model"] if resolved else asked
    served = end.data.get("model")
    model = served or requested
    usage = end.data.get("usage") or {}
    process = next((r for r in chain if r.type in ("WorkerReused", "WorkerSpawned")), None)
    instance_id = end.data.get("instance_id") or (process.data["instance_id"] if process else "")
    reused = end.data.get("reused")
    if reused is None:
        reused = bool(process and process.type == "WorkerReused")
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.conversation.id": str(started.session_id),
        "orchestrator.task_id": str(started.task_id),
        "orchestrator.worker_id": str(started.worker_id),
        "orchestrator.instance_id": str(instance_id or ""),
        "orchestrator.reused": bool(reused),
    }
    if model:
        attributes["gen_ai.request.model"] = requested or model
        if "/" in model:  # a tag that resolved to nothing names no provider
            attributes["gen_ai.provider.name"] = model.partition("/")[0]
    if served:
        attributes["gen_ai.response.model"] = served
    if usage.get("input_tokens") is not None:
        attributes["gen_ai.usage.input_tokens"] = int(usage["input_tokens"])
        attributes["gen_ai.usage.output_tokens"] = int(usage.get("output_tokens") or 0)
    events: list[tuple[str, datetime, dict[str, Any]]] = []
    if override is not None and resolved is not None and resolved.data["source"] == "session":
        events.append(
            (
                "orchestrator.worker.model.set",
                override.timestamp,
                {
                    "model_ref": override.model_ref,
                    "resolved_model": override.resolved_model,
                    "model_policy": override.model_policy,
                    "reason": override.reason,
                },
            )
        )
    for r in chain:
        name = _DECISIONS.get(r.type)
        if name is not None:
            attrs = {k: r.data[k] for k in _EVENT_FIELDS if r.data.get(k) is not None}
            events.append((name, r.timestamp, attrs))
    error = end.data.get("error") if end.type == "TaskFailed" else None
    if error:
        attributes["error.type"] = "task_failed"
    name = f"chat {model or started.worker_id}"
    return SpanData(name, started.timestamp, end.timestamp, attributes, events, error)


def spans_of_log(records: list[EventRecord], session_id: str | None = None) -> list[SpanData]:
    """The spans of every finished worker task in a recorded log (optionally one session)."""
    chains: dict[str, list[EventRecord]] = {}
    in_force: dict[tuple[str | None, str | None], EventRecord] = {}  # (session, worker)
    causes: dict[str, OverrideCause | None] = {}
    for r in records:
        if r.type in OVERRIDE_TYPES[:2]:
            in_force[(r.session_id, r.worker_id)] = r
        elif r.type == "SessionForked":
            for worker_id in r.data["overrides"]:
                in_force[(r.session_id, worker_id)] = r
        if r.task_id and (session_id is None or r.session_id == session_id):
            chains.setdefault(r.task_id, []).append(r)
            if r.type == "ModelResolved":
                found = in_force.get((r.session_id, r.worker_id))
                causes[r.task_id] = override_cause(found, str(r.worker_id))
    spans = []
    for task_id, chain in chains.items():
        span = task_span(chain, causes.get(task_id))
        if span is not None:
            spans.append(span)
    return spans


def emit(spans: Iterable[SpanData], tracer: Any = None) -> int:
    """Send spans through `tracer` (default: the global tracer provider's). Returns how many."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    tracer = tracer or trace.get_tracer(TRACER)
    count = 0
    for data in spans:
        span = tracer.start_span(
            data.name,
            kind=SpanKind.CLIENT,
            start_time=_ns(data.start),
            attributes=data.attributes,
        )
        for name, when, attrs in data.events:
            span.add_event(name, attributes=attrs, timestamp=_ns(when))
        if data.error:
            span.set_status(Status(StatusCode.ERROR, data.error))
        span.end(end_time=_ns(data.end))
        count += 1
    return count


@dataclass
class Exported:
    """What `export_log` did: how many spans the log gave, how many the receiver took, where
    they went, and (when not all arrived) why."""

    spans: int
    delivered: int
    endpoint: str
    problem: str | None = None


def export_log(records: list[EventRecord], session_id: str | None) -> Exported:
    """`orchestrator export-otel`: send a recorded log's spans over OTLP/HTTP (settings from
    the standard `OTEL_*` variables), or through the tracer provider already installed.
    Raises `ConfigError` for an unusable `OTEL_*` timeout."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    data = spans_of_log(records, session_id)
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # The application's provider and exporters: delivery is theirs to report.
        count = emit(data)
        if current.force_flush():
            return Exported(count, count, "the installed tracer provider")
        return Exported(count, 0, "the installed tracer provider", "it did not flush in time")
    endpoint, timeout = _otlp_endpoint(), _otlp_timeout()
    if not data:
        return Exported(0, 0, endpoint)
    # The spans are built first, then sent batch by batch here, so every request's outcome
    # is known (a batch processor would drop a failed batch silently).
    built = InMemorySpanExporter()
    provider = TracerProvider(resource=resource())
    provider.add_span_processor(SimpleSpanProcessor(built))
    emit(data, provider.get_tracer(TRACER))
    provider.shutdown()
    delivered, problem = _deliver(list(built.get_finished_spans()), timeout)
    return Exported(len(data), delivered, endpoint, problem)


def resource() -> Any:
    """The SDK's standard resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and any
    `OTEL_EXPERIMENTAL_RESOURCE_DETECTORS`), with service.name `orchestrator` only when the
    user named no service."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    named = OTELResourceDetector().detect().attributes.get("service.name")
    return Resource.create({} if named else {"service.name": SERVICE_NAME})


def _deliver(spans: Sequence[Any], timeout: float) -> tuple[int, str | None]:
    """Send spans over OTLP/HTTP a batch at a time, stopping at the first batch the receiver
    did not take; how many it took, and why it stopped. Each request gets the exporter's
    timeout plus a little: a receiver that never answers cannot hold the command."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    delivered = 0
    with _exporter_log() as heard:
        exporter: SpanExporter = OTLPSpanExporter(timeout=timeout)
        try:
            for first in range(0, len(spans), EXPORT_BATCH):
                batch = spans[first : first + EXPORT_BATCH]
                outcome: list[object] = []

                def send(batch: Sequence[Any] = batch, outcome: list[object] = outcome) -> None:
                    try:
                        outcome.append(exporter.export(batch))
                    except Exception as exc:  # noqa: BLE001 - older exporters raise; report it
                        outcome.append(exc)

                sender = threading.Thread(target=send, name="otlp-export", daemon=True)
                sender.start()
                sender.join(timeout + EXPORT_GRACE)
                if outcome != [SpanExportResult.SUCCESS]:
                    if not outcome:
                        return delivered, f"no answer within {timeout:g}s"
                    return delivered, _why(outcome + heard)
                delivered += len(batch)
        finally:
            exporter.shutdown()  # also ends the retry wait of a request still running
    return delivered, None


@contextmanager
def _exporter_log() -> Iterator[list[logging.LogRecord]]:
    """Keep what the OTLP exporter logs (retries, failures) off stderr while export-otel
    runs, for its one-line report: yields the records, oldest first."""
    heard: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            heard.append(record)

    logger = logging.getLogger("opentelemetry.exporter")
    keep, propagate = Keep(logging.WARNING), logger.propagate
    logger.addHandler(keep)
    logger.propagate = False
    try:
        yield heard
    finally:
        logger.removeHandler(keep)
        logger.propagate = propagate


def _otlp_endpoint() -> str:
    """Where the OTLP/HTTP exporter sends spans, as its `OTEL_*` variables say, shown
    without credentials or query."""
    url = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318").rstrip("/")
        + "/v1/traces"
    )
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the OTEL_EXPORTER_OTLP_ENDPOINT"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _otlp_timeout() -> float:
    """The exporter's timeout in seconds (the Python exporter reads these as seconds)."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        raw = os.environ.get(name)
        if raw:
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not 0 < value < float("inf"):
                raise ConfigError(f"{name}: {raw!r} is not a positive number of seconds")
            return value
    return 10.0


def _why(seen: Sequence[object]) -> str:
    """Why a batch was not delivered, in one line: the first error met (an exception raised,
    or one the exporter logged), as its innermost cause, so the line says "Connection
    refused" and never repeats a URL (whose query may hold a token); else the first thing
    the exporter logged."""
    found: list[BaseException] = []
    for item in seen:
        if isinstance(item, BaseException):
            found.append(item)
        elif isinstance(item, logging.LogRecord) and isinstance(item.args, tuple):
            found.extend(a for a in item.args if isinstance(a, BaseException))
    if found:
        root = _innermost(found[0])
        text = f"{type(root).__name__}: {root}"
    else:
        logged = [item.getMessage() for item in seen if isinstance(item, logging.LogRecord)]
        text = logged[0] if logged else "the receiver did not accept the spans"
    flat = " ".join(text.split())
    return flat if len(flat) <= 300 else flat[:297] + "..."


def _innermost(exc: BaseException) -> BaseException:
    """Follow an error to what caused it: explicit causes, urllib3's `reason`, and the error
    requests wraps as its first argument."""
    seen = {id(exc)}
    while True:
        candidates = (exc.__cause__, getattr(exc, "reason", None), *exc.args[:1], exc.__context__)
        inner = next((c for c in candidates if isinstance(c, BaseException)), None)
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)
