"""The number formats' keys, as MASE's configs spell them, and their checks.

``FORMATS`` lists each format's keys. ``quantizer(name, prefix, entry)`` reads them
from a MASE entry under their prefixed names (``weight_width``, ``data_in_frac_width``,
``bias_block_size``, ...), checks them and returns ``x -> quantized x`` (the functions of
``formats``). A missing, unknown or bad key raises ConfigError naming it.

Example:
    >>> q = quantizer("integer", "weight", {"weight_width": 8, "weight_frac_width": 4})
    >>> q(torch.tensor([0.1, 100.0]))          # tensor([0.1250, 7.9375])
    >>> quantizer("integer", "weight", {"weight_width": 8, "weight_frac_width": "auto",
    ...                                 "weight_per_channel": True})  # a power-of-two scale per row
    >>> average_bits("mxint8", "data_in", {})  # 8.25: 8 bits plus an 8-bit scale per 32
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from graphprune.infra.config import ConfigError

from .formats import (
    MX_ELEMENTS,
    quantize_binary,
    quantize_block_fp,
    quantize_block_minifloat,
    quantize_integer,
    quantize_log,
    quantize_minifloat_denorm,
    quantize_minifloat_ieee,
    quantize_mxfp4,
    quantize_mxfp8_e4m3,
    quantize_mxfp8_e5m2,
    quantize_mxint8,
    quantize_ternary,
)

class _Bad(Exception):
    """A key's value is not allowed; carries what is."""


def _int(low: int | None = None):
    def check(value):
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
            raise _Bad("an integer" + (f" >= {low}" if low is not None else ""))
        return value
    return check


def _flag(value):
    if isinstance(value, bool) or value in (0, 1):  # MASE's TOML files write 0/1 for false/true
        return bool(value)
    raise _Bad("true or false")


def _maybe(check, none_spellings=("none", "None")):
    # MASE's configs spell "use the default / no statistic" as "none" or "NA"
    def maybe(value):
        return None if value is None or (isinstance(value, str) and value in none_spellings) else check(value)
    return maybe


def _frac_width(value):
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    # a missing key is reported as "an integer (missing)"; "auto" is for those who look closer
    raise _Bad("an integer" if value is None else "an integer, or 'auto' (fitted to the tensor's range)")


def _one_of(*choices):
    def check(value):
        if value not in choices or isinstance(value, bool):
            raise _Bad(f"one of {list(choices)}")
        return value
    return check


