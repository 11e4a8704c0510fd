"""Conversations drawn from the log: `continue_from` and `tool_results`, checked by the exact
`messages` a local OpenAI-protocol server received for each turn, on both backends, through
the Python API, the CLI and MCP."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.store import EventLog, Filter
from orchestrator import InvalidTaskArgs, Orchestrator
from orchestrator.history import check
from tests.chat import ChatServer, Reply
from tests.chat import chat_server as serve_chat
from tests.conftest import OpenOrch
from tests.helpers import WEATHER_TOOL, lab_settings, run, run_command, set_model, weather_call

ROOT = Path(__file__).parent.parent
CLI = str(Path(sys.executable).parent / "orchestrator")
SYSTEM = "Be brief."
TOOL = WEATHER_TOOL
CALL = weather_call(1, "Paris")
CALL_2 = weather_call(2, "Rome")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """One SQLite file per test (the index read is checked on every store below)."""
    return f"sqlite:///{tmp_path / 'events.db'}"


def lab(port: int, backend: str = "agent", tiny_context: int = 8192) -> dict[str, Any]:
    """Provider `lab` on a local port: `big`, `small` and `tiny` (whose context is small)."""
    models = {
        "big": {"tool_call": True, "context": 128_000},
        "small": {"context": 32_000},
        "tiny": {"context": tiny_context},
    }
    return lab_settings(
        port, models, profiles={"coder": {"backend": backend, "system_prompt": SYSTEM}}
    )


def sent(server: ChatServer) -> list[list[dict[str, Any]]]:
    """The `messages` of every request the server received, in order."""
    return [r.body["messages"] for r in server.requests]


def sys_msg() -> dict[str, Any]:
    return {"role": "system", "content": SYSTEM}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str | None, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if calls:
        return {"role": "assistant", "content": text, "tool_calls": calls}
    return {"role": "assistant", "content": text}


def tool(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def rows_as_messages(orch: Orchestrator, task_id: str) -> list[dict[str, Any]]:
    """The `conversation` view as chat messages (the fields a message has)."""
    out = []
    for row in orch.task_list(view="conversation", task_id=task_id):
        message: dict[str, Any] = {"role": row.role, "content": row.content}
        if row.tool_calls:
            message["tool_calls"] = row.tool_calls
        if row.tool_call_id:
            message["tool_call_id"] = row.tool_call_id
        out.append(message)
    return out


# --- the history a model receives ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["agent", "server"])
def test_each_turn_sends_the_whole_history_in_order(
    open_orch: OpenOrch, chat_server: ChatServer, backend: str
) -> None:
    orch = open_orch(config=lab(chat_server.port, backend))
    first = run(orch, "coder", "hello")
    second = run(orch, "coder", "and then?", continue_from=first.task_id)
    third = run(orch, "coder", "finally", continue_from=second.task_id)
    assert [r.status for r in (first, second, third)] == ["completed"] * 3, third.error
    assert sent(chat_server) == [
        [sys_msg(), user("hello")],
        [sys_msg(), user("hello"), assistant("big says hello"), user("and then?")],
        [
            sys_msg(),
            user("hello"),
            assistant("big says hello"),
            user("and then?"),
            assistant("big says and then?"),
            user("finally"),
        ],
    ]
    # The view lists what the request carried, then the reply, each with its turn and model.
    assert rows_as_messages(orch, third.task_id) == [
        *sent(chat_server)[-1],
        assistant("big says finally"),
    ]
    rows = orch.task_list(view="conversation", task_id=third.task_id)
    assert [r.task_id for r in rows[1:]] == [first.task_id] * 2 + [second.task_id] * 2 + [
        third.task_id
    ] * 2
    assert {r.model for r in rows} == {"lab/big"}


@pytest.mark.parametrize("backend", ["agent", "server"])
def test_two_continuations_of_one_task_are_two_branches(
    open_orch: OpenOrch, chat_server: ChatServer, backend: str
) -> None:
    orch = open_orch(config=lab(chat_server.port, backend))
    root = run(orch, "coder", "root")
    left = run(orch, "coder", "left", continue_from=root.task_id)
    right = run(orch, "coder", "right", continue_from=root.task_id)
    after_left = run(orch, "coder", "more", continue_from=left.task_id)
    base = [sys_msg(), user("root"), assistant("big says root")]
    assert sent(chat_server)[1:] == [
        [*base, user("left")],
        [*base, user("right")],  # the left branch is not in it
        [*base, user("left"), assistant("big says left"), user("more")],
    ]
    assert after_left.status == right.status == "completed"


def test_a_model_set_between_turns_sends_the_next_turn_history_and_all_to_it(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    orch = open_orch(config=lab(chat_server.port, "server"))
    first = run(orch, "coder", "hello")
    assert set_model(orch, "coder", "lab/small").status == "completed"
    second = run(orch, "coder", "again", continue_from=first.task_id)
    request = chat_server.requests[-1].body
    assert request["model"] == "small"
    assert request["messages"] == [
        sys_msg(),
        user("hello"),
        assistant("big says hello"),
        user("again"),
    ]
    assert (first.model, second.model) == ("lab/big", "lab/small")
    rows = orch.task_list(view="conversation", task_id=second.task_id)
    assert [(r.role, r.model) for r in rows] == [
        ("system", "lab/small"),
        ("user", "lab/big"),
        ("assistant", "lab/big"),
        ("user", "lab/small"),
        ("assistant", "lab/small"),
    ]
    (expl,) = orch.task_list(view="explain", task_id=second.task_id)
    assert [(t.task_id, t.model) for t in expl.conversation] == [(first.task_id, "lab/big")]
    assert any(f"{first.task_id} (lab/big)" in line for line in expl.summary)
    assert "served by model lab/small" in expl.summary


def test_a_fallback_within_a_turn_keeps_the_history(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    config = lab(chat_server.port)
    config["profiles"]["coder"]["fallback_models"] = ["lab/small"]
    orch = open_orch(config=config)
    first = run(orch, "coder", "hello")
    chat_server.script = [Reply(status=503, error="big is down")]
    second = run(orch, "coder", "again", continue_from=first.task_id)
    assert second.status == "completed" and second.model == "lab/small"
    history = [sys_msg(), user("hello"), assistant("big says hello"), user("again")]
    assert [(r.body["model"], r.body["messages"]) for r in chat_server.requests[1:]] == [
        ("big", history),
        ("small", history),
    ]


# --- tool results --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["agent", "server"])
def test_a_tool_loop_through_the_python_api(
    open_orch: OpenOrch, chat_server: ChatServer, backend: str
) -> None:
    orch = open_orch(config=lab(chat_server.port, backend))
    chat_server.script = [Reply(content=None, tool_calls=[CALL, CALL_2])]
    asked = run(orch, "coder", "weather in Paris and Rome?", tools=[TOOL])
    assert asked.tool_calls == [CALL, CALL_2] and asked.response == ""
    # The caller runs the tools and sends the results back; no new user message.
    handle = orch.task_start(
        worker_id="coder",
        continue_from=asked.task_id,
        tool_results=[
            {"tool_call_id": "call_1", "content": "18C"},
            {"toolCallId": "call_2", "content": "24C"},
        ],
        tools=[TOOL],
    )
    answered = orch.task_await(handle.task_id, timeout=60)
    assert answered.status == "completed", answered.error
    assert answered.response == "big says 24C"
    assert chat_server.requests[-1].body["tools"] == [TOOL]
    expected = [
        sys_msg(),
        user("weather in Paris and Rome?"),
        assistant(None, [CALL, CALL_2]),
        tool("call_1", "18C"),
        tool("call_2", "24C"),
    ]
    assert sent(chat_server)[-1] == expected
    # And the next turn carries all of it, the answer included.
    run(orch, "coder", "thanks", continue_from=answered.task_id)
    assert sent(chat_server)[-1] == [*expected, assistant("big says 24C"), user("thanks")]


@pytest.mark.parametrize(
    ("results", "problem"),
    [
        ([{"tool_call_id": "call_9", "content": "x"}], "unknown call_9"),
        ([{"tool_call_id": "call_1", "content": "x"}], "not answered call_2"),
        (
            [
                {"tool_call_id": "call_1", "content": "x"},
                {"tool_call_id": "call_1", "content": "y"},
                {"tool_call_id": "call_2", "content": "z"},
            ],
            "answered more than once call_1",
        ),
        (None, "not answered call_1, call_2"),
    ],
)
def test_tool_results_must_answer_each_call_once(
    open_orch: OpenOrch,
    chat_server: ChatServer,
    results: list[dict[str, str]] | None,
    problem: str,
) -> None:
    orch = open_orch(config=lab(chat_server.port))
    chat_server.script = [Reply(content=None, tool_calls=[CALL, CALL_2])]
    asked = run(orch, "coder", "weather?", tools=[TOOL])
    rec = run(orch, "coder", "", continue_from=asked.task_id, tool_results=results)
    assert rec.status == "failed"
    assert "asked for the tool calls call_1, call_2" in str(rec.error)
    assert problem in str(rec.error)
    assert len(chat_server.requests) == 1  # nothing was sent


def test_continuing_what_cannot_be_continued_fails_and_says_why(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    orch = open_orch(config=lab(chat_server.port))
    done = run(orch, "coder", "hello")
    chat_server.script = [Reply(status=400, error="bad request")]
    broken = run(orch, "coder", "boom")
    op = orch.task_start(kind="op", op="memory.put", memory={"key": "k", "value": "v"})
    cases = {
        "t-nope": 'no task "t-nope" in this store',
        broken.task_id: f'task "{broken.task_id}" failed',
        op.task_id: "is an op, not a worker task",
    }
    for parent, says in cases.items():
        rec = run(orch, "coder", "next", continue_from=parent)
        assert rec.status == "failed" and says in str(rec.error), rec.error
    rec = run(orch, "coder", "x", continue_from=done.task_id, tool_results=[])
    assert rec.status == "completed"  # an empty list answers no calls, and none were asked
    rec = run(
        orch,
        "coder",
        "x",
        continue_from=done.task_id,
        tool_results=[{"tool_call_id": "a", "content": "b"}],
    )
    assert rec.status == "failed" and "asked for no tool calls" in str(rec.error)
    with pytest.raises(InvalidTaskArgs, match="tool_results: needs continue_from"):
        orch.task_start(worker_id="coder", tool_results=[{"tool_call_id": "a", "content": "b"}])
    with pytest.raises(InvalidTaskArgs, match=r"task: Field required"):
        orch.task_start(worker_id="coder", continue_from=done.task_id)
    with pytest.raises(InvalidTaskArgs, match=r"tool_results\.0\.tool_call_id: given twice"):
        orch.task_start(
            worker_id="coder",
            continue_from=done.task_id,
            tool_results=[{"tool_call_id": "a", "toolCallId": "a", "content": "b"}],
        )


# --- trimming ------------------------------------------------------------------------------------


def test_a_long_history_drops_its_oldest_turns_for_a_small_context(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    # Each text is 400 characters (~100 tokens + 4 per message): a turn (message and
    # reply) is ~211 tokens, so a 600-token model keeps two earlier turns besides the new one.
    orch = open_orch(config=lab(chat_server.port, tiny_context=600))
    set_model(orch, "coder", "lab/tiny")
    texts = [c * 400 for c in "abcde"]
    parent = None
    for text in texts:
        rec = run(orch, "coder", text, continue_from=parent)
        assert rec.status == "completed", rec.error
        parent = rec.task_id
    last = sent(chat_server)[-1]
    assert last == [
        sys_msg(),
        user(texts[2]),
        assistant(f"tiny says {texts[2]}"),
        user(texts[3]),
        assistant(f"tiny says {texts[3]}"),
        user(texts[4]),
    ]
    trims = [
        e.data
        for e in orch.task_list(view="events", type="ConversationTrimmed")
        if e.task_id == parent
    ]
    assert trims == [
        {
            "version": 1,
            "model": "lab/tiny",
            "context": 600,
            "estimated_tokens": trims[0]["estimated_tokens"],
            "dropped_turns": 2,
            "kept_turns": 2,
        }
    ]
    assert trims[0]["estimated_tokens"] <= 600
    assert rows_as_messages(orch, parent) == [*last, assistant(f"tiny says {texts[4]}")]
    (expl,) = orch.task_list(view="explain", task_id=parent)
    assert len(expl.conversation) == 4  # the chain it came from, trimmed turns included
    assert any("dropped the oldest 2 turn(s), kept 2" in line for line in expl.summary)


def test_trimming_never_parts_an_assistant_message_from_its_tool_results(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    # t1 (~211 tokens), t2 a short question answered by a tool call, t3 its 400-character
    # result and the reply, t4 a new message. Dropping t1 is not enough for 340 tokens, and
    # cutting between t2 and t3 would leave tool results without their call: all go.
    orch = open_orch(config=lab(chat_server.port, tiny_context=340))
    set_model(orch, "coder", "lab/tiny")
    t1 = run(orch, "coder", "a" * 400)
    chat_server.script = [Reply(content=None, tool_calls=[CALL])]
    t2 = run(orch, "coder", "go", continue_from=t1.task_id, tools=[TOOL])
    t3 = run(
        orch,
        "coder",
        "",
        continue_from=t2.task_id,
        tool_results=[{"tool_call_id": "call_1", "content": "r" * 400}],
    )
    t4 = run(orch, "coder", "d" * 400, continue_from=t3.task_id)
    assert t4.status == "completed", t4.error
    assert sent(chat_server)[-1] == [sys_msg(), user("d" * 400)]
    for messages in sent(chat_server):
        after_system = messages[1:]
        assert after_system[0]["role"] != "tool"  # never a result without its call
    trimmed = orch.task_list(view="events", type="ConversationTrimmed", task_id=t4.task_id)
    assert [(e.data["dropped_turns"], e.data["kept_turns"]) for e in trimmed] == [(3, 0)]


# --- the log holds the conversation --------------------------------------------------------------


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATOR_STORE": f"sqlite:///{tmp_path / 'events.db'}"}
    argv = [CLI, "--config", str(tmp_path / "orchestrator.toml"), *args]
    return run_command(argv, tmp_path, env, timeout=120)


def _write_toml(tmp_path: Path, port: int, backend: str = "server") -> None:
    (tmp_path / "orchestrator.toml").write_text(
        f"""extends = "none"
