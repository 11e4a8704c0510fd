"""Questions about the log across time: the configuration decisions were made under,
`replay --check` (do recorded decisions still reproduce?), `whatif` (what would another
configuration have chosen?) and `diff` (what changed between two positions?).

Everything here re-runs the pure deciders (`resolver.decide_model`) and folds
(`events.projections.apply`) on recorded history; nothing here writes to the log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import BaseModel, ValidationError

from events.catalogue import ConfigRecorded, Event, ModelResolved, TaskCompleted, TaskStarted
from events.projections import LogState, Override, apply
from events.reads import recorded_configs
from events.store import EventLog
from orchestrator.config import OrchestratorConfig
from orchestrator.resolver import (
    CatalogueModel,
    ModelDecision,
    ResolutionError,
    build_catalogue,
    decide_model,
)

# --- the configuration in the log ------------------------------------------------------------


def recorded_config(
    config: OrchestratorConfig, catalogue: Iterable[CatalogueModel]
) -> tuple[str, dict[str, Any]]:
    """(digest, `ConfigRecorded` payload) of a configuration as decisions see it: its
    settings (credentials in URLs removed; keys are only ever named by `api_key_env`) and
    which providers were usable, since a tag resolves among usable models only."""
    dumped = config.model_dump(mode="json")
    for provider in dumped.get("providers", {}).values():
        if provider.get("base_url"):
            provider["base_url"] = _without_userinfo(provider["base_url"])
    usable = sorted({row.provider for row in catalogue if row.usable})
    payload = {"config": dumped, "usable_providers": usable}
    digest = hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"sha256:{digest[:16]}", payload


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def config_of(record: ConfigRecorded) -> tuple[OrchestratorConfig, list[CatalogueModel]]:
    """The configuration and catalogue a `ConfigRecorded` describes."""
    config = OrchestratorConfig.model_validate(record.config)
    usable = set(record.usable_providers)
    # Usability is all the resolver reads of the environment: stand in for the keys.
    environ = {
        p.api_key_env: "recorded"
        for pid, p in config.providers.items()
        if pid in usable and p.api_key_env
    }
    return config, build_catalogue(config, environ)


# --- replay --check and whatif ---------------------------------------------------------------


class Decided(BaseModel):
    """One recorded model decision (`ModelResolved`) with what went into it."""

    position: int
    task_id: str
    session_id: str
    worker_id: str
    config_digest: str | None
    recorded: ModelDecision
    served_model: str | None
    task_model: str | None
    turn: int = 1  # its place in a conversation (1: a first turn, or no conversation)
    continue_from: str | None = None


class DecisionTracker:
    """What a recorded decision needs from the events around it, gathered per task: the
    model its `TaskStarted` asked for, its place in a conversation, and the model its
    `TaskCompleted` reports. Fed a task's events in log order (others' may be interleaved
    or left out: nothing here crosses tasks), it makes the same `Decided` however much of
    the log around them it is fed."""

    def __init__(self, session_id: str | None = None) -> None:
        self.session_id = session_id
        self._task_models: dict[str, str | None] = {}
        self._turns: dict[str, tuple[int, str | None]] = {}
        self._pending: dict[str, Decided] = {}

    def feed(self, position: int, event: Event) -> Decided | None:
        """Note one event; the decision it records, if it is a `ModelResolved` (of the
        session asked about). A decision's `served_model` is filled in by its task's later
        `TaskCompleted`."""
        if isinstance(event, TaskStarted) and event.kind == "worker":
            self._task_models[str(event.task_id)] = event.args.get("model")
            if event.conversation:
                self._turns[str(event.task_id)] = (
                    len(event.conversation) + 1,
                    event.conversation[-1],
                )
        elif isinstance(event, ModelResolved) and self.session_id in (None, event.session_id):
            task_id = str(event.task_id)
            turn, continue_from = self._turns.pop(task_id, (1, None))
            decided = Decided(
                position=position,
                task_id=task_id,
                session_id=event.session_id,
                worker_id=str(event.worker_id),
                config_digest=event.config_digest,
                recorded=ModelDecision.model_validate(event, from_attributes=True),
                served_model=None,
                task_model=self._task_models.pop(task_id, None),
                turn=turn,
                continue_from=continue_from,
            )
            self._pending[task_id] = decided
            return decided
        elif isinstance(event, TaskCompleted) and event.task_id in self._pending:
            self._pending.pop(str(event.task_id)).served_model = event.model
        return None


# The events a `DecisionTracker` reads.
DECISION_TYPES = ("TaskStarted", "ModelResolved", "TaskCompleted")


def recorded_decisions(
    log: EventLog, session_id: str | None = None
) -> Iterable[tuple[Decided, LogState]]:
    """Every recorded `ModelResolved` in log order, with the state just before it (the
    session overrides it was decided on). The state is the live fold, so do not keep it."""
    state = LogState()
    tracker = DecisionTracker(session_id)
    for position, event in log.read_log():
        decided = tracker.feed(position, event)
        if decided is not None:
            yield decided, state
        apply(state, position, event)


def redecide(
    d: Decided, state: LogState, config: OrchestratorConfig, catalogue: list[CatalogueModel]
) -> ModelDecision:
    """Run the resolver and precedence again for a recorded decision (may raise
    `ResolutionError`)."""
    session = state.sessions.get(d.session_id)
    override = session.overrides.get(d.worker_id) if session else None
    return decide_model(d.worker_id, d.task_model, override, config, catalogue)


class CheckedDecision(BaseModel):
    """A recorded decision that came out differently when re-run (`replay --check`)."""

    position: int
    task_id: str
    session_id: str
    worker_id: str
    config_digest: str | None
    recorded_model: str
    recorded_source: str
    now_model: str | None
    now_source: str | None
    detail: str


class CheckReport(BaseModel):
    """What `replay --check` found: how many decisions reproduced, and those that did not."""

    checked: int
    reproduced: int
    unchecked: int
    differences: list[CheckedDecision]

    @property
    def ok(self) -> bool:
        """Did every checked decision come out the same?"""
        return not self.differences


def check(log: EventLog) -> CheckReport:
    """Re-run every recorded model decision on the configuration recorded for it."""
    configs = {}
    for digest, record in recorded_configs(log).items():
        try:
            configs[digest] = config_of(record)
        except ValidationError:
            continue  # recorded by a version with other settings: its decisions go unchecked
    checked = reproduced = unchecked = 0
    differences = []
    for d, state in recorded_decisions(log):
        if d.config_digest is None or d.config_digest not in configs:
            unchecked += 1  # decided before configurations were recorded, or unreadable now
            continue
        checked += 1
        config, catalogue = configs[d.config_digest]
        try:
            now: ModelDecision | None = redecide(d, state, config, catalogue)
            detail = ""
        except ResolutionError as exc:
            now, detail = None, f"now fails: {exc}"
        same = now is not None and (now.resolved_model, now.source, now.model_policy) == (
            d.recorded.resolved_model,
            d.recorded.source,
            d.recorded.model_policy,
        )
        if same:
            reproduced += 1
            continue
        if now is not None:
            detail = (
                f"recorded {d.recorded.resolved_model} ({d.recorded.source}, "
                f"{d.recorded.model_policy}); now {now.resolved_model} ({now.source}, "
                f"{now.model_policy}): {now.reason}"
            )
        differences.append(
            CheckedDecision(
                position=d.position,
                task_id=d.task_id,
                session_id=d.session_id,
                worker_id=d.worker_id,
                config_digest=d.config_digest,
                recorded_model=d.recorded.resolved_model,
                recorded_source=d.recorded.source,
                now_model=now.resolved_model if now else None,
                now_source=now.source if now else None,
                detail=detail,
            )
        )
    return CheckReport(
        checked=checked, reproduced=reproduced, unchecked=unchecked, differences=differences
    )


class WhatIfRow(BaseModel):
    """One recorded worker task and the model another configuration would have chosen."""

    task_id: str
    session_id: str
    worker_id: str
    served_model: str | None
    recorded_model: str
    whatif_model: str | None
    changed: bool
    reason: str
    # The task's turn in its conversation (1 when it continues none) and the task it
    # continues: a changed row of turn > 1 is a turn that would go, history and all, to
    # another model.
    turn: int = 1
    continue_from: str | None = None


class Redecider:
    """What `config` decides for recorded decisions (`decide_model` with the task's model
    and the override in force), each distinct input resolved once: the other model and the
    resolver's reason, or None and "would fail: ..." when it cannot resolve."""

    def __init__(self, config: OrchestratorConfig, catalogue: list[CatalogueModel]) -> None:
        self.config, self.catalogue = config, catalogue
        self._found: dict[tuple[str, str | None, str | None], tuple[str | None, str]] = {}

    def __call__(self, d: Decided, override: Override | None) -> tuple[str | None, str]:
        key = (d.worker_id, d.task_model, override.model_dump_json() if override else None)
        found = self._found.get(key)
        if found is None:
            try:
                now = decide_model(d.worker_id, d.task_model, override, self.config, self.catalogue)
                found = (now.resolved_model, now.reason)
            except ResolutionError as exc:
                found = (None, f"would fail: {exc}")
            self._found[key] = found
        return found


