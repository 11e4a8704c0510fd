"""What a managed model server is: its spec (command, environment, ready path, fingerprint)
from the configuration, and the error a server that cannot start or be used raises."""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.backends import TaskError
from orchestrator.config import ConfigError, OrchestratorConfig, model_values, server_problems
from orchestrator.providers import split_model


class ModelServerError(TaskError):
    """A managed model server could not be started or used; the message says why, with
    its exit status and last log lines when it failed to start."""

    def __init__(self, message: str, exit_status: int | None = None, stopped: bool = False):
        super().__init__(message)
        self.exit_status = exit_status
        self.stopped = stopped


@dataclass(frozen=True)
class ServerSpec:
    """Everything needed to start (or recognise) the server of one managed model."""

    model: str  # provider/model
    command: tuple[str, ...]  # `{port}` left in place
    env: tuple[tuple[str, str], ...]
    ready_path: str
    start_timeout: float
    memory_mb: int
    identity: Mapping[str, Any]
    fingerprint: str

    def argv(self, port: int) -> list[str]:
        """The command with its port."""
        return [w.replace("{port}", str(port)) for w in self.command]

    def environ(self, port: int) -> dict[str, str]:
        """The extra environment with its port."""
        return {k: v.replace("{port}", str(port)) for k, v in self.env}


def _substitute(word: str, values: Mapping[str, str]) -> str:
    # Every placeholder but `{port}` (known only at start), `{{`/`}}` made literal.
    out = []
    for literal, name, _, _ in string.Formatter().parse(word):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            out.append("{port}" if name == "port" else values[name].replace("{", "{{"))
    return "".join(out).replace("{{", "{").replace("}}", "}")


def server_spec(config: OrchestratorConfig, model: str) -> ServerSpec | None:
    """The server a `provider/model` is served by, or None when its provider is not
    managed. Raises `ConfigError` for a configuration built in code whose command is bad
    (a file or dict is checked at load)."""
    provider_id, name = split_model(model)
    provider = config.providers.get(provider_id)
    if provider is None or provider.server is None or name not in provider.models:
        return None
    problems = server_problems(config)
    if problems:
        raise ConfigError("config: " + problems[0])
    server = provider.server
    values = model_values(provider_id, name, provider.models[name])
    command = tuple(_substitute(w, values) for w in server.command)
    env = tuple(sorted((k, _substitute(v, values)) for k, v in server.env.items()))
    ident = {
        "model": model,
        "command": list(command),
        "env": dict(env),
        "ready_path": server.ready_path,
        "provider": {
            "id": provider_id,
            "kind": provider.kind,
            "api_key_env": provider.api_key_env,
            "timeout": provider.timeout,
            "max_retries": provider.max_retries,
        },
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ServerSpec(
        model=model,
        command=command,
        env=env,
        ready_path=server.ready_path,
        start_timeout=server.start_timeout,
        memory_mb=provider.models[name].memory_mb,
        identity=ident,
        fingerprint=f"ms-{digest[:16]}",
    )


def managed_commands(config: OrchestratorConfig) -> list[str]:
    """One line per managed model: the command its server would run (`config check`)."""
    lines = []
    for provider_id, provider in config.providers.items():
        if provider.server is None:
            continue
        for name in provider.models:
            spec = server_spec(config, f"{provider_id}/{name}")
            assert spec is not None
            shown = " ".join(_quote(w) for w in spec.command)
            lines.append(f"server {spec.model}: {shown} (ready: GET {spec.ready_path})")
    return lines


def _quote(word: str) -> str:
    return word if word and not re.search(r"[\s'\"\\$`]", word) else json.dumps(word)
