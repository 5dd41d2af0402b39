"""The ``quantize`` pass's plan: its config entries read and checked, and per node the quantizers to add.

Everything here checks before anything changes: ``plan_quantizers`` returns one ``Plan`` per
selected node (its operands' quantizers, the keys as written, the frac widths "auto" became)
or raises, and only then does the pass edit the graph. See ``quantize``'s docstring for the
config and what "auto" fits.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import fx, nn

from graphprune.infra.config import ConfigError
from graphprune.ir.masks import pruning_hooks

from .format_specs import FORMATS, format_keys
from .formats import RANGE_PERCENTILES, fitting_frac_width, row_frac_widths, tensor_range
from .profile_statistics import STATISTICS, float_tensor
from .quantizers import ATTENTION_OPERANDS, OP_TYPES, Quantizer, data_inputs, input_prefix, op_type

PREFIXES = ("data_in", "weight", "bias")
SKIP = ("NA", "none", "None")  # MASE's TOML spelling of "name": None


def _body(name: str, entry: Mapping) -> tuple[str, Mapping]:
    """The entry's settings and the path that names them in messages (``linear.config``)."""
    return (f"{name}.config", entry["config"]) if "config" in entry else (name, entry)


def _format_of(entry: Mapping | None) -> str | None:
    """The entry's format, or None when it skips the node."""
    if entry is None:
        return None
    _, body = _body("", entry)
    if body is None or body.get("bypass") or body["name"] is None or body["name"] in SKIP:
        return None
    return body["name"]


