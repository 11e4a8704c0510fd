"""OpenTelemetry: live spans through the SDK's in-memory exporter, `export-otel` through a
local OTLP/HTTP receiver (the protobuf it is sent, decoded), and nothing imported without
the extra."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import Orchestrator, telemetry
from tests.chat import ChatServer, Reply
from tests.conftest import OpenOrch
from tests.helpers import config_with, run, run_command, set_model

ROOT = Path(__file__).parent.parent
CLI = str(Path(sys.executable).parent / "orchestrator")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """One SQLite file per test."""
    return f"sqlite:///{tmp_path / 'events.db'}"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()


def _shape(span: Any) -> tuple[Any, ...]:
    return (
        span.name,
        dict(span.attributes),
        [(e.name, dict(e.attributes)) for e in span.events],
        span.status.status_code.name,
        span.start_time,
        span.end_time,
    )


def test_worker_tasks_are_genai_spans_live_and_from_the_log(
    open_orch: OpenOrch, spans: InMemorySpanExporter, chat_server: ChatServer
) -> None:
    orch = open_orch(config=config_with("server"), session_id="otel")
    set_model(orch, "coder", "local/echo-small")
    served = run(orch, "coder", "first task")
    reused = run(orch, "coder", "second task")
    lab = {
        "extends": "none",
        "model": "lab/big",
        "providers": {
            "lab": {
                "kind": "openai",
                "base_url": chat_server.url,
                "max_retries": 0,
                "models": {"big": {}},
            }
        },
        "profiles": {"coder": {"backend": "agent"}},
    }
    other = open_orch(config=lab, session_id="otel2")
    chat_server.script = [Reply(status=500, error="down")]
    failed = run(other, "coder", "doomed")
    assert (served.status, reused.status, failed.status) == ("completed", "completed", "failed")

    live = {s.attributes["orchestrator.task_id"]: s for s in spans.get_finished_spans()}
    first, second, bad = live[served.task_id], live[reused.task_id], live[failed.task_id]
    assert first.name == "chat local/echo-small"
    assert first.attributes["gen_ai.operation.name"] == "chat"
    assert first.attributes["gen_ai.provider.name"] == "local"
    assert first.attributes["gen_ai.request.model"] == "local/echo-small"
    assert first.attributes["gen_ai.response.model"] == "local/echo-small"
    assert first.attributes["gen_ai.usage.input_tokens"] == 2
    assert first.attributes["gen_ai.usage.output_tokens"] == 3
    assert first.attributes["gen_ai.conversation.id"] == "otel"
    assert first.attributes["orchestrator.worker_id"] == "coder"
    assert first.attributes["orchestrator.reused"] is False
    assert second.attributes["orchestrator.reused"] is True
    assert (
        second.attributes["orchestrator.instance_id"]
        == first.attributes["orchestrator.instance_id"]
    )
    names = [e.name for e in first.events]
    assert names[0] == "orchestrator.worker.model.set"
    assert "orchestrator.worker.spawned" in names
    assert "orchestrator.worker.reused" in [e.name for e in second.events]
    assert bad.status.status_code.name == "ERROR"
    assert "orchestrator.model.attempt_failed" in [e.name for e in bad.events]

    spans.clear()
    exported = telemetry.export_log(orch.log.records(), None)
    assert (exported.spans, exported.delivered) == (3, 3)
    again = {s.attributes["orchestrator.task_id"]: s for s in spans.get_finished_spans()}
    for task_id, span in live.items():
        assert _shape(again[task_id]) == _shape(span)
    spans.clear()
    assert telemetry.export_log(orch.log.records(), "otel2").spans == 1


def test_without_the_extra_nothing_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import orchestrator.orchestrator, orchestrator.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'mcp'))))\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def _by_task(exporter: InMemorySpanExporter) -> dict[str, Any]:
    """The task spans among the finished ones, by task id."""
    finished = exporter.get_finished_spans()
    return {s.attributes["orchestrator.task_id"]: s for s in finished if s.name.startswith("chat")}


def test_a_task_started_inside_a_span_is_that_spans_child(
    spans: InMemorySpanExporter, store: str
) -> None:
    tracer = trace.get_tracer("an-agent")
    with Orchestrator.open(config=config_with(), store=store) as orch:
        with tracer.start_as_current_span("agent-step") as step:
            inside = orch.task_start(kind="worker", worker_id="coder", task="in a step")
        # Awaited after the step ended: the parent is where the task was started.
        assert orch.task_await(inside.task_id, timeout=60).status == "completed"
        outside = run(orch, "coder", "on its own")  # the same task thread, reused
    live = _by_task(spans)
    child, root = live[inside.task_id], live[outside.task_id]
    assert child.name == "chat local/echo-large"
    assert child.context.trace_id == step.get_span_context().trace_id
    assert child.parent is not None
    assert child.parent.span_id == step.get_span_context().span_id
    assert root.parent is None  # the step's context did not stay in the thread
    assert root.context.trace_id != step.get_span_context().trace_id


def test_a_task_that_fails_before_a_model_is_chosen_has_an_error_span(
    spans: InMemorySpanExporter, store: str
) -> None:
    tracer = trace.get_tracer("an-agent")
    with Orchestrator.open(config=config_with(), store=store) as orch:
        with tracer.start_as_current_span("agent-step") as step:
            nobody = orch.task_start(kind="worker", worker_id="nobody", task="x")
            bad_model = orch.task_start(
                kind="worker", worker_id="coder", task="x", model="nope/none"
            )
        records = orch.log.records()
    live = _by_task(spans)
    unknown, unresolved = live[nobody.task_id], live[bad_model.task_id]
    assert unknown.name == "chat nobody"
    assert unknown.status.status_code.name == "ERROR"
    assert unknown.status.description == 'Unknown worker "nobody".'
    assert unknown.attributes["orchestrator.worker_id"] == "nobody"
    assert "gen_ai.request.model" not in unknown.attributes
    assert unresolved.name == "chat nope/none"
    assert unresolved.status.status_code.name == "ERROR"
    assert unresolved.attributes["gen_ai.request.model"] == "nope/none"
    assert unresolved.attributes["error.type"] == "task_failed"
    for span in (unknown, unresolved):
        assert span.parent is not None
        assert span.parent.span_id == step.get_span_context().span_id
    # export-otel gives the same spans
    spans.clear()
    assert telemetry.export_log(records, None).delivered == 2
    again = _by_task(spans)
    for task_id, span in live.items():
        assert _shape(again[task_id]) == _shape(span)


# --- export-otel against a local OTLP/HTTP receiver ----------------------------------------------


@dataclass
class Receiver:
    """What a local OTLP/HTTP receiver got: one decoded request per POST /v1/traces."""

    url: str
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)

    def spans(self) -> list[Any]:
        return [
            s
            for r in self.requests
            for rs in r.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]

    def resources(self) -> list[dict[str, str]]:
        return [
            {a.key: a.value.string_value for a in rs.resource.attributes}
            for r in self.requests
            for rs in r.resource_spans
        ]


@contextmanager
def otlp_receiver(accept: int | None = None) -> Iterator[Receiver]:
    """A loopback OTLP/HTTP traces endpoint that accepts every request (or the first
    `accept` ones, then answers 400)."""
    received: list[ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces":
                self.send_response(404)
            elif accept is not None and len(received) >= accept:
                self.send_response(400)
            else:
                received.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Receiver(f"http://127.0.0.1:{server.server_address[1]}", received)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _otel_env(**settings: str) -> dict[str, str]:
    """This environment without the caller's OTEL_* settings, plus these; the exporter gives
    up after a second, so a dead endpoint cannot hold a test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "OTEL_EXPORTER_OTLP_TIMEOUT": "1", **settings}


