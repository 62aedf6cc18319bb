"""Reward registry (name -> reward class + typed config) and the one factory, :func:`build_reward`.

Every config is a pydantic model whose field descriptions are the documentation
(:func:`reward_config_help`, :func:`reward_config_schema`). Importing this module loads no model and no
heavy library (open_clip / transformers are imported when a reward that needs them is built).

Examples::

    build_reward(HpsRewardConfig(checkpoint="/w/HPS_v2.1_compressed.pt"), "cuda", torch.float16)
    build_reward({"name": "saturation"})
    build_reward("hps:5,pickscore:0.05,clip:0.01", "cuda", torch.float16, configs={
        "hps": {"checkpoint": "/w/HPS_v2.1_compressed.pt"},
        "pickscore": {"model_path": "/w/PickScore_v1", "processor_path": "/w/CLIP-ViT-H-14"},
        "clip": {"model": "ViT-H-14", "checkpoint": "/w/open_clip_vit_h14.safetensors"},
    })
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from .aesthetic import AestheticReward, AestheticRewardConfig
from .base import Reward, RewardConfig
from .clip import ClipReward, ClipRewardConfig
from .composite import CompositeReward, TermSpec, parse_reward_spec
from .hps import HpsReward, HpsRewardConfig
from .pickscore import PickScoreReward, PickScoreRewardConfig
from .simple import (
    BrightnessReward,
    BrightnessRewardConfig,
    ContrastReward,
    ContrastRewardConfig,
    JpegCompressibilityConfig,
    JpegCompressibilityReward,
    SaturationReward,
    SaturationRewardConfig,
)


@dataclass(frozen=True)
class RewardEntry:
    name: str
    reward_cls: type[Reward]
    config_cls: type[RewardConfig]


_REGISTRY: dict[str, RewardEntry] = {}


def register_reward(name: str, reward_cls: type[Reward], config_cls: type[RewardConfig]) -> None:
    """Add a reward. ``reward_cls(config, device, dtype)`` must build it; ``config_cls`` is a
    :class:`RewardConfig` whose ``name`` field defaults to ``name``."""
    if name in _REGISTRY and _REGISTRY[name].reward_cls is not reward_cls:
        raise ValueError(f"reward '{name}' is already registered to {_REGISTRY[name].reward_cls.__name__}")
    default_name = config_cls.model_fields.get("name")
    if default_name is None or default_name.default != name:
        raise ValueError(f"{config_cls.__name__}: needs a field name: Literal['{name}'] = '{name}'")
    _REGISTRY[name] = RewardEntry(name, reward_cls, config_cls)


for _name, _cls, _cfg in (
    ("clip", ClipReward, ClipRewardConfig),
    ("hps", HpsReward, HpsRewardConfig),
    ("pickscore", PickScoreReward, PickScoreRewardConfig),
    ("aesthetic", AestheticReward, AestheticRewardConfig),
    ("saturation", SaturationReward, SaturationRewardConfig),
    ("brightness", BrightnessReward, BrightnessRewardConfig),
    ("contrast", ContrastReward, ContrastRewardConfig),
    ("jpeg_compressibility", JpegCompressibilityReward, JpegCompressibilityConfig),
):
    register_reward(_name, _cls, _cfg)


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def reward_entry(name: str) -> RewardEntry:
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; accepted: {', '.join(available_rewards())}")
    return _REGISTRY[key]


def reward_config_help(name: str) -> dict[str, str]:
    """Field -> description for a reward's config (the documentation of its options)."""
    cfg = reward_entry(name).config_cls
    return {k: (f.description or "") for k, f in cfg.model_fields.items() if k != "name"}


def reward_config_schema(name: str) -> dict[str, Any]:
    """JSON schema of a reward's config (what a service can publish)."""
    return reward_entry(name).config_cls.model_json_schema()


