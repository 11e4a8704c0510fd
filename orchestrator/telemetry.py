"""OpenTelemetry spans for worker tasks (the `otel` extra), live and from a recorded log.

Each worker task is one span `chat {model}` with the GenAI semantic-convention attributes
and the decisions behind it (the session's model set, reuse or spawn, failed attempts) as
span events. The same builder (`task_span`) serves a live task and `export-otel`, so both
give the same spans. Without the extra installed nothing here imports OpenTelemetry.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from events.reads import OVERRIDE_TYPES
from events.store import EventRecord
from orchestrator.explain import OverrideCause, override_cause

TRACER = "orchestrator"


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
    requested = resolved.data["resolved_model"] if resolved else None
    served = end.data.get("model")
    model = served or requested or "unknown"
    usage = end.data.get("usage") or {}
    process = next((r for r in chain if r.type in ("WorkerReused", "WorkerSpawned")), None)
    instance_id = end.data.get("instance_id") or (process.data["instance_id"] if process else "")
    reused = end.data.get("reused")
    if reused is None:
        reused = bool(process and process.type == "WorkerReused")
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": model.partition("/")[0],
        "gen_ai.request.model": requested or model,
        "gen_ai.conversation.id": str(started.session_id),
        "orchestrator.task_id": str(started.task_id),
        "orchestrator.worker_id": str(started.worker_id),
        "orchestrator.instance_id": str(instance_id or ""),
        "orchestrator.reused": bool(reused),
    }
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
    return SpanData(f"chat {model}", started.timestamp, end.timestamp, attributes, events, error)


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


def export_log(records: list[EventRecord], session_id: str | None) -> int:
    """`orchestrator export-otel`: send a recorded log's spans over OTLP (settings from the
    standard `OTEL_*` variables), unless a tracer provider is already installed."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        count = emit(spans_of_log(records, session_id))
        current.force_flush()
        return count
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "orchestrator"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    try:
        return emit(spans_of_log(records, session_id), provider.get_tracer(TRACER))
    finally:
        provider.shutdown()


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)
