"""The one model resolver and the precedence rule (docs/task-api.md, "Which model serves a
worker task").

Everything here is pure: the catalogue is built from the config and an environment mapping
passed in, so tests (and hypothesis) can call it with anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from events.catalogue import ModelPolicy, ModelSource
from events.projections import Override
from orchestrator.config import OrchestratorConfig, ProfileConfig, did_you_mean
from orchestrator.errors import OrchestratorError

TAGS = ("auto", "auto:fast", "auto:vision", "auto:docs")


class ResolutionError(OrchestratorError, ValueError):
    """A model or worker reference that cannot be resolved; the message suggests fixes."""


class CatalogueModel(BaseModel):
    """One model of the catalogue (the `models` view)."""

    model: str
    provider: str
    name: str
    source: str
    usable: bool
    vision: bool
    tool_call: bool
    context: int
    cost_input: float
    cost_output: float


class Resolution(BaseModel):
    """The resolver's answer: what a reference means now, and the rule that said so."""

    model_ref: str
    resolved_model: str
    reason: str
    capabilities: dict[str, Any]


class ModelDecision(BaseModel):
    """Which model serves a worker task, from which level of precedence."""

    model_ref: str
    resolved_model: str
    model_policy: ModelPolicy
    source: ModelSource
    reason: str


def build_catalogue(config: OrchestratorConfig, environ: Mapping[str, str]) -> list[CatalogueModel]:
    """Every model of every provider, with `usable` decided by source and key presence."""
    rows = []
    for provider_id, provider in config.providers.items():
        usable = provider.source != "api" or bool(
            provider.api_key_env and environ.get(provider.api_key_env)
        )
        for model_id, info in provider.models.items():
            rows.append(
                CatalogueModel(
                    model=f"{provider_id}/{model_id}",
                    provider=provider_id,
                    name=info.name or model_id,
                    source=provider.source,
                    usable=usable,
                    vision=info.vision,
                    tool_call=info.tool_call,
                    context=info.context,
                    cost_input=info.cost_input,
                    cost_output=info.cost_output,
                )
            )
    return rows


def normalise_ref(model_ref: str) -> str:
    """`node` and `node:*` are aliases of `auto` and `auto:*`."""
    ref = model_ref.strip()
    if ref == "node":
        return "auto"
    if ref.startswith("node:"):
        return "auto:" + ref[len("node:") :]
    return ref


def _capabilities(row: CatalogueModel) -> dict[str, Any]:
    return {"vision": row.vision, "tool_call": row.tool_call, "context": row.context}


def _score(row: CatalogueModel) -> tuple[int, int, float]:
    # Tool calling first, then context, then cheaper wins.
    return (int(row.tool_call), row.context, -(row.cost_input + row.cost_output))


def resolve(
    model_ref: str,
    config: OrchestratorConfig,
    catalogue: list[CatalogueModel],
) -> Resolution:
    """Resolve a tag or `provider/model` against the catalogue. Raises `ResolutionError`.

    Tags pick among usable models only, and never from the built-in echo provider once the
    configuration has a provider of its own (`OrchestratorConfig.providers_tags_skip`)."""
    ref = normalise_ref(model_ref)
    by_name = {row.model: row for row in catalogue}

    def found(row: CatalogueModel, reason: str) -> Resolution:
        return Resolution(
            model_ref=model_ref,
            resolved_model=row.model,
            reason=reason,
            capabilities=_capabilities(row),
        )

    if not ref.startswith("auto"):
        if ref in by_name:
            return found(by_name[ref], f"explicit model {ref}")
        raise ResolutionError(f'Model "{model_ref}" not found.' + did_you_mean(ref, by_name))

    pool = _TagPool(catalogue, config)
    if ref == "auto":
        return _configured_default(model_ref, config, by_name, pool, "tag auto")
    if ref == "auto:fast":
        small = by_name.get(config.tag_default("small_model") or "")
        if small is not None and pool.picks(small):
            return found(small, f"tag auto:fast -> small_model {small.model}")
        if pool.rows:
            cheapest = min(pool.rows, key=lambda r: (r.cost_input + r.cost_output, r.model))
            return found(
                cheapest,
                f"tag auto:fast -> cheapest usable model {cheapest.model}"
                + pool.passed_over("small_model", small),
            )
        return _configured_default(model_ref, config, by_name, pool, "tag auto:fast")
    if ref == "auto:vision":
        vision = [row for row in pool.rows if row.vision]
        if not vision:
            raise ResolutionError(
                f'No usable vision model for "{model_ref}"{pool.among()}: add a model with '
                "vision = true to a provider, or set the API key of a provider that has one"
                f"{pool.note()}."
            )
        best = max(vision, key=_score)
        return found(best, f"tag auto:vision -> best vision model by score {best.model}")
    if ref == "auto:docs":
        if not pool.rows:
            raise ResolutionError(f'No usable model for "{model_ref}"{pool.among()}{pool.note()}.')
        best = max(pool.rows, key=_score)
        return found(best, f"tag auto:docs -> best tool_call + context score {best.model}")
    raise ResolutionError(f'Unknown model tag "{model_ref}".' + did_you_mean(ref, TAGS))


