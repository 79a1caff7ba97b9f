"""Typed, documented, validated option dataclasses: the one place where a value's type and bounds are checked.

    @dataclass
    class MAGEConfig(Options):
        embed_dim: int = option(768, "encoder width", min=1)
        dropout: float = option(0.1, "dropout", min=0.0, lt=1.0)

        def validate(self):          # checks that involve more than one field
            ...

Constructing an `Options` dataclass checks every field against its `choices` and bounds (`min`/`max` inclusive,
`gt`/`lt` exclusive; NaN never passes), then calls `validate()`; problems raise `ConfigError` with one line.
`build_options(cls, mapping, prefix)` also parses strings (`key=value` overrides) and rejects unknown keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any

import yaml

from .errors import ConfigError


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, gt: float | None = None, lt: float | None = None, flag: str | None = None,
           **kw) -> Any:
    """A dataclass field with its documentation and the values it accepts; `flag`: its command-line flag where
    that is not `--field-name` (e.g. `--class` for a field that Python cannot call `class`)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "gt": gt, "lt": lt, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


INT_MAX = 2**63 - 1  # what torch and numpy take: larger integers are refused everywhere


def check_bounds(m, value, key: str) -> None:
    """Raise ConfigError when `value` (or each item of a list) is not one of `m['choices']`, is out of the bounds
    `m['min']`/`m['max']` (inclusive), `m['gt']`/`m['lt']` (exclusive), or is not a finite number: NaN and
    infinities never pass, nor integers beyond 64 bits."""
    for v in value if isinstance(value, list) else [value]:
        if v is None or isinstance(v, (bool, str)) and not m.get("choices"):
            continue
        if m.get("choices") and v not in m["choices"]:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, m['choices']))}"
                              f"{did_you_mean(str(v), map(str, m['choices']))}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: {v} is not a valid value (a finite number is needed)")
        if isinstance(v, int) and abs(v) > INT_MAX:
            raise ConfigError(f"{key}: {v} is too large (the limit is {INT_MAX})")
        for bound, ok, words in (("min", lambda x, b: x >= b, "below the minimum"),
                                 ("max", lambda x, b: x <= b, "above the maximum"),
                                 ("gt", lambda x, b: x > b, "must be greater than"),
                                 ("lt", lambda x, b: x < b, "must be less than")):
            b = m.get(bound)
            if b is not None and isinstance(v, (int, float)) and not ok(v, b):
                raise ConfigError(f"{key}: {v!r} is {words} {b}" if bound in ("min", "max")
                                  else f"{key}: {v!r} {words} {b}")


def flag_type(tp, flag: str = "", **bounds):
    """An argparse `type=` for a command-line flag: parsed like a config value of type `tp` and checked with
    the same rules (`bounds`: choices, min, max, gt, lt), so a bad flag is a usage error (exit 2)."""
    def convert(raw: str):
        try:
            value = parse_value(tp, raw, flag)
            check_bounds(bounds, value, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag}: ") if flag else str(e)) from None
        return value

    convert.__name__ = getattr(tp, "__name__", str(tp))
    return convert


class Options:
    """Base of option dataclasses: bounds checked on construction, then `validate()` (override)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, f.name, value)
            check_bounds(f.metadata, value, f.name)
        self.validate()

    def validate(self) -> None:
        """Checks that involve more than one field (raise ConfigError)."""


def parse_value(tp, raw: Any, key: str):
    """Convert `raw` (a YAML value or an override string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "~")):
            return None
        return parse_value(args[0], raw, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(raw, str):
            raw = yaml.safe_load(raw) if raw.strip().startswith("[") else [s for s in raw.split(",") if s.strip()]
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        return [parse_value(item, v, key) for v in raw]
    if tp is dict:
        if isinstance(raw, str):
            try:
                raw = yaml.safe_load(raw) if raw.strip() else {}
            except yaml.YAMLError:
                raise ConfigError(f"{key}: expected a mapping such as {{num_iter: 4}}, got {raw!r}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
        return dict(raw)
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return raw.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if tp is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if tp is str:
            if isinstance(raw, (dict, list)):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {raw!r}") from None
    raise ConfigError(f"{key}: unsupported option type {tp}")


def build_options(cls: type, data: dict, prefix: str):
    """An instance of the option dataclass `cls` from a mapping of raw values, every key and value checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in data.items():
        full = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'{did_you_mean(full, (f'{prefix}.{k}' for k in fields))}")
        kwargs[key] = parse_value(hints[key], raw, full)
        check_bounds(fields[key].metadata, kwargs[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}: {e}") from None
