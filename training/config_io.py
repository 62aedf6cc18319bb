"""Typed training configs: dataclasses whose fields' ``help`` metadata is the documentation.

One config type, three ways in and one way out:

* a YAML (or JSON) file, :func:`load_config`, with ``key=value`` overrides (``--set lora_rank=8``);
* command-line options generated from the fields, :func:`add_config_arguments` / :func:`config_from_arguments`;
* Python, ``AlignPropConfig(lora_rank=8)``;
* :func:`render_yaml` prints a config as YAML with every field's help as a comment above it
  (``diffsteer train alignprop --print-config``), and that file loads back to the same config.

Values are checked against the field annotations (int, float, bool, str, ``Literal``, optional values,
tuples/lists and ``dict[str, float]``); an unknown key or a bad value raises :class:`InvalidInput` naming the
field and what is accepted. Cross-field checks live in each config's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from diffsteer.guidance.errors import InvalidInput

C = TypeVar("C")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping of names to numbers"
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` converted to ``annotation``; InvalidInput(name, ...) when it cannot be."""
    origin, args = get_origin(annotation), get_args(annotation)
    fail = InvalidInput(name, f"expected {_describe(annotation)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
            if type(None) in args:
                return None
            raise fail
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name)
            except InvalidInput:
                continue
        raise fail
    if origin is Literal:
        if value in args:
            return value
        raise InvalidInput(name, f"unknown value {value!r}; accepted values: {', '.join(str(a) for a in args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            items = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        elif isinstance(value, Sequence):
            items = list(value)
        else:
            raise fail
        item_type = args[0] if args else str
        converted = [coerce(v, item_type, name) for v in items]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise fail from None
        if not isinstance(value, Mapping):
            raise fail
        return {str(k): coerce(v, args[1] if args else float, f"{name}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise fail
    if annotation is int:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise fail from None
    if annotation is float:
        if isinstance(value, bool):
            raise fail
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail from None
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail
    return value


def config_from_mapping(cls: type[C], data: Mapping[str, Any], source: str = "config") -> C:
    """Build ``cls`` from a mapping of field names (``-`` and ``_`` alike) to values."""
    if not isinstance(data, Mapping):
        raise InvalidInput(source, f"expected a mapping of field names to values, got {type(data).__name__}")
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise InvalidInput(str(key), f"unknown field of {source}; accepted fields: {', '.join(names)}")
        values[name] = coerce(value, types_[name], name)
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise InvalidInput(source, str(e)) from None


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b.c": "x"}``; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput("--set", f"expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """The names of the configs that ship with the package (``training/configs/NAME.yaml``)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_file(path: str | Path) -> Path:
    """A config file: ``path`` itself, else the shipped config of that name (``smpo-proving-ground``, with or
    without ``.yaml``); InvalidInput naming ``--config`` and the shipped names when it is neither."""
    file = Path(path).expanduser()
    if file.is_file():
        return file
    shipped = SHIPPED_CONFIGS / f"{Path(str(path)).name.removesuffix('.yaml')}.yaml"
    if Path(str(path)).name == str(path) and shipped.is_file():
        return shipped
    raise InvalidInput(
        "--config", f"{str(file)!r} is neither a file nor a shipped config; shipped: {', '.join(shipped_configs())}"
    )


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """The config in the YAML/JSON file ``path`` or the shipped config of that name (None: the defaults), with
    ``KEY=VALUE`` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        file = config_file(path)
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise InvalidInput("--config", f"{file}: not valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise InvalidInput("--config", f"{file}: expected a mapping of field names to values")
        data.update(loaded or {})
    data.update(parse_overrides(overrides))
    return config_from_mapping(cls, data, source=cls.__name__)


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_plain(config: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON types (tuples become lists)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def plain_defaults(config: Any) -> dict[str, Any]:
    """Each field's default as plain types (what a config written before the field existed meant)."""
    defaults = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = _plain(f.default_factory())
    return defaults


def render_yaml(config: Any) -> str:
    """Every field as YAML, each preceded by its help text as a comment."""
    doc = (type(config).__doc__ or type(config).__name__).strip().splitlines()[0]
    lines = [f"# {doc}"]
    plain = to_plain(config)
    for f in dataclasses.fields(config):
        lines.append("")
        for help_line in str(f.metadata.get("help", "")).splitlines():
            lines.append(f"# {help_line}")
        lines.append(
            yaml.safe_dump({f.name: plain[f.name]}, default_flow_style=False, sort_keys=False, width=120).rstrip()
        )
    return "\n".join(lines) + "\n"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per field (values parsed by :func:`coerce`; lists space-separated)."""
    defaults = cls()
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        annotation = types_[f.name]
        is_list = get_origin(annotation) in (tuple, list)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            nargs="+" if is_list else None,
            default=None,
            help=f"{f.metadata.get('help', '')} (default: {json.dumps(to_plain(defaults)[f.name])})",
        )


def config_from_arguments(cls: type[C], args: argparse.Namespace) -> C:
    """The config from options added by :func:`add_config_arguments` (unset options keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return config_from_mapping(cls, given, source=cls.__name__)