model = "lab/big"
[providers.lab]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
max_retries = 0
[providers.lab.models.big]
tool_call = true
[profiles.coder]
backend = "{backend}"
system_prompt = "{SYSTEM}"
"""
    )


def test_a_new_process_continues_a_conversation_the_closed_one_began(
    tmp_path: Path, chat_server: ChatServer
) -> None:
    _write_toml(tmp_path, chat_server.port)
    store = f"sqlite:///{tmp_path / 'events.db'}"
    with Orchestrator.open(config=tmp_path / "orchestrator.toml", store=store) as orch:
        first = run(orch, "coder", "remember 42")
    assert first.status == "completed"
    # Another process (the CLI, session `cli`) continues it from the log alone.
    done = _cli(tmp_path, "run", "coder", "what number?", "--continue", first.task_id, "--json")
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)
    assert second["response"] == "big says what number?"
    assert second["session_id"] == "cli" != first.session_id
    assert sent(chat_server)[-1] == [
        sys_msg(),
        user("remember 42"),
        assistant("big says remember 42"),
        user("what number?"),
    ]
    shown = _cli(tmp_path, "conversation", second["task_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(r["task_id"], r["role"], r["content"]) for r in json.loads(shown.stdout)] == [
        (second["task_id"], "system", SYSTEM),
        (first.task_id, "user", "remember 42"),
        (first.task_id, "assistant", "big says remember 42"),
        (second["task_id"], "user", "what number?"),
        (second["task_id"], "assistant", "big says what number?"),
    ]
    table = _cli(tmp_path, "conversation", second["task_id"])
    assert table.returncode == 0 and "remember 42" in table.stdout
    explained = _cli(tmp_path, "explain", "task", second["task_id"])
    assert f"its history came from {first.task_id} (lab/big)" in explained.stdout
    unknown = _cli(tmp_path, "conversation", "t-nope")
    assert unknown.returncode == 2 and unknown.stderr == 'error: Unknown task "t-nope".\n'
    _cli(tmp_path, "stop", "--all")


def test_a_tool_loop_through_the_cli(tmp_path: Path, chat_server: ChatServer) -> None:
    _write_toml(tmp_path, chat_server.port, backend="agent")
    (tmp_path / "tools.json").write_text(json.dumps([TOOL]))
    chat_server.script = [Reply(content=None, tool_calls=[CALL])]
    asked = _cli(tmp_path, "run", "coder", "weather?", "--tools", "tools.json")
    assert asked.returncode == 0, asked.stderr
    assert 'tool call call_1: get_weather({"city": "Paris"})' in asked.stdout
    completed = _cli(tmp_path, "events", "--type", "TaskCompleted", "--json")
    task_id = json.loads(completed.stdout)[-1]["task_id"]
    answered = _cli(
        tmp_path, "run", "coder", "", "--continue", task_id, "--tool-result", "call_1=sunny"
    )
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout == "big says sunny\n"
    assert sent(chat_server)[-1] == [
        sys_msg(),
        user("weather?"),
        assistant(None, [CALL]),
        tool("call_1", "sunny"),
    ]
    bad = _cli(tmp_path, "run", "coder", "", "--continue", task_id, "--tool-result", "nope")
    assert bad.returncode == 2
    assert bad.stderr == "error: --tool-result: expected CALL_ID=TEXT, got 'nope'\n"


async def _mcp_tool_loop(tmp_path: Path) -> tuple[Any, Any]:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    env = {"XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    args = ["--config", str(tmp_path / "orchestrator.toml")]
    args += ["--store", f"sqlite:///{tmp_path / 'events.db'}", "mcp"]
    params = StdioServerParameters(command=CLI, args=args, cwd=str(ROOT), env=env)

    def answer(result: Any) -> Any:
        assert result.is_error is not True, result.content[0].text
        return json.loads(result.content[0].text)

    with anyio.fail_after(60):
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            listed = await s.list_tools()
            start = {"kind": "worker", "workerId": "coder", "task": "weather?", "tools": [TOOL]}
            handle = answer(await s.call_tool("task_start", start))
            asked = answer(await s.call_tool("task_await", {"task_id": handle["task_id"]}))
            results = [{"toolCallId": c["id"], "content": "sunny"} for c in asked["tool_calls"]]
            follow = {
                "kind": "worker",
                "workerId": "coder",
                "continueFrom": asked["task_id"],
                "toolResults": results,
            }
            handle = answer(await s.call_tool("task_start", follow))
            done = answer(await s.call_tool("task_await", {"task_id": handle["task_id"]}))
    return listed, done


def test_a_tool_loop_through_mcp(tmp_path: Path, chat_server: ChatServer) -> None:
    _write_toml(tmp_path, chat_server.port, backend="agent")
    chat_server.script = [Reply(content=None, tool_calls=[CALL])]
    listed, done = anyio.run(_mcp_tool_loop, tmp_path)
    schema = next(t for t in listed.tools if t.name == "task_start").input_schema
    assert schema["properties"]["continueFrom"]["type"] == "string"
    assert schema["properties"]["toolResults"]["items"]["required"] == ["toolCallId", "content"]
    assert done["status"] == "completed" and done["response"] == "big says sunny"
    assert sent(chat_server)[-1][-2:] == [assistant(None, [CALL]), tool("call_1", "sunny")]


def test_echo_continues_offline(open_orch: OpenOrch) -> None:
    orch = open_orch()
    first = run(orch, "coder", "hello")
    second = run(orch, "coder", "again", continue_from=first.task_id)
    assert second.response == "[local/echo-large] again"
    assert second.usage is not None and second.usage["input_tokens"] == 4  # every word sent
    assert [r.role for r in orch.task_list(view="conversation", task_id=second.task_id)][1:] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_replay_fork_diff_and_whatif_work_on_conversations(
    open_orch: OpenOrch, chat_server: ChatServer
) -> None:
    orch = open_orch(config=lab(chat_server.port), session_id="talk")
    first = run(orch, "coder", "hello")
    second = run(orch, "coder", "again", continue_from=first.task_id)
    head = orch.log.head()
    (replayed,) = orch.task_list(view="replay")
    assert {t.task_id for t in replayed.tasks} >= {first.task_id, second.task_id}
    assert any(r.key == second.task_id for r in orch.task_list(view="diff", since=0))
    forked = orch.task_start(
        kind="op", op="session.fork", session={"from_session_id": "talk", "position": head}
    )
    assert orch.task_await(forked.task_id).status == "completed"
    assert check(orch.log).ok
    other = lab(chat_server.port)
    other["profiles"]["coder"]["model"] = "lab/small"
    rows = {r.task_id: r for r in orch.task_list(view="whatif", config=other)}
    assert (rows[first.task_id].turn, rows[first.task_id].continue_from) == (1, None)
    assert (rows[second.task_id].turn, rows[second.task_id].continue_from) == (2, first.task_id)
    assert rows[second.task_id].changed and rows[second.task_id].whatif_model == "lab/small"


# --- one indexed read per conversation ---------------------------------------------------------


def test_the_history_is_one_select_over_the_turns_ids(
    open_orch: OpenOrch, chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    orch = open_orch(config=lab(chat_server.port))
    chain: list[str] = []
    for i in range(30):
        rec = run(orch, "coder", f"turn {i}", continue_from=chain[-1] if chain else None)
        run(orch, "coder", f"noise {i}")  # other tasks between the turns
        chain.append(rec.task_id)
    selects: list[Filter] = []
    real = EventLog.select

    def spy(self: EventLog, where: Filter | None = None, *args: Any, **kwargs: Any) -> Any:
        selects.append(where or Filter())
        return real(self, where, *args, **kwargs)

    monkeypatch.setattr(EventLog, "select", spy)
    last = run(orch, "coder", "turn 30", continue_from=chain[-1])
    assert last.status == "completed"
    assert len(sent(chat_server)[-1]) == 1 + 2 * 30 + 1
    by_ids = [f for f in selects if f.task_ids]
    assert [f.task_ids for f in by_ids] == [tuple(chain[:-1])]  # one read, the turns only
    assert [f.task_id for f in selects if f.task_id] == [chain[-1]]  # and the parent's own
    indexed = ("task_id", "task_ids", "session_id", "worker_id", "stream")
    scans = [f for f in selects if not any(getattr(f, column) for column in indexed)]
    assert scans == []  # nothing read the log from its start


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "postgresql"])
def test_a_select_over_task_ids_returns_their_events_in_log_order(
    tmp_path: Path, store_kind: str
) -> None:
    from tests.conftest import postgres_schema

    def check_on(url: str) -> None:
        with Orchestrator.open(store=url) as orch:
            ids = [run(orch, "coder", f"t{i}").task_id for i in range(4)]
            where = Filter(task_ids=(ids[2], ids[0]), types=("TaskStarted", "TaskCompleted"))
            found = [(e.type_name(), e.task_id) for _, e in orch.log.select(where)]
            positions = [p for p, _ in orch.log.select(where)]
        assert found == [
            ("TaskStarted", ids[0]),
            ("TaskCompleted", ids[0]),
            ("TaskStarted", ids[2]),
            ("TaskCompleted", ids[2]),
        ]
        assert positions == sorted(positions)

    if store_kind == "postgresql":
        with postgres_schema() as url:
            check_on(url)
    elif store_kind == "sqlite":
        check_on(f"sqlite:///{tmp_path / 'events.db'}")
    else:
        check_on("memory")


# --- property: a history is the chain of its ancestors -----------------------------------------


@settings(max_examples=25)
@given(
    parents=st.lists(st.integers(min_value=-1, max_value=30), min_size=1, max_size=8),
    words=st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta", ""]), min_size=8),
)
def test_property_a_history_is_its_ancestors_prompts_and_replies_in_order(
    parents: list[int], words: list[str]
) -> None:
    with serve_chat() as server, Orchestrator.open(config=lab(server.port), store="memory") as orch:
        tasks: list[tuple[str, int | None, str]] = []  # (task id, parent index, prompt)
        for i, pick in enumerate(parents):
            parent = pick % i if i and pick >= 0 else None
            text = f"{words[i]} {i}"
            continue_from = tasks[parent][0] if parent is not None else None
            rec = run(orch, "coder", text, continue_from=continue_from)
            assert rec.status == "completed", rec.error
            tasks.append((rec.task_id, parent, text))
        for i, messages in enumerate(sent(server)):
            expected: list[dict[str, Any]] = [user(tasks[i][2])]
            at = tasks[i][1]
            while at is not None:
                _, up, text = tasks[at]
                expected[:0] = [user(text), assistant(f"big says {text}")]
                at = up
            assert messages == [sys_msg(), *expected]


def test_sqlite_reads_a_history_through_the_task_id_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner must probe the task ids, not walk every event of the selected types."""
    from events.store import _SQLIndex

    path = tmp_path / "events.db"
    with Orchestrator.open(store=f"sqlite:///{path}") as orch:
        parent = None
        for text in ("one", "two", "three", "four"):
            parent = run(orch, "coder", text, continue_from=parent).task_id
        captured: list[tuple[str, list[Any]]] = []
        real = _SQLIndex._transaction

        @contextlib.contextmanager
        def spy(self: Any, commit: bool) -> Any:
            with real(self, commit) as cursor:
                execute = cursor.execute

                def recording(sql: str, params: list[Any]) -> Any:
                    captured.append((sql, params))
                    return execute(sql, params)

                cursor.execute = recording
                yield cursor

        monkeypatch.setattr(_SQLIndex, "_transaction", spy)
        run(orch, "coder", "five", continue_from=parent)
    (sql, params), *_ = [(s, p) for s, p in captured if " IN (" in s and "task_id IN" in s]
    with sqlite3.connect(path) as db:
        plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "USING INDEX event_index_task_id" in plan, plan
