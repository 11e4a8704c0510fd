"""The Task API surface: schema errors, camelCase, views, memory ops, cancel, await."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from orchestrator import InvalidTaskArgs, Orchestrator, TaskStartArgs
from tests.conftest import ChatServer, OpenOrch
from tests.helpers import config_with, lab_config, op, run, set_model


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"kind": "worker", "task": "x"}, "worker_id"),
        ({"kind": "worker", "worker_id": "coder"}, "task"),
        ({"kind": "job", "worker_id": "coder", "task": "x"}, "kind"),
        (
            {"kind": "op", "op": "worker.model.set", "worker": {"worker_id": "coder"}},
            "worker.model",
        ),
        ({"kind": "op", "op": "worker.model.set"}, "worker"),
        ({"kind": "op", "op": "worker.modl.set", "worker": {"worker_id": "coder"}}, "op"),
        (
            {
                "kind": "op",
                "op": "worker.model.set",
                "worker": {"worker_id": "coder", "model": "auto", "model_policy": "forever"},
            },
            "worker.model_policy",
        ),
        ({"kind": "worker", "worker_id": "coder", "task": "x", "forceNu": True}, "forceNu"),
        ({"kind": "op", "op": "memory.put", "memory": {"key": "k"}}, "memory.value"),
    ],
)
def test_bad_payloads_raise_invalid_task_args_naming_the_field(
    open_orch: OpenOrch, payload: dict[str, Any], field: str
) -> None:
    orch = open_orch(config=config_with())
    with pytest.raises(InvalidTaskArgs) as err:
        orch.task_start(**payload)
    assert field in str(err.value)
    assert isinstance(err.value, ValueError)


def test_camel_case_payloads_from_a_tool_call_are_accepted(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with())
    payload = json.loads(
        '{"kind": "op", "op": "worker.model.set",'
        ' "worker": {"workerId": "coder", "model": "auto:fast", "modelPolicy": "dynamic"}}'
    )
    rec = orch.task_await(orch.task_start(**payload).task_id)
    assert rec.result["model_policy"] == "dynamic"
    rec = run(orch, "coder", "x", autoSpawn=True, forceNew=False)
    assert rec.response == "[local/echo-small] x"


def test_the_tool_schema_is_the_args_model_schema() -> None:
    schema = TaskStartArgs.model_json_schema(by_alias=True)
    assert {"kind", "workerId", "task", "model", "autoSpawn", "forceNew", "op"} <= set(
        schema["properties"]
    )


def test_views(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with())
    assert [p.worker_id for p in orch.task_list(view="profiles")] == [
        "coder",
        "docs",
        "explorer",
        "vision",
        "architect",
    ]
    models = {m.model: m for m in orch.task_list(view="models")}
    assert models["local/echo-vision"].vision and models["local/echo-small"].usable
    rec = run(orch, "explorer", "q")
    assert [t.task_id for t in orch.task_list(view="tasks")] == [rec.task_id]
    assert rec.model == "local/echo-small"
    with pytest.raises(InvalidTaskArgs, match='Did you mean "tasks"'):
        orch.task_list(view="taks")


def test_memory_ops_are_a_projection_of_the_log(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with())
    op(orch, "memory.put", memory={"key": "a", "value": "alpha", "tags": ["x"]})
    op(orch, "memory.put", memory={"key": "b", "value": "beta"})
    op(orch, "memory.link", memory={"from_key": "a", "to_key": "b", "type": "cites"})
    op(orch, "memory.done", memory={"task_id": "t-1", "summary": "did it"})
    rows = orch.task_list(view="memory")
    assert [(r.kind, r.key or r.from_key or r.task_id) for r in rows] == [
        ("note", "a"),
        ("note", "b"),
        ("link", "a"),
        ("done", "t-1"),
    ]
    assert rows[0].tags == ["x"]


def test_peek_await_and_cancel(open_orch: OpenOrch) -> None:
    orch = open_orch(config=config_with())
    rec = run(orch, "coder", "done already")
    assert orch.task_peek(rec.task_id).status == "completed"
    assert orch.task_cancel(rec.task_id).status == "completed"  # finished tasks stay finished
    with pytest.raises(InvalidTaskArgs, match="Unknown task"):
        orch.task_peek("t-nope")


@pytest.mark.parametrize("backend", ["agent", "server"])
def test_openai_provider_sends_the_chosen_model_and_reads_the_key_at_call_time(
    open_orch: OpenOrch, chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    port = chat_server.server_address[1]
    cfg = lab_config(port, backend, ("big", "small"), api_key_env="LAB_KEY")
    monkeypatch.setenv("LAB_KEY", "sekret-123")
    orch = open_orch(config=cfg)
    assert run(orch, "coder", "hi").response == "big says hi"
    op(orch, "worker.model.set", worker={"worker_id": "coder", "model": "lab/small"})
    assert run(orch, "coder", "yo").response == "small says yo"
    assert [b["model"] for b in chat_server.seen] == ["big", "small"]
    assert chat_server.auth == ["Bearer sekret-123"] * 2
    # The key never enters the log.
    assert "sekret-123" not in repr(orch.task_list(view="events"))


def test_openai_provider_without_its_key_fails_the_task_clearly(
    open_orch: OpenOrch, chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAB_KEY", raising=False)
    cfg = lab_config(9, "agent", ("big",), api_key_env="LAB_KEY")
    rec = run(open_orch(config=cfg), "coder", "hi")
    assert rec.status == "failed"
    assert rec.error == 'Provider "lab" needs an API key: set LAB_KEY.'


def test_default_store_is_a_private_file_in_the_state_dir(
    state_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with Orchestrator.open(config=config_with(), session_id="d") as orch:
        set_model(orch, "coder", "local/echo-small")
    db = state_home / "orchestrator" / "events.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700

    elsewhere = tmp_path / "env.db"
    monkeypatch.setenv("ORCHESTRATOR_STORE", f"sqlite:///{elsewhere}")
    with Orchestrator.open(config=config_with(), session_id="d") as orch:
        assert orch.task_list(view="workers")[0].model == "local/echo-large"  # other store
    assert elsewhere.exists()


def test_await_times_out_with_the_running_record_and_cancel_drops_the_late_result(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    chat_server.delay = 1.5
    cfg = lab_config(chat_server.server_address[1], "agent")
    orch = open_orch(config=cfg)
    handle = orch.task_start(kind="worker", worker_id="coder", task="slow one")
    assert handle.status == "running"
    assert orch.task_await(handle.task_id, timeout=0.1).status == "running"
    assert orch.task_cancel(handle.task_id).status == "cancelled"
    final = orch.task_await(handle.task_id, timeout=10)  # the provider answers meanwhile
    assert final.status == "cancelled"
    assert final.response is None
    types = [e.type for e in orch.task_list(view="events", task_id=handle.task_id)]
    assert types == ["TaskStarted", "ModelResolved", "TaskCancelled"]
