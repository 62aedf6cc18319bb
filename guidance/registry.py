"""Policy registry: name -> policy class and parameter schema; spec-string and JSON parsing.

A policy is written either as a spec string, ``apg:scale=10,eta=0,momentum=-0.5`` (values are JSON:
numbers, ``true``/``false``, ``null``, lists like ``[7,5,3]``; anything else is a string), or as a JSON object
``{"name": "apg", "scale": 10, "eta": 0, "momentum": -0.5}``. Both parse to the same validated
``Params`` object of the policy; errors name the field (``policy.scale``) and the accepted values.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from typing import Any

import pydantic

from diffsteer.guidance.errors import InvalidInput, from_pydantic, unknown_choice
from diffsteer.guidance.policies.adaptive import AdaptiveGuidance
from diffsteer.guidance.policies.apg import APG
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams
from diffsteer.guidance.policies.cfg import CFG
from diffsteer.guidance.policies.cfg_zero_star import CFGZeroStar
from diffsteer.guidance.policies.dynamic import DynamicCFG
from diffsteer.guidance.policies.linear_ag import LinearAG
from diffsteer.guidance.policies.perp_neg import PerpNeg
from diffsteer.guidance.policies.reno import ReNO

_POLICIES: dict[str, type[GuidancePolicy]] = {}


def register_policy(cls: type[GuidancePolicy]) -> type[GuidancePolicy]:
    """Add a policy class (usable as a decorator); its ``name`` must be new."""
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise ValueError(f"policy {cls.name!r} is already registered")
    _POLICIES[cls.name] = cls
    return cls


for _cls in (CFG, APG, AdaptiveGuidance, LinearAG, CFGZeroStar, PerpNeg, ReNO, DynamicCFG):
    register_policy(_cls)

DEFAULT_POLICY = "cfg"
PolicySpec = str | Mapping[str, Any] | PolicyParams | None


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def policy_class(name: str) -> type[GuidancePolicy]:
    try:
        return _POLICIES[name]
    except KeyError:
        raise unknown_choice("policy.name", name, _POLICIES) from None


def parse_policy(spec: PolicySpec, field: str = "policy") -> PolicyParams:
    """Validate a spec string, JSON object or Params into the policy's Params object."""
    if spec is None:
        return policy_class(DEFAULT_POLICY).Params()
    if isinstance(spec, PolicyParams):
        return spec
    # JSON objects are validated strictly (the string "7" is not a number, 1 not a boolean), as the published
    # schema says; a spec string's values are text, so "scale=nan" is read as a (non-finite) number
    strict = True
    if isinstance(spec, str):
        spec = spec.strip()
        strict = spec.startswith("{")
        if not strict:  # JSON text may hold whitespace; its strings are checked once parsed
            check_policy_text(spec, field)
        data = parse_json_object(spec, field) if strict else parse_spec_string(spec, field)
    elif isinstance(spec, Mapping):
        data = dict(spec)
    else:
        raise InvalidInput(field, f"expected a spec string or an object, got {type(spec).__name__}")
    check_policy_text(data, field)
    name = data.pop("name", None)
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{field}.name", f"missing; accepted values: {', '.join(policy_names())}")
    cls = _POLICIES.get(name)
    if cls is None:
        raise unknown_choice(f"{field}.name", name, _POLICIES)
    accepted = [k for k in cls.Params.model_fields if k != "name"]
    for key in data:
        if key not in accepted:
            raise InvalidInput(
                f"{field}.{key}", f"unknown parameter of policy {name!r}; accepted parameters: {', '.join(accepted)}"
            )
    try:
        return cls.Params.model_validate({"name": name, **data}, strict=strict)
    except pydantic.ValidationError as e:
        raise from_pydantic(e, prefix=f"{field}.") from None
    except TypeError as e:  # e.g. a non-string key
        raise InvalidInput(field, str(e)) from None


def build_policy(spec: PolicySpec, field: str = "policy") -> GuidancePolicy:
    params = parse_policy(spec, field)
    return _POLICIES[params.name](params)  # type: ignore[attr-defined]


def check_policy_text(value: Any, field: str = "policy") -> None:
    """Every string of a policy (the spec, an object's keys and values) is valid Unicode without control characters:
    they would otherwise reach error messages, logs and response headers. InvalidInput names the field and the
    position, never echoing the character."""
    if isinstance(value, str):
        for i, ch in enumerate(value):
            if unicodedata.category(ch) in ("Cc", "Cs"):
                kind = "a lone surrogate" if unicodedata.category(ch) == "Cs" else "a control character"
                raise InvalidInput(field, f"contains {kind} (U+{ord(ch):04X}) at position {i}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_policy_text(key, field)
            check_policy_text(item, f"{field}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_policy_text(item, f"{field}.{i}")


def parse_spec_string(spec: str, field: str = "policy") -> dict[str, Any]:
    """``name[:key=value,...]`` -> {"name": name, key: value, ...}; commas inside [...] do not split."""
    name, _, body = spec.partition(":")
    data: dict[str, Any] = {"name": name.strip()}
    for item in _split_top_level(body):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise InvalidInput(field, f"malformed parameter {item!r}; write key=value, e.g. cfg:scale=7.5")
        if key in data:
            raise InvalidInput(f"{field}.{key}", "given twice")
        data[key] = _parse_value(raw.strip(), f"{field}.{key}")
    return data


def _split_top_level(body: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in body:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [i for i in (s.strip() for s in items) if i]


MAX_NESTING = 32  # a policy's values are numbers and flat lists; deeper nesting is never a valid policy


def _parse_value(raw: str, field: str = "policy") -> Any:
    check_nesting(raw, field)
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def check_nesting(text: str, field: str = "policy") -> None:
    """Refuse text whose brackets nest deeper than MAX_NESTING before any JSON parser recurses into it
    (``json.loads("[" * 100000)`` raises RecursionError)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                raise InvalidInput(
                    field,
                    f"nested more than {MAX_NESTING} levels deep; a policy's values are "
                    "numbers, strings and flat lists",
                )
        elif ch in "]}":
            depth = max(0, depth - 1)


def parse_json_object(text: str, field: str = "policy") -> dict[str, Any]:
    """A JSON object from text, or InvalidInput naming ``field`` (also for nesting deeper than MAX_NESTING)."""
    check_nesting(text, field)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(field, f"invalid JSON: {e.msg} at position {e.pos}") from None
    if not isinstance(data, dict):
        raise InvalidInput(field, "expected a JSON object")
    return data


def policy_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of every policy's parameters, by name."""
    return {name: cls.Params.model_json_schema() for name, cls in sorted(_POLICIES.items())}


def describe_policies() -> list[dict[str, Any]]:
    """Name, summary and parameters (type, default, help) of every policy, for listings."""
    rows = []
    for name, cls in sorted(_POLICIES.items()):
        params = []
        for key, info in cls.Params.model_fields.items():
            if key == "name":
                continue
            default = info.get_default(call_default_factory=True)
            params.append({"name": key, "default": default, "help": info.description or ""})
        rows.append({"name": name, "summary": cls.summary, "parameters": params})
    return rows
