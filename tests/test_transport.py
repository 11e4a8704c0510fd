"""The HTTP seam: a worker task runs end to end against an in-memory transport, no sockets."""

from __future__ import annotations

import json

from orchestrator import Orchestrator
from orchestrator.transport import MockTransport, Request, Response
from tests.helpers import run


def chat_reply(request: Request) -> Response:
    """An OpenAI chat completion, as a provider sends it."""
    body = {
        "choices": [{"message": {"role": "assistant", "content": "a reply from nowhere"}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4},
    }
    return Response(200, [("Content-Type", "application/json")], [json.dumps(body).encode()])


def test_an_agent_task_runs_against_an_injected_transport() -> None:
    config = {
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
    transport = MockTransport(chat_reply)
    with Orchestrator.open(config=config, store="memory", transport=transport) as orch:
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