def _export_otel(store: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_command([CLI, "--store", store, "export-otel", *args], ROOT, env)


@pytest.fixture
def recorded(store: str) -> str:
    """A log with two finished worker tasks: one served, one failed before a model."""
    with Orchestrator.open(config=config_with(), store=store, session_id="rec") as orch:
        assert run(orch, "coder", "hello").status == "completed"
        assert run(orch, "nobody", "hello").status == "failed"
    return store


def test_export_otel_delivers_every_span_and_says_so(recorded: str) -> None:
    with otlp_receiver() as receiver:
        env = _otel_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_SERVICE_NAME="x",
            OTEL_RESOURCE_ATTRIBUTES="team=core",
        )
        out = _export_otel(recorded, env)
        assert out.returncode == 0, out.stderr
        assert out.stderr.strip() == "exported 2 spans"
        assert sorted(s.name for s in receiver.spans()) == ["chat local/echo-large", "chat nobody"]
        assert {r["service.name"] for r in receiver.resources()} == {"x"}
        assert {r["team"] for r in receiver.resources()} == {"core"}

        receiver.requests.clear()
        out = _export_otel(recorded, _otel_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url))
        assert out.returncode == 0, out.stderr
        assert {r["service.name"] for r in receiver.resources()} == {"orchestrator"}

        receiver.requests.clear()
        env = _otel_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_RESOURCE_ATTRIBUTES="service.name=from-attributes",
        )
        out = _export_otel(recorded, env, "--session", "elsewhere")
        assert (out.returncode, out.stderr.strip()) == (0, "exported 0 spans")
        out = _export_otel(recorded, env, "--session", "rec")
        assert (out.returncode, out.stderr.strip()) == (0, "exported 2 spans")
        assert {r["service.name"] for r in receiver.resources()} == {"from-attributes"}


