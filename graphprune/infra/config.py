"""Pass configs: frozen dataclasses built from plain dicts (Python or TOML), validated.

A config class declares its fields with types and defaults; range checks go in
``__post_init__`` and raise :class:`ConfigError` via the ``check_*`` helpers. The
pass name is added by :func:`build_config`, so every message names the pass, the
field, the value and what is allowed.

Two shapes beyond flat fields, for MASE-style configs: a field whose type is itself a
config dataclass is built from a nested table (its errors name ``outer.inner``), and
a class that sets ``EXTRA_FIELD = "entries"`` collects every key that is not one of
its fields into that dict field (``{"by": "role", "ffn_up": {...}}``), for its
``__post_init__`` to check.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config field has a bad value. Raised from ``__post_init__`` of config classes."""

    def __init__(self, field: str, value: Any, allowed: str):
        super().__init__(f"field {field!r} = {value!r} is not allowed; expected {allowed}")
        self.field = field
        self.value = value
        self.allowed = allowed


def check_range(field: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (ends open where asked). NaN is never in range."""
    not_a_number = isinstance(value, float) and math.isnan(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not_a_number or too_low or too_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ConfigError(field, value, f"a number {lo}{field}{hi}".strip())


def check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(field, value, f"one of {sorted(choices)}")


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if args else "a list"
    if tp is type(None):
        return "none"
    if origin is dict or tp is dict:
        return "a table"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a table of {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp, value):
    """Return ``value`` as type ``tp`` or raise TypeError. Ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        for option in typing.get_args(tp):
            if value == option and type(value) is type(option):  # True is not 1 here
                return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value)
            except TypeError:
                continue
        raise TypeError
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise TypeError
        return dict(value)  # a copy: the caller's table is never changed
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_coerce(args[0], v) for v in value] if args else list(value)
        return tuple(items)  # frozen configs hold tuples
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError


def build_config(pass_name: str, config_cls: type | None, raw: Mapping[str, Any] | Any | None):
    """Build and validate ``config_cls`` from ``raw`` for the pass ``pass_name``.

    ``raw`` may be None (all defaults), a mapping, or an instance of ``config_cls``.
    The caller's mapping is never modified.
    """
    if config_cls is None:
        if raw:
            raise ValueError(f"pass {pass_name!r} takes no config, got {dict(raw) if isinstance(raw, Mapping) else raw!r}")
        return None
    if isinstance(raw, config_cls):
        return raw
    try:
        return _build(config_cls, {} if raw is None else raw)
    except ConfigError as error:
        raise ValueError(f"pass {pass_name!r}: {error}") from None
    except _Unknown as error:
        raise ValueError(f"pass {pass_name!r}: {error}") from None


class _Unknown(ValueError):
    pass


def _dataclass_in(tp) -> type | None:
    """The config dataclass a field type names (directly or as ``X | None``), if any."""
    for option in (tp, *typing.get_args(tp)):
        if isinstance(option, type) and dataclasses.is_dataclass(option):
            return option
    return None


def build_table(config_cls: type, raw, prefix: str = ""):
    """Build a config dataclass from a nested table whose errors name ``prefix + field``.

    For configs whose ``__post_init__`` builds tables of their own (MASE-style entries).
    """
    return _build(config_cls, raw, prefix)


def _build(config_cls: type, raw, prefix: str = ""):
    if not isinstance(raw, Mapping):
        where = f"field {prefix[:-1]!r}" if prefix else "config"
        raise _Unknown(f"{where} must be a table of fields, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    extra_field = getattr(config_cls, "EXTRA_FIELD", None)
    unknown = sorted(str(k) for k in raw if k not in fields)
    values: dict[str, Any] = {}
    if unknown and extra_field:
        values[extra_field] = {k: v for k, v in raw.items() if k not in fields}
    elif unknown:
        raise _Unknown(f"unknown config field {prefix + unknown[0]!r}; allowed fields: {sorted(fields) or 'none'}")
    for name, value in raw.items():
        if name not in fields:
            continue
        nested = _dataclass_in(hints[name])
        if nested is not None and isinstance(value, Mapping):
            values[name] = _build(nested, value, f"{prefix}{name}.")
            continue
        try:
            values[name] = _coerce(hints[name], value)
        except TypeError:
            raise _Unknown(
                f"field {prefix + name!r} = {value!r} has the wrong type; expected {_describe(hints[name])}"
            ) from None
    try:
        return config_cls(**values)
    except ConfigError as error:
        if not prefix:
            raise
        raise ConfigError(prefix + error.field, error.value, error.allowed) from None


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-able dict of a config (nested configs as tables, tuples as lists), for history and manifests."""
    if config is None:
        return {}
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
