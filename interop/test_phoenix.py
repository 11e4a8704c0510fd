"""Arize Phoenix as a real OTLP receiver: the span of a live task, and the spans that
`orchestrator export-otel` sends from a recorded log, read back through Phoenix's REST API.

Phoenix files spans under the project named by the resource attribute
`openinference.project.name`, so each test reads its own project.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from interop.conftest import CLI, OpenOrch
from interop.peers import free_port, peer_command, serving, wait_for

LIVE_PROJECT = "interop-live"
EXPORT_PROJECT = "interop-export"


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Phoenix server of this run (its own working dir and ports); its base URL."""
    command = peer_command("phoenix")
    workdir = tmp_path_factory.mktemp("phoenix")
    port = free_port()
    env = {
        "PHOENIX_WORKING_DIR": str(workdir),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(free_port()),
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    }
    url = f"http://127.0.0.1:{port}"
    with serving([str(command), "serve"], env, f"{url}/healthz", workdir / "phoenix.log", 240):
        yield url


@pytest.fixture(scope="session")
def exporting(phoenix: str) -> TracerProvider:
    """The caller's (an agent's) tracer provider, exporting to Phoenix over OTLP HTTP."""
    resource = Resource.create(
        {"service.name": "interop-agent", "openinference.project.name": LIVE_PROJECT}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{phoenix}/v1/traces")))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.fail("another tracer provider was installed first in this test process")
    return provider


def spans_in(phoenix: str, project: str, **filters: Any) -> list[dict[str, Any]]:
    """The spans Phoenix has filed under a project so far (none while it has no such project)."""
    resp = httpx.get(
        f"{phoenix}/v1/projects/{project}/spans", params={"limit": 1000, **filters}, timeout=10
    )
    if resp.status_code == 404:
        return []
    resp.raise_for_status()
    spans: list[dict[str, Any]] = resp.json()["data"]
    return spans


def attribute(span: dict[str, Any], key: str) -> Any:
    """A span attribute as Phoenix returns it (flat, or nested by the dots of its key)."""
    attributes = span["attributes"]
    if key in attributes:
        return attributes[key]
    value: Any = attributes
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def task_span(phoenix: str, project: str, task_id: str, **filters: Any) -> dict[str, Any]:
    """Wait for the span of one task to be in Phoenix."""

    def found() -> dict[str, Any] | None:
        for span in spans_in(phoenix, project, **filters):
            if attribute(span, "orchestrator.task_id") == task_id:
                return span
        return None

    return wait_for(found, f"the span of task {task_id} in Phoenix project {project}", 60)


@pytest.mark.parametrize("backend", ["server", "agent"])
def test_a_live_task_is_a_child_of_the_callers_span_in_phoenix(
    phoenix: str, exporting: TracerProvider, open_orch: OpenOrch, backend: str
) -> None:
    orch = open_orch(config={"profiles": {"coder": {"backend": backend}}}, session_id="live")
    tracer = trace.get_tracer("interop-agent")
    with tracer.start_as_current_span("agent-step") as step:
        handle = orch.task_start(
            kind="worker", worker_id="coder", task="traced", model="local/echo-small"
        )
        rec = orch.task_await(handle.task_id, timeout=60)
    assert rec.status == "completed", rec.error
    assert exporting.force_flush(30)
    trace_id = format(step.get_span_context().trace_id, "032x")
    step_id = format(step.get_span_context().span_id, "016x")

    span = task_span(phoenix, LIVE_PROJECT, rec.task_id)
    assert span["name"] == "chat local/echo-small"
    assert attribute(span, "gen_ai.request.model") == "local/echo-small"
    assert attribute(span, "gen_ai.conversation.id") == "live"
    assert span["context"]["trace_id"] == trace_id, "not in the caller's trace"
    assert span["parent_id"] == step_id, "not a child of the caller's span"
    (parent,) = spans_in(phoenix, LIVE_PROJECT, span_id=step_id)
    assert parent["name"] == "agent-step"


def _cli(
    store: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "--store", store, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_export_otel_sends_a_recorded_sessions_spans_to_phoenix(phoenix: str, store: str) -> None:
    recorded = {}
    for session in ("exported", "left-out"):
        done = _cli(store, "--session", session, "run", "coder", f"task of {session}", "--json")
        assert done.returncode == 0, done.stderr
        recorded[session] = json.loads(done.stdout)["task_id"]

    otlp = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={EXPORT_PROJECT}",
    }
    sent = _cli(store, "export-otel", "--session", "exported", env=otlp)
    assert sent.returncode == 0, sent.stderr
    assert re.search(r"\b1\b", sent.stderr), sent.stderr  # how many spans it delivered

    span = task_span(phoenix, EXPORT_PROJECT, recorded["exported"])
    assert span["name"].startswith("chat local/")
    assert attribute(span, "gen_ai.conversation.id") == "exported"
    assert attribute(span, "orchestrator.worker_id") == "coder"
    assert span["status_code"] in ("OK", "UNSET")
    others = [
        s
        for s in spans_in(phoenix, EXPORT_PROJECT)
        if attribute(s, "orchestrator.task_id") == recorded["left-out"]
    ]
    assert others == [], "a span of another session was exported"