def test_export_otel_to_a_closed_port_fails_with_one_line(recorded: str) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    out = _export_otel(recorded, _otel_env(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: delivered 0 of 2 spans to {endpoint}/v1/traces"), lines
    assert "Traceback" not in out.stderr


def test_delivery_stops_at_the_first_batch_the_receiver_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(built))
    for n in range(telemetry.EXPORT_BATCH * 2 + 1):
        provider.get_tracer("t").start_span(f"s{n}").end()
    with otlp_receiver(accept=1) as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        delivered, problem = telemetry._deliver(built.get_finished_spans(), timeout=2)
        assert len(receiver.spans()) == telemetry.EXPORT_BATCH
    assert delivered == telemetry.EXPORT_BATCH
    assert problem is not None and "400" in problem


LIVE_SCRIPT = """
import sys
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from orchestrator import Orchestrator
from tests.helpers import config_with

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
with trace.get_tracer("an-agent").start_as_current_span("agent-step"):
    with Orchestrator.open(config=config_with(), store=sys.argv[1]) as orch:
        handle = orch.task_start(kind="worker", worker_id="coder", task="hello")
        print(orch.task_await(handle.task_id, timeout=60).status)
provider.shutdown()
"""


def test_live_spans_reach_an_otlp_receiver_through_a_batch_processor(store: str) -> None:
    """What a user of an OTLP backend (Phoenix, Jaeger...) sees: the task's span arrives,
    the child of the agent's step, once the application shuts its provider down."""
    with otlp_receiver() as receiver:
        env = _otel_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
        out = run_command([sys.executable, "-c", LIVE_SCRIPT, store], ROOT, env)
        assert (out.returncode, out.stdout.strip()) == (0, "completed"), out.stderr
        got = {s.name: s for s in receiver.spans()}
    assert set(got) == {"agent-step", "chat local/echo-large"}
    step, chat = got["agent-step"], got["chat local/echo-large"]
    assert chat.trace_id == step.trace_id
    assert chat.parent_span_id == step.span_id