class _TagPool:
    """The models tags may pick (usable, not from a skipped built-in provider), and the
    words that say why a built-in model was passed over."""

    def __init__(self, catalogue: list[CatalogueModel], config: OrchestratorConfig) -> None:
        self.skipped = config.providers_tags_skip()
        self.rows = [row for row in catalogue if self.picks(row)]
        usable = {row.provider for row in self.rows}
        # The configuration's own providers, each with the key it waits for, if any.
        self.own = [
            f'"{pid}"'
            + (f" needs {p.api_key_env}" if p.source == "api" and pid not in usable else "")
            for pid, p in config.providers.items()
            if pid not in self.skipped
        ]

    def picks(self, row: CatalogueModel) -> bool:
        """Whether a tag may resolve to `row`."""
        return row.usable and row.provider not in self.skipped

    def passed_over(self, key: str, row: CatalogueModel | None) -> str:
        """', since <key> X is a built-in echo model' when `row` was skipped for that."""
        if row is None or row.provider not in self.skipped:
            return ""
        return f", since {key} {row.model} is a built-in echo model"

    def among(self) -> str:
        """' in this configuration's providers (...)' when built-ins are skipped."""
        return f" in this configuration's providers ({', '.join(self.own)})" if self.skipped else ""

    def note(self) -> str:
        """' (the built-in echo provider ... is only used when named)' likewise."""
        if not self.skipped:
            return ""
        builtin = ", ".join(f'"{p}"' for p in sorted(self.skipped))
        return f" (the built-in echo provider {builtin} is only used when named explicitly)"


def _configured_default(
    model_ref: str,
    config: OrchestratorConfig,
    by_name: dict[str, CatalogueModel],
    pool: _TagPool,
    tag: str,
) -> Resolution:
    """`model`; when it is unset for tags or names a skipped built-in model, the best
    usable model of the configuration's own providers by the `auto:docs` score."""
    model = config.tag_default("model")
    row = by_name.get(model) if model else None
    if model and row is None:
        raise ResolutionError(
            f'Configured default model "{model}" not found.' + did_you_mean(model, by_name)
        )
    if row is None or row.provider in pool.skipped:
        if not pool.rows:
            raise ResolutionError(f'No usable model for "{model_ref}"{pool.among()}{pool.note()}.')
        best = max(pool.rows, key=_score)
        why = pool.passed_over("model", row) if row else ", since model is not set"
        return Resolution(
            model_ref=model_ref,
            resolved_model=best.model,
            reason=f"{tag} -> best usable model by auto:docs score {best.model}{why}",
            capabilities=_capabilities(best),
        )
    if not row.usable:
        raise ResolutionError(
            f'Configured default model "{model}" is not usable: its provider '
            f'"{row.provider}" needs an API key in the environment.'
        )
    return Resolution(
        model_ref=model_ref,
        resolved_model=row.model,
        reason=f"{tag} -> model {row.model}",
        capabilities=_capabilities(row),
    )


def check_worker(worker_id: str, config: OrchestratorConfig) -> ProfileConfig:
    """The profile of a worker id, or `ResolutionError` with the closest profile ids."""
    profile = config.profiles.get(worker_id)
    if profile is None:
        raise ResolutionError(
            f'Unknown worker "{worker_id}".' + did_you_mean(worker_id, config.profiles)
        )
    return profile


