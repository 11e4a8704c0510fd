"""The HTTP seam: a worker task runs end to end against an in-memory transport, no sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from orchestrator import AsyncOrchestrator, Orchestrator
from orchestrator.transport import MockTransport, Request, Response
from tests.helpers import run


def chat_reply(request: Request) -> Response:
    """An OpenAI chat completion, as a provider sends it."""
    body = {
        "choices": [{"message": {"role": "assistant", "content": "a reply from nowhere"}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4},
    }
    return Response(200, [("Content-Type", "application/json")], [json.dumps(body).encode()])


CONFIG: dict[str, Any] = {
    "extends": "none",
    "model": "lab/big",
    "small_model": "lab/big",
    "providers": {
        "lab": {
            "kind": "openai",
            # Port 9 (discard): a request that used a socket would fail, not be answered.
            "base_url": "http://127.0.0.1:9/v1",
            "max_retries": 0,
            "models": {"big": {}},
        }
    },
    "profiles": {"coder": {"backend": "agent", "system_prompt": "Be brief."}},
}


def test_an_agent_task_runs_against_an_injected_transport() -> None:
    transport = MockTransport(chat_reply)
    with Orchestrator.open(config=CONFIG, store="memory", transport=transport) as orch:
        record = run(orch, "coder", "say something")

    assert (record.status, record.response, record.model) == (
        "completed",
        "a reply from nowhere",
        "lab/big",
    )
    assert record.usage is not None
    assert (record.usage["input_tokens"], record.usage["output_tokens"]) == (11, 4)
    [sent] = transport.requests
    assert (sent.method, sent.url) == ("POST", "http://127.0.0.1:9/v1/chat/completions")
    assert json.loads(sent.content) == {
        "model": "big",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "say something"},
        ],
    }


def test_the_async_facade_takes_a_transport_too() -> None:
    transport = MockTransport(chat_reply)

    async def main() -> Any:
        async with AsyncOrchestrator.open(CONFIG, "memory", transport=transport) as orch:
            handle = await orch.task_start(kind="worker", worker_id="coder", task="hi")
            return await orch.task_await(handle.task_id, timeout=60)

    record = asyncio.run(main())
    assert (record.status, record.response) == ("completed", "a reply from nowhere")
    assert len(transport.requests) == 1
