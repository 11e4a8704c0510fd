"""Conversations: the history of a worker task rebuilt from the log (ADR-0011).

No process holds a conversation. A task that continues another (`continue_from`) records the
ids of every earlier turn on its `TaskStarted` (`conversation`, the first turn first), so its
history is read back by task id through the event index: one read of the task it continues,
then one select over the ids of the turns before it. The cost is what the history holds,
however long the log. The messages are OpenAI chat messages (`role`, `content`,
`tool_calls`, `tool_call_id`), the same on both backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from events.catalogue import (
    TERMINAL_TASK_EVENTS,
    ConversationTrimmed,
    Event,
    TaskCompleted,
    TaskStarted,
)
from events.reads import TASK_RECORD_TYPES
from events.store import EventLog, Filter
from orchestrator.api import ConversationRow
from orchestrator.backends import TaskError
from orchestrator.explain import TurnModel

Message = dict[str, Any]
# Ids per select of a long history: under every driver's limit on parameters.
IDS_PER_SELECT = 500
TURN_TYPES = ("TaskStarted", "TaskCompleted")
# Characters per token of the estimate (the usual rule of thumb for English and code), and
# what each message's framing costs.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


class ConversationError(TaskError):
    """The task cannot continue that conversation; the message says why and what to do."""


@dataclass
class Turn:
    """One earlier worker task of a conversation: the messages it added, and its model."""

    task_id: str
    model: str | None
    messages: list[Message] = field(default_factory=list)

    @property
    def starts_with_tool(self) -> bool:
        """Does it begin with tool results (so it cannot be kept without the turn before)?"""
        return bool(self.messages) and self.messages[0]["role"] == "tool"


@dataclass
class Parent:
    """The task a new one continues, as its own events say."""

    task_id: str
    turn: Turn
    ancestors: list[str]  # the turns before it, the first turn first
    tool_calls: list[dict[str, Any]]

    @property
    def chain(self) -> list[str]:
        """The ids of every earlier turn of the new task, the parent last."""
        return [*self.ancestors, self.task_id]


def new_messages(args: dict[str, Any]) -> list[Message]:
    """What a turn adds before its reply (from its recorded `task_start` arguments): its tool
    results as `tool` messages, in the order given, then its user message. A turn of tool
    results alone whose text is empty adds no user message."""
    results = list(args.get("tool_results") or [])
    messages: list[Message] = [
        {"role": "tool", "tool_call_id": r["tool_call_id"], "content": r["content"]}
        for r in results
    ]
    text = args.get("task") or ""
    if text or not results:
        messages.append({"role": "user", "content": text})
    return messages


def reply_message(completed: TaskCompleted) -> Message:
    """The assistant message of a turn's reply (content null when it is only tool calls)."""
    if completed.tool_calls:
        return {
            "role": "assistant",
            "content": completed.response or None,
            "tool_calls": completed.tool_calls,
        }
    return {"role": "assistant", "content": completed.response or ""}


def call_ids(tool_calls: Sequence[dict[str, Any]] | None) -> list[str]:
    """The ids of a reply's tool calls, in order."""
    return [str(call.get("id")) for call in tool_calls or ()]


def read_parent(log: EventLog, task_id: str) -> Parent:
    """The task a new one continues, from its own events (one indexed read); raises
    `ConversationError` unless it is a worker task that completed."""
    started, end, _ = _own_events(log, task_id)
    if started is None:
        raise ConversationError(f'continue_from: no task "{task_id}" in this store.')
    if started.kind != "worker":
        raise ConversationError(
            f'continue_from: task "{task_id}" is an op, not a worker task: only a worker '
            "task has a conversation."
        )
    if not isinstance(end, TaskCompleted):
        status = {"TaskFailed": "failed", "TaskCancelled": "was cancelled"}.get(
            end.type_name() if end else "", "is still running"
        )
        what = "await it first" if end is None else "continue from a task that completed"
        raise ConversationError(
            f'continue_from: task "{task_id}" {status}, so it has no reply to continue '
            f"from; {what}."
        )
    turn = Turn(task_id, end.model, [*new_messages(started.args), reply_message(end)])
    return Parent(task_id, turn, list(started.conversation), list(end.tool_calls or []))