def decide_model(
    worker_id: str,
    task_model: str | None,
    override: Override | None,
    config: OrchestratorConfig,
    catalogue: list[CatalogueModel],
) -> ModelDecision:
    """Precedence: the task's own model, then the session override, then the profile."""
    profile = check_worker(worker_id, config)
    if task_model:
        res = resolve(task_model, config, catalogue)
        return ModelDecision(
            model_ref=task_model,
            resolved_model=res.resolved_model,
            model_policy="dynamic",
            source="task",
            reason=f"per-task model: {res.reason}",
        )
    if override is not None:
        if override.model_policy == "sticky":
            return ModelDecision(
                model_ref=override.model_ref,
                resolved_model=override.resolved_model,
                model_policy="sticky",
                source="session",
                reason=f"session override (sticky, pinned): {override.reason}",
            )
        res = resolve(override.model_ref, config, catalogue)
        return ModelDecision(
            model_ref=override.model_ref,
            resolved_model=res.resolved_model,
            model_policy="dynamic",
            source="session",
            reason=f"session override (dynamic, re-resolved): {res.reason}",
        )
    res = resolve(profile.model, config, catalogue)
    return ModelDecision(
        model_ref=profile.model,
        resolved_model=res.resolved_model,
        model_policy="dynamic",
        source="profile",
        reason=f"profile default: {res.reason}",
    )


def is_tag(model_ref: str) -> bool:
    """A tag (`auto`, `auto:*`, `node`, `node:*`) rather than an explicit `provider/model`."""
    return normalise_ref(model_ref).startswith("auto")


def attempt_chain(
    decision: ModelDecision,
    profile: ProfileConfig,
    config: OrchestratorConfig,
    catalogue: list[CatalogueModel],
    cooled: Mapping[str, datetime],
    now: datetime,
) -> tuple[list[str], list[str]]:
    """The models a worker task tries, in order: the decided one, then the profile's
    `fallback_models`. A model cooled down until after `now` is skipped, except the
    decided model when it was named explicitly. Returns (models, why some were skipped);
    no models means every one is cooling down."""
    chain: list[str] = []
    skipped: list[str] = []
    refs = [(decision.model_ref, decision.resolved_model, not is_tag(decision.model_ref))]
    for ref in profile.fallback_models:
        try:
            refs.append((ref, resolve(ref, config, catalogue).resolved_model, False))
        except ResolutionError as exc:
            skipped.append(f"fallback {ref}: {exc}")
    for ref, model, explicit in refs:
        if model in chain:
            continue
        until = cooled.get(model)
        if until is not None and until > now and not explicit:
            skipped.append(f"{model} (from {ref}) is cooling down until {until.isoformat()}")
            continue
        chain.append(model)
    return chain, skipped


class ConfigReport(BaseModel):
    """What `config check` says: each tag's model and rule, the problems that make the
    configuration unusable, and warnings that do not."""

    tags: list[str]
    problems: list[str]
    warnings: list[str]


def check_config(config: OrchestratorConfig, environ: Mapping[str, str]) -> ConfigReport:
    """Resolve every tag, the top-level `model`/`small_model` and every profile's model and
    fallbacks now. A user's profile that does not resolve is a problem; a built-in profile
    the file did not name is a warning (the file cannot remove it), and so is a provider
    whose `api_key_env` is not set. Lines are `key.path: what`."""
    catalogue = build_catalogue(config, environ)
    names = {row.model for row in catalogue}
    tags, problems, warnings = [], [], []
    for tag in TAGS:
        try:
            res = resolve(tag, config, catalogue)
            tags.append(f"{tag} -> {res.resolved_model} ({res.reason})")
        except ResolutionError as exc:
            tags.append(f"{tag} does not resolve: {exc}")
    for key in ("model", "small_model"):
        ref = config.tag_default(key)
        if ref and ref not in names:
            problems.append(
                f'{key}: model "{ref}" is not in any provider\'s models.{did_you_mean(ref, names)}'
            )
    for worker_id, profile in config.profiles.items():
        refs = [("model", profile.model)] + [
            (f"fallback_models[{i}]", ref) for i, ref in enumerate(profile.fallback_models)
        ]
        for key, ref in refs:
            try:
                resolve(ref, config, catalogue)
            except ResolutionError as exc:
                if worker_id in config.inherited.profiles:
                    warnings.append(
                        f"profiles.{worker_id}.{key}: built-in profile, its tasks will fail: {exc}"
                    )
                else:
                    problems.append(f"profiles.{worker_id}.{key}: {exc}")
    for provider_id, provider in config.providers.items():
        name = provider.api_key_env
        if name and not environ.get(name):
            effect = (
                "tags skip its models"
                if provider.source == "api"
                else "requests to its models fail"
            )
            warnings.append(
                f"providers.{provider_id}.api_key_env: {name} is not set in the "
                f"environment; {effect} until it is"
            )
    return ConfigReport(tags=tags, problems=problems, warnings=warnings)