def _validation_message(name: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "<config>"
        if e.get("type") == "extra_forbidden":
            parts.append(f"{name}.{loc}: unknown field; accepted: {', '.join(reward_config_help(name))}")
        else:
            parts.append(f"{name}.{loc}: {e.get('msg')} (got {e.get('input')!r})")
    return "; ".join(parts)


def make_reward_config(name: str, options: RewardConfig | Mapping[str, Any] | None = None) -> RewardConfig:
    """Validated config for reward ``name`` from a config object, a mapping of options, or None (defaults)."""
    entry = reward_entry(name)
    if isinstance(options, RewardConfig):
        if not isinstance(options, entry.config_cls):
            raise ValueError(
                f"config for '{entry.name}' must be a {entry.config_cls.__name__}, got {type(options).__name__}"
            )
        return options
    values = dict(options or {})
    given = values.pop("name", entry.name)
    if str(given).lower() != entry.name:
        raise ValueError(f"{entry.name}.name: config is for {given!r}, not {entry.name!r}")
    try:
        return entry.config_cls(**values)
    except ValidationError as e:
        raise ValueError(_validation_message(entry.name, e)) from None


def _check_config_keys(configs: Mapping[str, Any]) -> None:
    """``configs`` may hold options for rewards a spec does not use (a server-wide table of paths), but
    every key must be a registered reward, so typos do not pass silently."""
    unknown = sorted(k for k in configs if k not in _REGISTRY)
    if unknown:
        raise ValueError(f"configs: unknown reward names {unknown}; accepted: {', '.join(available_rewards())}")


def _merge_options(
    base: RewardConfig | Mapping[str, Any] | None, override: RewardConfig | Mapping[str, Any] | None
) -> RewardConfig | Mapping[str, Any] | None:
    """Options from ``configs`` (e.g. a server's table of paths) overridden field by field by the term's own;
    a config object given in the term is used as is."""
    if override is None or isinstance(override, RewardConfig):
        return override if override is not None else base
    if base is None:
        return override
    base_values = base.model_dump() if isinstance(base, RewardConfig) else dict(base)
    return {**base_values, **override}


def _build_single(config: RewardConfig, device: torch.device | str, dtype: torch.dtype) -> Reward:
    entry = reward_entry(config.name)
    return entry.reward_cls(config, device=device, dtype=dtype)


def build_composite(
    terms: str | Sequence[TermSpec | Mapping[str, Any]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    configs: Mapping[str, RewardConfig | Mapping[str, Any]] | None = None,
) -> CompositeReward:
    """A :class:`CompositeReward` from a spec string (``"hps:5,pickscore:0.05"``) or a list of terms
    (:class:`TermSpec` or ``{"name"/"reward", "weight", "offset"}`` mappings, where ``reward`` may be a
    full config mapping). ``configs`` maps reward names to their options (paths etc.); it may cover
    rewards the spec does not use, and a term's own options override it field by field."""
    configs = dict(configs or {})
    if isinstance(terms, str):
        specs: list[tuple[TermSpec, Any]] = [(t, None) for t in parse_reward_spec(terms)]
    else:
        specs = []
        for item in terms:
            if isinstance(item, TermSpec):
                specs.append((item, None))
            elif isinstance(item, Mapping):
                reward_opts = item.get("reward")
                if isinstance(reward_opts, RewardConfig):
                    name = reward_opts.name  # type: ignore[attr-defined]
                elif isinstance(reward_opts, Mapping):
                    name = reward_opts.get("name")
                else:
                    name = item.get("name")
                unknown = set(item) - {"name", "reward", "weight", "offset"}
                if unknown:
                    raise ValueError(
                        f"composite term {dict(item)!r}: unknown keys {sorted(unknown)}; "
                        "accepted: name, reward, weight, offset"
                    )
                term = TermSpec(str(name).lower() if name else "", item.get("weight", 1.0), item.get("offset"))
                specs.append((term, reward_opts))
            else:
                raise ValueError(f"composite term: expected TermSpec or mapping, got {type(item).__name__}")
    seen: set[str] = set()
    for term, _ in specs:
        reward_entry(term.name)  # unknown name -> ValueError listing the accepted ones
        if term.name in seen:
            raise ValueError(f"composite: '{term.name}' appears twice")
        seen.add(term.name)
    _check_config_keys(configs)
    built = []
    for term, opts in specs:
        config = make_reward_config(term.name, _merge_options(configs.get(term.name), opts))
        built.append((term.name, _build_single(config, device, dtype), term.weight, term.offset))
    return CompositeReward(built)


def build_reward(
    spec_or_config: str | RewardConfig | Mapping[str, Any] | Sequence[TermSpec | Mapping[str, Any]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    configs: Mapping[str, RewardConfig | Mapping[str, Any]] | None = None,
) -> Reward:
    """The one factory.

    * a config object (``HpsRewardConfig(...)``) or a mapping with ``"name"`` -> that reward;
    * a bare name (``"saturation"``) -> that reward, options from ``configs[name]``;
    * a weighted spec (``"hps:5,pickscore:0.05"``, anything with ``:`` or ``,``), a mapping with
      ``"terms"``, or a list of terms -> :class:`CompositeReward` (see :func:`build_composite`).

    Raises ``ValueError`` naming the field and the accepted values on unknown names, bad weights, unknown
    options and missing files.
    """
    if isinstance(spec_or_config, RewardConfig):
        if configs:
            raise ValueError("configs: only used with spec strings or term lists")
        return _build_single(spec_or_config, device, dtype)
    if isinstance(spec_or_config, str):
        text = spec_or_config.strip()
        if "," in text or ":" in text:
            return build_composite(text, device, dtype, configs=configs)
        name = reward_entry(text).name
        _check_config_keys(configs or {})
        return _build_single(make_reward_config(name, (configs or {}).get(name)), device, dtype)
    if isinstance(spec_or_config, Mapping):
        if "terms" in spec_or_config:
            extra = set(spec_or_config) - {"terms"}
            if extra:
                raise ValueError(f"composite config: unknown keys {sorted(extra)}; accepted: terms")
            return build_composite(spec_or_config["terms"], device, dtype, configs=configs)
        if configs:
            raise ValueError("configs: only used with spec strings or term lists")
        if "name" not in spec_or_config:
            raise ValueError(
                f"reward config mapping needs a 'name' (one of {', '.join(available_rewards())}) or 'terms'"
            )
        return _build_single(make_reward_config(str(spec_or_config["name"]), spec_or_config), device, dtype)
    if isinstance(spec_or_config, Sequence):
        return build_composite(spec_or_config, device, dtype, configs=configs)
    raise ValueError(f"build_reward: unsupported spec {type(spec_or_config).__name__}")