def _own_events(
    log: EventLog, task_id: str
) -> tuple[TaskStarted | None, Event | None, ConversationTrimmed | None]:
    """A task's start, its end (the first terminal event) and its last `ConversationTrimmed`
    before that end, in one indexed read of its own events."""
    started: TaskStarted | None = None
    end: Event | None = None
    trimmed: ConversationTrimmed | None = None
    where = Filter(task_id=task_id, types=(*TASK_RECORD_TYPES, "ConversationTrimmed"))
    for _, event in log.select(where):
        if isinstance(event, TaskStarted):
            started = event
        elif isinstance(event, ConversationTrimmed):
            if end is None:
                trimmed = event
        elif end is None and event.type_name() in TERMINAL_TASK_EVENTS:
            end = event
    return started, end, trimmed


def check_tool_results(parent: Parent, results: Sequence[dict[str, Any]]) -> None:
    """Every tool call of the parent's reply answered exactly once, by known ids; else
    `ConversationError` naming the ids expected."""
    expected = call_ids(parent.tool_calls)
    given = [str(r["tool_call_id"]) for r in results]
    if not expected and not given:
        return
    if not expected:
        raise ConversationError(
            f'tool_results: task "{parent.task_id}" asked for no tool calls, so there is '
            "nothing to answer; continue it with a task text instead."
        )
    problems = []
    unknown = [i for i in given if i not in expected]
    repeated = sorted({i for i in given if given.count(i) > 1})
    missing = [i for i in expected if i not in given]
    if unknown:
        problems.append(f"unknown {', '.join(unknown)}")
    if repeated:
        problems.append(f"answered more than once {', '.join(repeated)}")
    if missing:
        problems.append(f"not answered {', '.join(missing)}")
    if problems:
        raise ConversationError(
            f'tool_results: task "{parent.task_id}" asked for the tool calls '
            f"{', '.join(expected)}: give one result for each ({'; '.join(problems)})."
        )


def history(log: EventLog, parent: Parent) -> list[Turn]:
    """Every earlier turn of the task continuing `parent`, the first first: the parent's
    from its own read, the others in one select over their task ids."""
    return [*read_turns(log, parent.ancestors), parent.turn]


def read_turns(log: EventLog, ids: Sequence[str]) -> list[Turn]:
    """The turns (completed worker tasks) of `ids`, in that order, in one select over their
    task ids (a page of ids per select when there are very many)."""
    started: dict[str, TaskStarted] = {}
    completed: dict[str, TaskCompleted] = {}
    for i in range(0, len(ids), IDS_PER_SELECT):
        chunk = tuple(ids[i : i + IDS_PER_SELECT])
        for _, event in log.select(Filter(task_ids=chunk, types=TURN_TYPES)):
            if isinstance(event, TaskStarted):
                started[str(event.task_id)] = event
            elif isinstance(event, TaskCompleted):
                completed.setdefault(str(event.task_id), event)
    turns = []
    for task_id in ids:
        begun, reply = started.get(task_id), completed.get(task_id)
        if begun is None or reply is None:  # it completed once (its child checked): not lost
            raise ConversationError(
                f'continue_from: turn "{task_id}" of this conversation is missing from the store.'
            )
        messages = [*new_messages(begun.args), reply_message(reply)]
        turns.append(Turn(task_id, reply.model, messages))
    return turns


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A cheap estimate of the tokens of `messages` (characters / 4, plus framing)."""
    chars = 0
    for m in messages:
        chars += len(m.get("content") or "")
        if m.get("tool_calls"):
            chars += len(orjson.dumps(m["tool_calls"]))
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)


@dataclass
class Fitted:
    """The history a request carries once fitted to a model's context."""

    messages: list[Message]
    dropped: int
    kept: int
    estimated: int


