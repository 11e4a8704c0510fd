"""The one model resolver: tags, aliases, usability, suggestions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.config import ModelInfo, OrchestratorConfig, ProviderConfig, default_config
from orchestrator.resolver import ResolutionError, build_catalogue, resolve


def _resolve(ref: str, cfg: OrchestratorConfig | None = None, env: dict[str, str] | None = None):
    cfg = cfg or default_config()
    return resolve(ref, cfg, build_catalogue(cfg, env or {}))


def test_tags_on_the_default_config() -> None:
    assert _resolve("auto").resolved_model == "local/echo-large"
    assert _resolve("auto:fast").resolved_model == "local/echo-small"
    assert _resolve("auto:vision").resolved_model == "local/echo-vision"
    assert _resolve("auto:docs").resolved_model == "local/echo-large"
    assert _resolve("node:fast").resolved_model == "local/echo-small"
    assert _resolve("node").resolved_model == "local/echo-large"


def test_every_resolution_names_its_rule() -> None:
    assert _resolve("auto:fast").reason.startswith("tag auto:fast -> small_model")
    assert _resolve("auto:vision").reason.startswith("tag auto:vision -> best vision model")
    assert _resolve("local/echo-small").reason == "explicit model local/echo-small"


def test_unknown_model_suggests_the_closest() -> None:
    cfg = OrchestratorConfig(
        model="openai/gpt-4o-mini",
        providers={
            "openai": ProviderConfig(
                models={"gpt-4o-mini": ModelInfo(), "gpt-4.1-mini": ModelInfo()}
            )
        },
    )
    with pytest.raises(ResolutionError) as err:
        _resolve("openai/gpt-4.1-mni", cfg)
    assert (
        str(err.value)
        == 'Model "openai/gpt-4.1-mni" not found. Did you mean "openai/gpt-4.1-mini"?'
    )


def test_unknown_tag_suggests_a_tag() -> None:
    with pytest.raises(ResolutionError, match=r'Did you mean "auto:vision"\?'):
        _resolve("auto:visoin")


def test_api_providers_need_their_key_to_be_picked_by_tags() -> None:
    cfg = default_config()
    cfg.providers["cloud"] = ProviderConfig(
        kind="openai",
        source="api",
        api_key_env="CLOUD_KEY",
        base_url="http://x",
        models={
            "cheap": ModelInfo(cost_input=0.001),
            "eye": ModelInfo(vision=True, context=10**6, cost_input=5.0),
        },
    )
    cfg.small_model = None
    assert _resolve("auto:fast", cfg).resolved_model == "local/echo-small"
    assert _resolve("auto:fast", cfg, {"CLOUD_KEY": "k"}).resolved_model == "cloud/cheap"
    assert _resolve("auto:vision", cfg).resolved_model == "local/echo-vision"
    assert _resolve("auto:vision", cfg, {"CLOUD_KEY": "k"}).resolved_model == "cloud/eye"
    # Explicit names resolve from every provider, usable or not.
    assert _resolve("cloud/eye", cfg).resolved_model == "cloud/eye"


def test_auto_vision_without_a_vision_model_is_an_error_not_a_downgrade() -> None:
    cfg = default_config()
    del cfg.providers["local"].models["echo-vision"]
    with pytest.raises(ResolutionError, match="No usable vision model"):
        _resolve("auto:vision", cfg)


models_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=5),
    st.builds(
        ModelInfo,
        vision=st.booleans(),
        tool_call=st.booleans(),
        context=st.integers(1, 10**6),
        cost_input=st.floats(0, 100),
        cost_output=st.floats(0, 100),
    ),
    min_size=1,
    max_size=6,
)


@given(local=models_st, api=models_st, key=st.booleans())
def test_auto_vision_never_picks_a_non_vision_or_unusable_model(
    local: dict[str, ModelInfo], api: dict[str, ModelInfo], key: bool
) -> None:
    cfg = OrchestratorConfig(
        model=f"p/{next(iter(local))}",
        providers={
            "p": ProviderConfig(kind="echo", models=local),
            "q": ProviderConfig(source="api", api_key_env="Q_KEY", models=api),
        },
    )
    env = {"Q_KEY": "k"} if key else {}
    catalogue = {m.model: m for m in build_catalogue(cfg, env)}
    try:
        res = _resolve("auto:vision", cfg, env)
    except ResolutionError:
        assert not any(m.vision and m.usable for m in catalogue.values())
        return
    assert catalogue[res.resolved_model].vision
    assert catalogue[res.resolved_model].usable
    assert res.capabilities["vision"] is True


@given(local=models_st, small=st.text("abcdefgh", min_size=1, max_size=5))
def test_auto_fast_prefers_small_model_when_it_resolves(
    local: dict[str, ModelInfo], small: str
) -> None:
    cfg = OrchestratorConfig(
        model=f"p/{next(iter(local))}",
        small_model=f"p/{small}",
        providers={"p": ProviderConfig(kind="echo", models=local)},
    )
    res = _resolve("auto:fast", cfg)
    if small in local:
        assert res.resolved_model == f"p/{small}"
    else:
        cheapest = min(
            local.items(), key=lambda kv: (kv[1].cost_input + kv[1].cost_output, f"p/{kv[0]}")
        )
        assert res.resolved_model == f"p/{cheapest[0]}"