def _number(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise _Bad("a finite number or 'NA'")


def _block(value):
    # MASE's block shapes are tiles right-aligned with the tensor; only rows of the last dim ([1, n] or n) here
    sizes = list(value) if isinstance(value, (list, tuple)) else [value]
    if sizes and all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        if sizes[-1] >= 1 and all(s == 1 for s in sizes[:-1]):
            return sizes[-1]
    raise _Bad("an integer >= 1 or a list [1, ..., n] (blocks along the last dim)")


def _exactly(expected):
    def check(value):
        if value != expected or isinstance(value, bool):
            raise _Bad(f"{expected} (the format's own)")
        return value
    return check


@dataclass(frozen=True)
class FormatSpec:
    """A format: its function, its keys (unprefixed) and how many bits an element costs.

    ``required`` and ``optional`` (key -> default) are passed to ``fn``; ``fixed`` keys appear in MASE's
    configs (``width`` of binary and ternary) and are checked but not passed. ``checks`` maps each key to a
    function returning the value or raising; ``relations`` are (key, test on all keys, what is allowed).
    """

    name: str
    fn: Callable[..., Tensor]
    required: tuple[str, ...]
    optional: Mapping[str, Any]
    checks: Mapping[str, Callable[[Any], Any]]
    bits: Callable[[dict], float]
    relations: tuple[tuple[str, Callable[[dict], bool], str], ...] = ()
    fixed: tuple[str, ...] = ()

    def describe(self, prefix: str) -> str:
        needs = ", ".join(f"{prefix}_{k}" for k in self.required) or "no keys"
        extra = [f"{prefix}_{k}" + ("" if v is None else f" (default {v})") for k, v in self.optional.items()]
        extra += [f"{prefix}_{k}" for k in self.fixed]
        return f"format {self.name!r} needs {needs}" + (f"; optional {', '.join(extra)}" if extra else "")


_ENTRY = {"width": _int(1), "exponent_width": _int(1), "exponent_bias": _maybe(_int())}
_E_FITS = (("exponent_width", lambda k: k["exponent_width"] <= k["width"] - 1, "an integer <= width - 1"),)
_INTEGER_AUTO = (  # the keys that only mean something when the frac width is fitted
    ("per_channel", lambda k: not k["per_channel"] or k["frac_width"] == "auto",
     "false unless frac_width is 'auto' (each row's frac width is fitted to its max |value|)"),
    ("range", lambda k: k["range"] == "max" or (k["frac_width"] == "auto" and not k["per_channel"]),
     "'max'; 'percentile' picks frac_width = 'auto' per tensor (rows use their max)"),
    ("width", lambda k: k["frac_width"] != "auto" or k["width"] >= 2, "an integer >= 2 with frac_width 'auto'"),
)
_BLOCK = lambda k, shared: k["width"] + k[shared] / k["block_size"]  # noqa: E731  a shared field amortised


def _spec(name, fn, required, optional=None, checks=None, bits=None, relations=(), fixed=()):
    return FormatSpec(name, fn, tuple(required), types.MappingProxyType(dict(optional or {})),
                      types.MappingProxyType(dict(checks or {})), bits or (lambda k: float(k["width"])),
                      tuple(relations), tuple(fixed))


def _mx(fn: Callable[..., Tensor]) -> FormatSpec:
    name = fn.__name__.removeprefix("quantize_")
    bits = MX_ELEMENTS[name][-1]  # + the 8-bit E8M0 scale of each block
    return _spec(name, fn, (), {"block_size": 32}, {"block_size": _block}, lambda k: bits + 8 / k["block_size"])


FORMATS: dict[str, FormatSpec] = {spec.name: spec for spec in (
    _spec("integer", quantize_integer, ("width", "frac_width"), {"floor": False, "per_channel": False, "range": "max"},
          {"width": _int(1), "frac_width": _frac_width, "floor": _flag, "per_channel": _flag,
           "range": _one_of("max", "percentile")},
          relations=_INTEGER_AUTO),
    _spec("minifloat_ieee", quantize_minifloat_ieee, ("width", "exponent_width"), {"exponent_bias": None},
          _ENTRY, relations=_E_FITS),
    _spec("minifloat_denorm", quantize_minifloat_denorm, ("width", "exponent_width"), {"exponent_bias": None},
          _ENTRY, relations=(("exponent_width", lambda k: k["exponent_width"] <= k["width"] - 2,
                              "an integer <= width - 2 (at least one mantissa bit)"),)),
    _spec("log", quantize_log, ("width",), {"exponent_bias": None},
          {"width": _int(2), "exponent_bias": _maybe(_int())}),
    _spec("block_fp", quantize_block_fp, ("width", "exponent_width", "block_size"), {"exponent_bias": None},
          {**_ENTRY, "width": _int(2), "block_size": _block}, lambda k: _BLOCK(k, "exponent_width")),
    _spec("block_minifloat", quantize_block_minifloat, ("width", "exponent_width", "exponent_bias_width", "block_size"),
          {}, {**_ENTRY, "exponent_bias_width": _int(1), "block_size": _block},
          lambda k: _BLOCK(k, "exponent_bias_width"), _E_FITS),
    _spec("binary", quantize_binary, (), {"stochastic": False, "bipolar": True},
          {"stochastic": _flag, "bipolar": _flag, "width": _exactly(1), "frac_width": _exactly(0)},
          lambda k: 1.0, fixed=("width", "frac_width")),
    _spec("ternary", quantize_ternary, (), {"scaling_factor": False, "mean": None, "median": None, "max": None},
          {"scaling_factor": _flag, "width": _exactly(2), "frac_width": _exactly(0),
           **{s: _maybe(_number, ("NA", "none", "None")) for s in ("mean", "median", "max")}},
          lambda k: 2.0, fixed=("width", "frac_width")),
    *map(_mx, (quantize_mxint8, quantize_mxfp8_e4m3, quantize_mxfp8_e5m2, quantize_mxfp4)),
)}


def _allowed(check) -> str:
    try:
        check(None)
    except _Bad as bad:
        return str(bad)
    return "a value"


def _keys(format_name: str, prefix: str, entry: Mapping[str, Any]) -> tuple[FormatSpec, dict]:
    """The format's spec and its checked, unprefixed keys read from ``entry`` (which is not changed)."""
    spec = FORMATS.get(format_name)
    if spec is None:
        raise ConfigError("name", format_name, f"one of {sorted(FORMATS)}")
    known = (*spec.required, *spec.optional, *spec.fixed)
    lead = f"{prefix}_"
    for key in entry:  # keys of the other operands (data_in_ next to weight_) are not ours to judge
        if isinstance(key, str) and key.startswith(lead) and key[len(lead):] not in known:
            raise ConfigError(key, entry[key], f"a key the format knows; {spec.describe(prefix)}")
    keys = {}
    for key in known:
        field = lead + key
        if field not in entry:
            if key in spec.required:
                raise ConfigError(field, None, f"{_allowed(spec.checks[key])} (missing); {spec.describe(prefix)}")
            keys[key] = spec.optional.get(key)
            continue
        try:
            keys[key] = spec.checks[key](entry[field])
        except _Bad as bad:
            raise ConfigError(field, entry[field], f"{bad}; {spec.describe(prefix)}") from None
    for key, holds, allowed in spec.relations:
        if not holds(keys):
            raise ConfigError(lead + key, keys[key], f"{allowed}; {spec.describe(prefix)}")
    return spec, keys


def quantizer(format_name: str, prefix: str, entry: Mapping[str, Any]) -> Callable[[Tensor], Tensor]:
    """``x -> quantized x`` for one operand (``prefix``: weight, data_in, bias) of a MASE entry.

    Raises ConfigError naming the key and the keys the format needs when a key is missing,
    unknown (misspelt) or has a bad value.
    """
    spec, keys = _keys(format_name, prefix, entry)
    return partial(spec.fn, **{k: v for k, v in keys.items() if k not in spec.fixed})


def format_keys(format_name: str, prefix: str, entry: Mapping[str, Any]) -> dict:
    """The format's checked keys for ``prefix``, unprefixed, defaults filled in (ConfigError as ``quantizer``)."""
    return _keys(format_name, prefix, entry)[1]


def average_bits(format_name: str, prefix: str, entry: Mapping[str, Any]) -> float:
    """Bits per element, a block's shared exponent or scale spread over the block (mxint8: 8 + 8/32).
    The per-row scale of scaled binary/ternary and of per-channel integer depends on the shape
    and is not counted."""
    spec, keys = _keys(format_name, prefix, entry)
    return float(spec.bits(keys))