def whatif(
    log: EventLog,
    config: OrchestratorConfig,
    environ: Mapping[str, str],
    session_id: str | None = None,
) -> list[WhatIfRow]:
    """For every recorded worker task (of one session, or all), the model `config` would
    have chosen with the same task model and session overrides. `changed` compares with
    the model recorded as chosen (`served_model` may differ after a fallback)."""
    redecide_one = Redecider(config, build_catalogue(config, environ))
    found: list[tuple[Decided, str | None, str]] = []
    for d, state in recorded_decisions(log, session_id):
        session = state.sessions.get(d.session_id)
        override = session.overrides.get(d.worker_id) if session else None
        found.append((d, *redecide_one(d, override)))
    # Built at the end: a task's served model is learnt further down the log.
    return [whatif_row(d, model, reason) for d, model, reason in found]


def whatif_row(d: Decided, model: str | None, reason: str) -> WhatIfRow:
    """The `whatif` row of a decision and what the other configuration chose (None: it
    would fail, and `reason` says why)."""
    return WhatIfRow(
        task_id=d.task_id,
        session_id=d.session_id,
        worker_id=d.worker_id,
        served_model=d.served_model,
        recorded_model=d.recorded.resolved_model,
        whatif_model=model,
        changed=model != d.recorded.resolved_model,
        reason=reason,
        turn=d.turn,
        continue_from=d.continue_from,
    )


