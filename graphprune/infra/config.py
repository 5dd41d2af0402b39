"""Pass configs: frozen dataclasses built from plain dicts (Python or TOML), validated.

A config class declares its fields with types and defaults; range checks go in
``__post_init__`` and raise :class:`ConfigError` via the ``check_*`` helpers. The
pass name is added by :func:`build_config`, so every message names the pass, the
field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
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
    """Raise ConfigError unless ``low <= value <= high`` (ends open where asked)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
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
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"pass {pass_name!r}: config must be a table of fields, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        raise ValueError(
            f"pass {pass_name!r}: unknown config field {unknown[0]!r}; allowed fields: {sorted(fields) or 'none'}"
        )
    values = {}
    for name, value in raw.items():
        try:
            values[name] = _coerce(hints[name], value)
        except TypeError:
            raise ValueError(
                f"pass {pass_name!r}: field {name!r} = {value!r} has the wrong type; expected {_describe(hints[name])}"
            ) from None
    try:
        return config_cls(**values)
    except ConfigError as error:
        raise ValueError(f"pass {pass_name!r}: {error}") from None


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-able dict of a config (tuples become lists), for history and manifests."""
    if config is None:
        return {}
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