def fit(
    system_prompt: str,
    turns: Sequence[Turn],
    new: Sequence[Message],
    context: int,
    extra_tokens: int = 0,
) -> Fitted:
    """The messages after the system prompt for a model of `context` tokens: the oldest
    turns are dropped while the estimate is over, but only where the kept part does not
    begin with tool results (an assistant message keeps its tool results)."""
    fixed = extra_tokens + estimate_tokens(new)
    if system_prompt:
        fixed += estimate_tokens([{"content": system_prompt}])
    sizes = [estimate_tokens(t.messages) for t in turns]
    new_starts_with_tool = bool(new) and new[0]["role"] == "tool"
    size, drop = fixed + sum(sizes), 0
    for k in range(len(turns) + 1):
        if k:
            size -= sizes[k - 1]
        # Cutting before turn k keeps turns[k:]: not if they (or the new turn) begin with
        # tool results, whose assistant message would be gone.
        first_is_tool = turns[k].starts_with_tool if k < len(turns) else new_starts_with_tool
        if k and first_is_tool:
            continue
        drop = k
        if size <= context:
            break
    kept = turns[drop:]
    estimated = fixed + sum(sizes[drop:])
    messages = [m for t in kept for m in t.messages] + list(new)
    return Fitted(messages, drop, len(kept), estimated)


def trimmed_event(
    ids: dict[str, Any], model: str, context: int, fitted: Fitted
) -> ConversationTrimmed:
    """The event that says a request to `model` left turns out."""
    return ConversationTrimmed(
        **ids,
        model=model,
        context=context,
        estimated_tokens=fitted.estimated,
        dropped_turns=fitted.dropped,
        kept_turns=fitted.kept,
    )


@dataclass
class Recorded:
    """What the log says of one worker task's conversation: its own events and turns."""

    started: TaskStarted
    end: Event | None
    trimmed: ConversationTrimmed | None
    turns: list[Turn]  # every earlier turn, the first first (trimmed ones included)


def read_recorded(log: EventLog, task_id: str) -> Recorded | None:
    """A worker task's conversation as recorded: one read of its own events, one select
    over its earlier turns. None for a task that was never started."""
    started, end, trimmed = _own_events(log, task_id)
    if started is None:
        return None
    turns = read_turns(log, started.conversation) if started.conversation else []
    if trimmed is not None and isinstance(end, TaskCompleted) and trimmed.model != end.model:
        trimmed = None  # trimmed for a model that failed; the one that served took it all
    return Recorded(started, end, trimmed, turns)


def rows_of(recorded: Recorded, system_prompt: str) -> list[ConversationRow]:
    """The `conversation` view of a task: the messages its request carried (the system
    prompt, the turns kept, its own tool results and message), then its reply."""
    task_id = str(recorded.started.task_id)
    end = recorded.end
    model = end.model if isinstance(end, TaskCompleted) else None
    rows: list[ConversationRow] = []
    if system_prompt:
        rows.append(_row(task_id, model, {"role": "system", "content": system_prompt}))
    dropped = recorded.trimmed.dropped_turns if recorded.trimmed else 0
    for turn in recorded.turns[dropped:]:
        rows += [_row(turn.task_id, turn.model, m) for m in turn.messages]
    rows += [_row(task_id, model, m) for m in new_messages(recorded.started.args)]
    if isinstance(end, TaskCompleted):
        rows.append(_row(task_id, model, reply_message(end)))
    return rows


def _row(task_id: str, model: str | None, message: Message) -> ConversationRow:
    return ConversationRow(
        task_id=task_id,
        role=message["role"],
        content=message.get("content"),
        tool_calls=message.get("tool_calls"),
        tool_call_id=message.get("tool_call_id"),
        model=model,
    )


def conversation_models(log: EventLog, ids: Sequence[str]) -> list[TurnModel]:
    """The model that served each of the turns `ids` (one select over their replies)."""
    served: dict[str, str | None] = {}
    for i in range(0, len(ids), IDS_PER_SELECT):
        where = Filter(task_ids=tuple(ids[i : i + IDS_PER_SELECT]), types=("TaskCompleted",))
        for _, event in log.select(where):
            assert isinstance(event, TaskCompleted)
            served.setdefault(str(event.task_id), event.model)
    return [TurnModel(task_id=t, model=served.get(t)) for t in ids]