# --- diff ------------------------------------------------------------------------------------

Scope = Literal["override", "registry", "task"]


class DiffRow(BaseModel):
    """One thing that changed between two log positions."""

    scope: Scope
    key: str
    change: Literal["added", "changed", "removed"]
    before: dict[str, Any] | None
    after: dict[str, Any] | None


Flat = dict[tuple[str, str], dict[str, Any]]


def flatten(state: LogState) -> Flat:
    """A state's overrides, registry processes and tasks, keyed by (scope, key)."""
    flat: Flat = {}
    for sid, session in state.sessions.items():
        for worker_id, override in session.overrides.items():
            flat[("override", f"{sid}/{worker_id}")] = override.model_dump(mode="json")
    rows = [*state.registry.entries.items(), *state.registry.servers.items()]
    for iid, entry in [*rows, *state.retired.items()]:
        flat[("registry", iid)] = entry.model_dump(mode="json")
    for task_id, task in state.tasks.items():
        flat[("task", task_id)] = task.model_dump(mode="json")
    return flat


def diff_states(before: Flat, after: Flat) -> list[DiffRow]:
    """The rows that turn `before` into `after`."""
    rows = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        change: Literal["added", "changed", "removed"] = (
            "added" if old is None else "removed" if new is None else "changed"
        )
        scope: Scope = key[0]  # type: ignore[assignment]
        rows.append(DiffRow(scope=scope, key=key[1], change=change, before=old, after=new))
    return rows


def apply_diff(flat: Flat, rows: Iterable[DiffRow]) -> Flat:
    """`flat` with the rows applied (diff(p, q) applied to the state at p is the state at q)."""
    out = dict(flat)
    for row in rows:
        if row.after is None:
            out.pop((row.scope, row.key), None)
        else:
            out[(row.scope, row.key)] = row.after
    return out


def diff(log: EventLog, since: int, until: int | None = None) -> list[DiffRow]:
    """What changed from the state at `since` to the state at `until` (default: now), in
    one pass over the log up to `until`."""
    state = LogState()
    before: Flat | None = None
    for position, event in log.read_log(until=until):
        if before is None and position > since:
            before = flatten(state)
        apply(state, position, event)
    return diff_states(flatten(state) if before is None else before, flatten(state))