def checked_entry(name: str, raw, required: tuple[str, ...] = ()) -> dict | None:
    """A checked deep copy of a MASE entry (the caller's dict is never changed)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(name, raw, 'a table {"config": {"name": FORMAT, ...keys}}, or none to skip')
    if "config" in raw and len(raw) > 1:
        other = next(k for k in raw if k != "config")
        raise ConfigError(f"{name}.{other}", raw[other], "only 'config' beside an entry's config table")
    where, body = _body(name, raw)
    if body is None:
        return copy.deepcopy(dict(raw))
    if not isinstance(body, Mapping):
        raise ConfigError(where, body, "a table with name (a format) and the format's keys")
    if "name" not in body:
        raise ConfigError(f"{where}.name", None, f"a format, one of {sorted(FORMATS)}, or none to skip (missing)")
    fmt = body["name"]
    if fmt is not None and not (isinstance(fmt, str) and (fmt in FORMATS or fmt in SKIP)):
        raise ConfigError(f"{where}.name", fmt, f"one of {sorted(FORMATS)}, or none / 'NA' to skip")
    if not isinstance(body.get("bypass", False), bool):
        raise ConfigError(f"{where}.bypass", body["bypass"], "true or false")
    leads = tuple(f"{p}_" for p in PREFIXES)
    for k, v in body.items():
        if k not in ("name", "bypass") and not (isinstance(k, str) and k.startswith(leads)):
            raise ConfigError(f"{where}.{k}", v, "name, bypass, or a format key starting with data_in_, weight_ or bias_ "
                              "(inputs, weights and biases are quantized; outputs are the next op's inputs)")
    entry = copy.deepcopy(dict(raw))
    if _format_of(entry) is not None:
        # every operand the entry mentions must be complete and spelt right, used or not
        mentioned = {p for p in PREFIXES if any(isinstance(k, str) and k.startswith(f"{p}_") for k in body)}
        for prefix in sorted(mentioned | set(required)):
            _quantizer(name, entry, prefix)
    return entry


def _quantizer(name: str, entry: Mapping, prefix: str, needed_by: str = "") -> Quantizer:
    where, body = _body(name, entry)
    lead = f"{prefix}_"
    keys = {k: v for k, v in body.items() if isinstance(k, str) and k.startswith(lead)}
    try:
        return Quantizer(body["name"], prefix, keys)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error.field}", error.value, error.allowed + needed_by) from None


def check_entry_key(by: str, name, value) -> None:
    if not isinstance(name, str):
        raise ConfigError(str(name), value, "a string key")
    if by == "type" and name not in OP_TYPES:
        raise ConfigError(name, value, f"the key to be a config field (by, default) or, with by = 'type', an op type: {', '.join(OP_TYPES)}")
    if by == "regex":
        try:
            re.compile(name)
        except re.error as error:
            raise ConfigError(name, value, f"the key to be a regular expression over node names and module paths ({error})") from None


# ---- planning: every check before anything changes ---------------------------------


@dataclass
class Plan:
    node: fx.Node
    op: str  # linear, matmul, layer_norm, add, ...
    selected_by: str  # the entry's key (or "default")
    quantizers: dict  # operand (data_in_0, weight, bias, query, ...) -> Quantizer
    written: dict  # the format's name and keys as the entry gives them
    frac_widths: dict = field(default_factory=dict)  # operand -> fitted frac width ("auto"), a list per row


def _lookup(config, node: fx.Node, op: str, used: set) -> tuple[str, dict | None]:
    entries = config.entries
    if config.by == "type":
        for k in {"matmul": ("matmul", "bmm"), "bmm": ("bmm", "matmul")}.get(op, (op,)):
            if k in entries:
                return k, entries[k]
    else:
        names = [node.name] + ([node.target] if node.op == "call_module" else [])
        for k, entry in entries.items():
            hit = any(k == n for n in names) if config.by == "name" else any(re.fullmatch(k, n) for n in names)
            if hit:
                used.add(k)
                return k, entry
    return "default", config.default


def plan_quantizers(graph, config) -> list[Plan]:
    """One ``Plan`` per node that ``config`` (a ``QuantizeConfig``) quantizes; raises before any change."""
    gm = graph.module
    plans, used, tensors = [], set(), {}
    for node in gm.graph.nodes:
        op = op_type(gm, node)
        if op is None:
            continue
        selected_by, entry = _lookup(config, node, op, used)
        fmt = _format_of(entry)
        if fmt is None:
            continue
        needed_by = f" (for {op} node {node.name!r})"
        quantizers = {}
        attention = node.op == "call_module" and op == "matmul"
        if attention:
            for operand, prefix in ATTENTION_OPERANDS:
                quantizers[operand] = _quantizer(selected_by, entry, prefix, needed_by)
        for index, _ in data_inputs(node, op):
            quantizers[f"data_in_{index}"] = _quantizer(selected_by, entry, input_prefix(op, index), needed_by)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "call_module" and op in ("linear", "layer_norm"):
            for tensor_name in ("weight", "bias"):
                if getattr(module, tensor_name, None) is None:
                    continue
                _, body = _body(selected_by, entry)
                if op == "linear" or any(isinstance(k, str) and k.startswith(f"{tensor_name}_") for k in body):
                    quantizers[tensor_name] = _quantizer(selected_by, entry, tensor_name, needed_by)
        written = {"name": fmt}  # the keys as the entry writes them ("auto" included), for the metadata
        for q in quantizers.values():
            written.update(q.keys)
        frac_widths = _fit_frac_widths(graph, node, op, module, selected_by, entry, quantizers)
        if node.op == "call_module" and op in ("linear", "layer_norm"):
            _check_module(node, module, quantizers, tensors)
        if attention:
            _check_module(node, None, quantizers, tensors)
        plans.append(Plan(node, op, selected_by, quantizers, written, frac_widths))
    if config.by != "type":
        for k, entry in config.entries.items():
            if k not in used:
                how = "a node name or module path" if config.by == "name" else "a pattern matching, in full, a node name or module path"
                raise ConfigError(k, entry, f"{how} of a node the pass can quantize ({', '.join(OP_TYPES)}); "
                                  f"for example {_examples(gm)}")
    return plans


def _fit_frac_widths(graph, node, op, module, selected_by, entry, quantizers: dict) -> dict:
    """Resolve ``<prefix>_frac_width = "auto"`` of ``node``'s operands in place; return operand -> frac width.

    A weight or bias is fitted to the tensor itself (after pruning masks, before any
    quantizer), read now, so it is never stale; an activation to the range that
    ``profile_statistics`` recorded on ``node`` (its max |value|, or its outermost
    percentiles with ``<prefix>_range = "percentile"``), and fails without one. The
    quantizer then holds the fitted integer: the grid is fixed, as for a hand-written
    frac width. ``<prefix>_per_channel`` (Linear weights only) stays computed on the
    fly, one frac width per output row; the rows' current ones are returned.
    """
    where, _ = _body(selected_by, entry)
    recorded = node.meta.get(STATISTICS) or {}
    fitted = {}
    for operand, q in list(quantizers.items()):
        if q.format != "integer":
            continue
        keys = format_keys(q.format, q.prefix, q.keys)
        if keys["frac_width"] != "auto":
            continue
        field_name = f"{where}.{q.prefix}_frac_width"
        tensor = float_tensor(module, operand) if operand in ("weight", "bias") and op in ("linear", "layer_norm") else None
        if keys["per_channel"]:
            if operand != "weight" or op != "linear":
                raise ConfigError(f"{where}.{q.prefix}_per_channel", True, f"false for the {operand} of {op} node {node.name!r}: "
                                  "per-channel scales are for Linear weights (one per output row)")
            fitted[operand] = row_frac_widths(tensor, keys["width"], keys["floor"]).tolist()
            continue
        if tensor is not None:
            percentiles = (graph.meta.get("statistics") or {}).get("percentiles") or RANGE_PERCENTILES
            maxabs = float(tensor_range(tensor, keys["range"], percentiles))
        elif node.op == "call_module" and op == "matmul":
            # the attention module's own quantizers serve every node that calls it (ALBERT's shared
            # layer): fitted to the widest of their ranges (inserted input quantizers are per node)
            callers = [n for n in graph.module.graph.nodes if n.op == "call_module" and n.target == node.target]
            maxabs = max(_profiled_range((n.meta.get(STATISTICS) or {}).get(operand), keys["range"], field_name, operand, op, n)
                         for n in callers)
        else:
            maxabs = _profiled_range(recorded.get(operand), keys["range"], field_name, operand, op, node)
        if not math.isfinite(maxabs):
            raise ValueError(f"field {field_name!r} = 'auto': the range of {operand} of {op} node {node.name!r} is {maxabs}; "
                             "set a frac width by hand")
        f = int(fitting_frac_width(maxabs, keys["width"], keys["floor"]))
        fixed = {k: v for k, v in q.keys.items() if k != f"{q.prefix}_range"}
        fixed[f"{q.prefix}_frac_width"] = f
        quantizers[operand] = Quantizer(q.format, q.prefix, fixed)
        fitted[operand] = f
    return fitted


def _profiled_range(stats: dict | None, range_: str, field_name: str, operand: str, op: str, node: fx.Node) -> float:
    if not stats:
        raise ValueError(f"field {field_name!r} = 'auto' needs the range of {operand} of {op} node {node.name!r}, which has "
                         "no statistics: run the 'profile_statistics' pass first (with calibration data=...)")
    if range_ == "max":
        return max(abs(stats["min"]), abs(stats["max"]))
    recorded = stats.get("percentiles") or {}
    if not recorded:
        raise ValueError(f"field {field_name!r} = 'auto' with range 'percentile' needs percentiles of {operand} of {op} node "
                         f"{node.name!r}: run 'profile_statistics' with percentiles (for example [0.1, 99.9])")
    ends = sorted(recorded, key=float)
    return max(abs(recorded[ends[0]]), abs(recorded[ends[-1]]))


def _check_module(node: fx.Node, module: nn.Module | None, quantizers: dict, seen: dict) -> None:
    """A module called by several nodes (ALBERT's shared layer) gets one set of tensor quantizers."""
    if module is not None and pruning_hooks(module):
        raise ValueError(f"module {node.target!r} has torch.nn.utils.prune masks; run the 'commit_masks' pass before quantizing it")
    owned = {k: q.config() for k, q in quantizers.items() if k in ("weight", "bias", *(n for n, _ in ATTENTION_OPERANDS))}
    earlier = seen.setdefault(node.target, (node.name, owned))
    if earlier[1] != owned:
        raise ValueError(f"module {node.target!r} is shared by nodes {earlier[0]!r} and {node.name!r}, which the config "
                         "quantizes differently; its weights can hold one format")


def _examples(gm: fx.GraphModule) -> str:
    names = [n.name for n in gm.graph.nodes if op_type(gm, n) is not None]
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
