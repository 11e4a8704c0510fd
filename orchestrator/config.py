"""Configuration: providers, their models, and worker profiles (docs/configuration.md).

It stays one module over 400 lines because the models, the file laid over the built-in
default, and the messages that name the file and key are one schema, read together.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import OrchestratorError

ProviderKind = Literal["openai", "echo"]
ProviderSource = Literal["config", "env", "custom", "api"]
BackendKind = Literal["server", "agent"]


class ModelInfo(BaseModel):
    """One model a provider offers, with the capabilities the resolver scores.

    A managed provider's model may carry keys of its own (scalars) for its server's
    `command` placeholders; any other provider's unknown key is an error (`server_problems`).
    """

    model_config = ConfigDict(extra="allow")

    name: str = ""
    vision: bool = False
    tool_call: bool = False
    context: int = 8192
    cost_input: float = 0.0
    cost_output: float = 0.0
    # For a managed provider: `{path}` of its server's command, and what it holds in memory
    # (counted against `[pool] memory_mb`).
    path: str | None = None
    memory_mb: int = Field(default=0, ge=0, le=16 * 1024 * 1024)


class ServerConfig(BaseModel):
    """`[providers.X.server]`: the provider's models are served by processes the
    orchestrator starts itself, one per model (a managed provider, docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    ready_path: str = "/v1/models"
    start_timeout: float = Field(default=300.0, gt=0, le=24 * 3600)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("ready_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f'must start with "/", got "{value}"')
        return value


class ProviderConfig(BaseModel):
    """A provider: how to reach it and which models it has."""

    model_config = ConfigDict(extra="forbid")

    kind: ProviderKind = "openai"
    source: ProviderSource = "config"
    base_url: str | None = None
    api_key_env: str | None = None
    timeout: float = Field(default=120.0, gt=0, le=3600)
    max_retries: int = Field(default=2, ge=0, le=10)
    models: dict[str, ModelInfo] = Field(default_factory=dict)
    server: ServerConfig | None = None

    def identity(self) -> dict[str, Any]:
        """Where and how a request to this provider goes (never a key): part of every
        worker fingerprint, so a process never calls an endpoint its config no longer names.
        A managed provider's `base_url` is its model server's, sent with each request."""
        return {
            "kind": self.kind,
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
        }


class ProfileConfig(BaseModel):
    """A named worker: its model reference, backend and prompt settings."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    model: str = "auto"
    backend: BackendKind = "server"
    purpose: str = ""
    when_to_use: str = ""
    system_prompt: str = ""
    fallback_models: list[str] = Field(default_factory=list)


class PoolConfig(BaseModel):
    """Limits of the worker pool (`[pool]` in docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid")

    idle_timeout: float = Field(default=900.0, gt=0, le=7 * 24 * 3600)
    max_processes: int = Field(default=8, ge=1, le=256)
    max_concurrency: int = Field(default=8, ge=1, le=256)
    # A model failing retryably `cooldown_after` times within `cooldown_window` seconds is
    # skipped by tags and fallbacks for `cooldown_for` seconds (defaults 3, 60, 60).
    cooldown_after: int = Field(default=3, ge=1, le=100)
    cooldown_window: float = Field(default=60.0, gt=0, le=3600)
    cooldown_for: float = Field(default=60.0, gt=0, le=3600)
    # Managed model servers (ADR-0012): how many may run on the host at once, and the sum of
    # their models' `memory_mb` (None: unlimited). A start evicts the least recently used
    # idle server first.
    max_model_servers: int = Field(default=2, ge=1, le=256)
    memory_mb: int | None = Field(default=None, ge=1)


class LimitsConfig(BaseModel):
    """What one task may carry (`[limits]`, ADR-0006); within these bounds."""

    model_config = ConfigDict(extra="forbid")

    max_text: int = Field(default=200_000, ge=1_000, le=1_000_000)
    max_reply: int = Field(default=1_000_000, ge=1_000, le=4_000_000)


# Ids become file names and registry keys: a small safe set, so no id escapes a directory.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
ID_RULE = "1-64 characters: letters, digits, '_', '.', '-', starting with a letter or digit"


def check_id(value: str) -> str:
    """Raise `ValueError` with the rule when `value` is not a safe id."""
    if not _ID_RE.match(value):
        raise ValueError(f"{value!r} is not a valid id ({ID_RULE})")
    return value


class Inherited(BaseModel):
    """What a file or dict took unchanged from the built-in default: providers, profiles
    and the top-level `model`/`small_model` keys it did not set.

    `load_config` fills it in from what a file or dict names (a dumped configuration passed
    back keeps its own). A configuration built in code leaves it empty, which means
    everything in it counts as the user's own."""

    model_config = ConfigDict(extra="forbid")

    providers: list[str] = Field(default_factory=list)
    profiles: list[str] = Field(default_factory=list)
    keys: list[str] = Field(default_factory=list)


class OrchestratorConfig(BaseModel):
    """The whole configuration."""

    model_config = ConfigDict(extra="forbid")

    model: str
    small_model: str | None = None
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    # Recorded with the rest (ConfigRecorded), so a replay decides tags as the live run did.
    inherited: Inherited = Field(default_factory=Inherited)

    @field_validator("providers", "profiles")
    @classmethod
    def _safe_ids(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            check_id(key)
        return value

    def own_providers(self) -> list[str]:
        """The providers the user's configuration defined (a user's `local` included)."""
        return [p for p in self.providers if p not in self.inherited.providers]

    def providers_tags_skip(self) -> set[str]:
        """The built-in providers tags never pick from: all of them once the user's
        configuration defines a provider of its own, else none (so the offline default
        and a file that only adds profiles keep the echo models)."""
        if not self.own_providers():
            return set()
        return set(self.inherited.providers) & set(self.providers)

    def tag_default(self, key: Literal["model", "small_model"]) -> str | None:
        """`model` or `small_model` as tags read it: unset (None) when the user's
        configuration has providers of its own and left the key at the built-in default,
        which names an echo model."""
        if key in self.inherited.keys and self.own_providers():
            return None
        value: str | None = getattr(self, key)
        return value


def default_config() -> OrchestratorConfig:
    """The built-in offline configuration: echo models and the five standard profiles."""
    return OrchestratorConfig(
        model="local/echo-large",
        small_model="local/echo-small",
        providers={
            "local": ProviderConfig(
                kind="echo",
                source="config",
                models={
                    "echo-large": ModelInfo(
                        name="Echo large",
                        tool_call=True,
                        context=200_000,
                        cost_input=3.0,
                        cost_output=15.0,
                    ),
                    "echo-small": ModelInfo(
                        name="Echo small",
                        tool_call=True,
                        context=32_000,
                        cost_input=0.1,
                        cost_output=0.4,
                    ),
                    "echo-vision": ModelInfo(
                        name="Echo vision",
                        vision=True,
                        context=64_000,
                        cost_input=1.0,
                        cost_output=4.0,
                    ),
                },
            )
        },
        profiles={
            "coder": ProfileConfig(
                name="Coder",
                model="auto",
                purpose="Writes and changes code",
                system_prompt="You write careful, tested code.",
            ),
            "docs": ProfileConfig(
                name="Docs",
                model="auto:docs",
                purpose="Writes and checks documentation",
                system_prompt="You write clear documentation.",
            ),
            "explorer": ProfileConfig(
                name="Explorer",
                model="auto:fast",
                purpose="Reads and searches quickly",
                system_prompt="You find things fast.",
            ),
            "vision": ProfileConfig(
                name="Vision",
                model="auto:vision",
                purpose="Looks at images",
                system_prompt="You describe images.",
            ),
            "architect": ProfileConfig(
                name="Architect",
                model="auto",
                purpose="Plans systems",
                system_prompt="You design systems.",
            ),
        },
    )


def discover_config_path() -> Path | None:
    """`orchestrator.toml` in the working directory, then in the user's config dir."""
    here = Path.cwd() / "orchestrator.toml"
    if here.is_file():
        return here
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    user = Path(base) / "orchestrator" / "orchestrator.toml"
    return user if user.is_file() else None


class ConfigError(OrchestratorError, ValueError):
    """A configuration that cannot be used: one line per problem, each naming the file (or
    `config`), the key path and what is wrong."""


def load_config(
    config: OrchestratorConfig | dict[str, Any] | str | Path | None,
) -> OrchestratorConfig:
    """Accept a config object, a dict, a TOML path, or None (discover, else the default).

    A file or dict **extends** the built-in default: the providers and profiles it names are
    added or replace the built-in entry of that name, the top-level keys it sets replace the
    default's; `extends = "none"` starts from nothing. Raises `ConfigError`.
    """
    if isinstance(config, OrchestratorConfig):
        return config
    if isinstance(config, dict):
        return layered(config, "config")
    path = Path(config) if config is not None else discover_config_path()
    if path is None:
        return default_config()
    return layered(read_toml(path), display_path(path))


def display_path(path: Path) -> str:
    """How messages name a configuration file: relative to the working directory if
    inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict, or `ConfigError` naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{display_path(path)}: TOML syntax error: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{display_path(path)}: cannot read: {exc.strerror or exc}") from None


def layered(raw: dict[str, Any], source: str) -> OrchestratorConfig:
    """Validate `raw` on top of the built-in default (unless `extends = "none"`)."""
    raw = dict(raw)
    extends = raw.pop("extends", "default")
    if extends not in ("default", "none"):
        raise ConfigError(f'{source}: extends: must be "default" or "none", got {extends!r}')
    merged: dict[str, Any] = {}
    if extends == "default":
        base = default_config()
        merged = base.model_dump()
        merged["inherited"] = {
            **{
                key: [name for name in getattr(base, key) if name not in _named(raw, key)]
                for key in ("providers", "profiles")
            },
            "keys": [key for key in ("model", "small_model") if key not in raw],
        }
    for key, value in raw.items():  # a dumped config's own `inherited` replaces the above
        if key in ("providers", "profiles") and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    try:
        cfg = OrchestratorConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError("\n".join(_problems(exc, source))) from None
    problems = server_problems(cfg)
    if problems:
        raise ConfigError("\n".join(f"{source}: {line}" for line in problems))
    return cfg


# Placeholders every managed model has besides the keys of its model table.
SERVER_PLACEHOLDERS = ("port", "model", "provider")


def placeholders(text: str) -> list[str]:
    """The `{name}` placeholders of one command word (`{{` is a literal brace); raises
    `ValueError` for a malformed or formatted one."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(text):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f'"{{{name}{"!" + conversion if conversion else ""}}}" in "{text}"')
        names.append(name)
    return names


def model_values(provider_id: str, model_id: str, info: ModelInfo) -> dict[str, str]:
    """What each placeholder of a managed model's command stands for, but `{port}`."""
    values = {"model": model_id, "provider": provider_id}
    for key, value in info.model_dump().items():
        if value is not None:
            values[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return values


def server_problems(cfg: OrchestratorConfig) -> list[str]:
    """Problems of managed providers (and model keys), `key.path: what`, one per line:
    checked at load so a bad command is a configuration error, not a failed task."""
    problems: list[str] = []
    for pid, provider in cfg.providers.items():
        extras = {
            (mid, key): value
            for mid, info in provider.models.items()
            for key, value in (info.model_extra or {}).items()
        }
        server = provider.server
        if server is None:
            for mid, key in extras:
                problems.append(
                    f"providers.{pid}.models.{mid}.{key}: unknown key"
                    + did_you_mean(key, ModelInfo.model_fields, lead="; did you mean", limit=1)
                )
            continue
        where = f"providers.{pid}"
        if provider.kind != "openai":
            problems.append(f'{where}.server: only a provider of kind "openai" can be managed')
        if provider.base_url:
            problems.append(
                f"{where}.base_url: a managed provider's base_url is its model server's; remove it"
            )
        words = [(f"server.command[{i}]", w) for i, w in enumerate(server.command)]
        words += [(f"server.env.{k}", v) for k, v in server.env.items()]
        used: dict[str, str] = {}
        for key, word in words:
            try:
                for name in placeholders(word):
                    used.setdefault(name, key)
            except ValueError as exc:
                problems.append(f"{where}.{key}: bad placeholder {exc}")
        known = {*SERVER_PLACEHOLDERS, *ModelInfo.model_fields, *(k for _, k in extras)}
        unknown = {name: key for name, key in used.items() if name not in known}
        for name, key in unknown.items():
            hint = did_you_mean(name, sorted(known), lead="; did you mean", limit=1)
            problems.append(
                f'{where}.{key}: unknown placeholder "{{{name}}}"'
                + (hint.replace('"', '"{', 1).replace('"?', '}"?') if hint else "")
                + ("" if hint else f" (known: {', '.join(sorted(known))})")
            )
        if unknown:
            continue  # its model keys are judged once the command is right
        for (mid, key), value in extras.items():
            if key not in used:
                problems.append(
                    f"{where}.models.{mid}.{key}: unknown key (and no placeholder of "
                    f"{where}.server.command uses it)"
                )
            elif not isinstance(value, str | int | float | bool):
                problems.append(f"{where}.models.{mid}.{key}: must be a string or a number")
        for name, key in used.items():
            for mid, info in provider.models.items():
                if name != "port" and name not in model_values(pid, mid, info):
                    problems.append(
                        f'{where}.models.{mid}.{name}: required by "{{{name}}}" in {where}.{key}'
                    )
    return problems


def _named(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _problems(exc: ValidationError, source: str) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "(top level)"
        said = _say(err)
        if err["type"] == "extra_forbidden":
            said += _suggest(loc)
        lines.append(f"{source}: {where}: {said}")
    return lines


def did_you_mean(
    word: str, choices: Iterable[str], lead: str = " Did you mean", limit: int = 3
) -> str:
    """' Did you mean "x"?' for the closest choices (at most `limit`), or '' when nothing
    is close. The one suggestion helper: resolver, views and config errors all use it."""
    from rapidfuzz import fuzz, process  # only a mistake pays for its import

    matches = process.extract(word, list(choices), scorer=fuzz.ratio, limit=limit, score_cutoff=60)
    if not matches:
        return ""
    best = matches[0][1]
    # Only the near-best: one clear suggestion reads better than three vague ones.
    quoted = [f'"{m[0]}"' for m in matches if m[1] >= best - 3]
    return f"{lead} " + " or ".join(quoted) + "?"


def _suggest(loc: list[str]) -> str:
    """'; did you mean "x"?' for the key allowed where an unknown key stands."""
    parent = loc[:-1]
    model: type[BaseModel] = OrchestratorConfig
    if parent[:1] == ["pool"]:
        model = PoolConfig
    elif parent[:1] == ["limits"]:
        model = LimitsConfig
    elif parent[:1] == ["profiles"] and len(parent) == 2:
        model = ProfileConfig
    elif parent[:1] == ["providers"] and len(parent) == 2:
        model = ProviderConfig
    elif parent[:1] == ["providers"] and len(parent) == 3 and parent[2] == "server":
        model = ServerConfig
    elif parent[:1] == ["providers"] and len(parent) == 4:
        model = ModelInfo
    allowed = [*model.model_fields, *(["extends"] if model is OrchestratorConfig else [])]
    allowed = [key for key in allowed if key != "inherited"]  # not the user's to set
    return did_you_mean(loc[-1], allowed, lead="; did you mean", limit=1)


def _say(err: Any) -> str:
    kind, given = err["type"], err.get("input")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"must be {expected.replace(chr(39), chr(34))}, got {_shown(given)}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    return f"{err['msg'].lower()}, got {_shown(given)}"


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
