"""``quantize``: simulated number formats on the graph, with MASE's ``quantize_transform_pass`` config.

Selected nodes get their operands rounded to a format of ``formats.py`` (integer,
minifloat, log, block floating point, binary, ternary, OCP MX), in float, with
straight-through gradients, so the graph still runs, fine-tunes (quantization-aware
training), saves and reloads. How each op type is quantized:

- ``linear``: the input (``data_in_`` keys) by an inserted ``call_module`` node
  (``<node>_data_in_0_quantizer`` in ``graph.module.code``); the weight (``weight_``)
  and the bias (``bias_``, needed when the layer has one) by parametrizations stacked
  after any pruning mask, so pruned weights stay exactly zero (every format maps 0 to
  0 except bipolar ``binary``).
- ``matmul`` / ``bmm``: the two matmuls inside each attention module (q k^T and
  probs v). Its ``AttentionCore`` becomes a ``QuantizedAttentionCore`` that quantizes
  the query and the probabilities with the ``data_in_`` keys, the key and the value
  with the ``weight_`` keys (MASE: a matmul's second operand uses ``weight_``). Either
  key selects them (``matmul`` first). Explicit ``aten.bmm``/``aten.matmul`` nodes
  (DeBERTa's relative-position terms) get inserted quantizers the same way.
- ``add``, ``mul``, ``sub``, ``relu``, ``gelu``, ``tanh``: each floating tensor input
  (``data_in_``) by an inserted node; index and mask arithmetic is left alone.
- ``layer_norm``: the input (``data_in_``); its weight and bias when the entry has
  ``weight_`` / ``bias_`` keys.

Calibrated widths (``integer``): any ``<prefix>_frac_width`` may be ``"auto"``, the
largest frac width at which the tensor's range fits ``<prefix>_width`` signed bits
without saturating (``formats.fitting_frac_width``; a range of exactly 2^k gets
width - 2 - k). The range is max(|min|, |max|), or with ``<prefix>_range =
"percentile"`` the larger magnitude of the outermost percentiles ``profile_statistics``
recorded. Weights and biases are fitted to the tensor itself, read when the pass runs
(pruning masks applied); activations (``data_in_``, the attention operands) to the
statistics ``profile_statistics`` left on the node, and without them the pass stops,
before changing anything, saying to run it first. The quantizer then holds the fitted
integer, a fixed grid. ``weight_per_channel = true`` (with ``weight_frac_width =
"auto"``, Linear weights only) gives each output row its own power-of-two scale,
fitted to the row's max |w| on every forward pass, so during quantization-aware
training a row's scale follows its weights and its largest weight is never clipped.
The fitted frac widths are in the node metadata (``frac_widths``; a list, one per row,
for per-channel weights, as they were when the pass ran) and in ``info``.

Running the pass again replaces the quantizers of the nodes it selects (never two on
one tensor); nodes it skips keep theirs. Each quantized node gets
``node.meta["graphprune.quantize"]`` (type, format, keys, bits per operand, fitted frac widths) and the
graph ``graph.meta["quantize"]`` (average bits per weight and per activation, per layer
and in total), which ``graph.summary()`` and ``graphprune info`` show.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import fx, nn

import graphprune
from graphprune.infra.config import ConfigError, check_choice
from graphprune.ir.masks import pruning_hooks
from graphprune.ir.metadata import key
from graphprune.ir.modules import AttentionCore
from graphprune.ir.shapes import refresh_shapes

from .add_quantization_metadata import record_quantization
from .formats import FORMATS, RANGE_PERCENTILES, fitting_frac_width, format_keys, row_frac_widths, tensor_range
from .profile_statistics import STATISTICS, float_tensor
from .quantizers import (
    ACTIVATION_PRUNE,
    ATTENTION_OPERANDS,
    INSERTED,
    OP_TYPES,
    QuantizedAttentionCore,
    Quantizer,
    data_inputs,
    input_prefix,
    inserted_quantizers,
    op_type,
    quantize_tensor,
    remove_inserted,
    remove_tensor_quantizers,
)

BY = ("type", "name", "regex")
PREFIXES = ("data_in", "weight", "bias")
SKIP = ("NA", "none", "None")  # MASE's TOML spelling of "name": None
META = key("quantize")
# The operand prefixes an op needs (a Linear's bias and a LayerNorm's weight and bias are added per module).
REQUIRED = {"linear": ("data_in", "weight"), "matmul": ("data_in", "weight"), "bmm": ("data_in", "weight")}


@dataclass(frozen=True)
class QuantizeConfig:
    """MASE's ``quantize_transform_pass`` arguments.

    Fields:
        by: how entry keys select nodes: ``type`` (default; keys are op types: linear,
            matmul, bmm, add, mul, sub, relu, gelu, tanh, layer_norm) | ``name`` (a node
            name such as ``bert_encoder_layer_0_attention_self_query``, or a module path
            such as ``bert.encoder.layer.0.attention.self.query``) | ``regex`` (patterns
            matched in full against node names and module paths; the first that matches wins).
        default: the entry for quantizable nodes no key selects (default: skip them).
        <type, name or pattern>: an entry ``{"config": {"name": FORMAT, <keys>}}`` (the
            ``config`` wrapper may be left out). ``name`` is a format of ``formats.FORMATS``,
            or None / "NA" to skip the node; the keys are the format's, prefixed with
            ``data_in_``, ``weight_`` or ``bias_`` (``weight_width``, ``data_in_frac_width``...);
            ``bypass = true`` also skips. A Python None entry skips too. ``integer`` also takes
            ``<prefix>_frac_width = "auto"``, ``<prefix>_range = "max" | "percentile"`` and
            ``weight_per_channel = true`` (see the module docstring; activations need
            ``profile_statistics`` first).
    """

    EXTRA_FIELD = "entries"

    by: str = "type"
    default: dict | None = None
    entries: dict = field(default_factory=dict)

    def __post_init__(self):
        check_choice("by", self.by, BY)
        object.__setattr__(self, "default", _checked_entry("default", self.default))
        entries = {}
        for name, raw in self.entries.items():
            _check_key(self.by, name, raw)
            entries[name] = _checked_entry(name, raw, REQUIRED.get(name, ("data_in",)) if self.by == "type" else ())
        object.__setattr__(self, "entries", entries)


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


def _checked_entry(name: str, raw, required: tuple[str, ...] = ()) -> dict | None:
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


def _check_key(by: str, name, value) -> None:
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
class _Plan:
    node: fx.Node
    op: str  # linear, matmul, layer_norm, add, ...
    selected_by: str  # the entry's key (or "default")
    quantizers: dict  # operand (data_in_0, weight, bias, query, ...) -> Quantizer
    written: dict  # the format's name and keys as the entry gives them
    frac_widths: dict = field(default_factory=dict)  # operand -> fitted frac width ("auto"), a list per row


def _lookup(config: QuantizeConfig, node: fx.Node, op: str, used: set) -> tuple[str, dict | None]:
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


def _plan(graph, config: QuantizeConfig) -> list[_Plan]:
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
        plans.append(_Plan(node, op, selected_by, quantizers, written, frac_widths))
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


# ---- the pass -------------------------------------------------------------------------


@graphprune.register_pass("quantize", config=QuantizeConfig)
def quantize(graph, config: QuantizeConfig):
    """Quantize linear, attention-matmul, element-wise and layer-norm operands to simulated number formats (MASE config).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "quantize", {
        ...     "by": "type",
        ...     "default": {"config": {"name": None}},
        ...     "linear": {"config": {"name": "integer",
        ...                           "data_in_width": 8, "data_in_frac_width": 4,
        ...                           "weight_width": 8, "weight_frac_width": 4,
        ...                           "bias_width": 8, "bias_frac_width": 4}}})
        >>> print(graph.summary())             # format and average bits per layer
        >>> graphprune.finetune(graph, ...)    # quantization-aware training (straight-through)

        Calibrated: fit the frac widths to profiled ranges instead of choosing them by hand:
        >>> graph, _ = graphprune.run_pass(graph, "profile_statistics", {"num_samples": 64}, data=calibration)
        >>> graph, info = graphprune.run_pass(graph, "quantize", {"linear": {"name": "integer",
        ...     "data_in_width": 8, "data_in_frac_width": "auto", "data_in_range": "percentile",
        ...     "weight_width": 8, "weight_frac_width": "auto", "weight_per_channel": True,
        ...     "bias_width": 8, "bias_frac_width": "auto"}})
        >>> info["frac_widths"]                 # per node and operand; "lo..hi" over a per-channel weight's rows
    """
    start = time.perf_counter()
    try:
        plans = _plan(graph, config)
    except ValueError as error:  # ConfigError included: name the pass, as for errors in the config itself
        raise ValueError(f"pass 'quantize': {error}") from None
    if not plans:
        return graph, {"quantized": 0, "seconds": round(time.perf_counter() - start, 3)}

    gm = graph.module
    for plan in plans:
        for q in plan.quantizers.values():
            q.train(gm.training)
    inserted = inserted_quantizers(gm)
    stripped, new_nodes, counts, fitted = set(), [], {}, {}
    for plan in plans:
        node = plan.node
        existing = dict(inserted.get(node.name, {}))
        if node.op == "call_module" and node.target not in stripped:
            stripped.add(node.target)
            module = gm.get_submodule(node.target)
            if isinstance(module, AttentionCore):
                gm.set_submodule(node.target, QuantizedAttentionCore.replacing(module, plan.quantizers))
            else:
                remove_tensor_quantizers(module)
                for tensor_name in ("weight", "bias"):
                    if tensor_name in plan.quantizers:
                        quantize_tensor(module, tensor_name, plan.quantizers[tensor_name])
        for index, _ in data_inputs(node, plan.op):
            old = existing.pop(index, None)
            if old is not None:  # an earlier run's quantizer node: keep the node, swap its format
                gm.set_submodule(old.target, plan.quantizers[f"data_in_{index}"])
            else:
                new_nodes.append(_insert(gm, node, index, plan.quantizers[f"data_in_{index}"]))
        for old in existing.values():
            remove_inserted(gm, old)
        node.meta[META] = _record(plan)
        counts[plan.op] = counts.get(plan.op, 0) + 1
        if plan.frac_widths:
            fitted[node.name] = {k: f"{min(v)}..{max(v)}" if isinstance(v, list) else v for k, v in plan.frac_widths.items()}
    gm.graph.lint()
    gm.recompile()
    unknown = [n for n in new_nodes if "val" not in n.meta]
    if unknown:
        refresh_shapes(gm, unknown)
    totals = record_quantization(graph)["totals"]
    return graph, {
        "quantized": len(plans),
        "by_type": counts,
        "formats": sorted({q.format for p in plans for q in p.quantizers.values()}),
        "weight_bits": totals["weight_bits"],
        "activation_bits": totals["activation_bits"],
        **({"frac_widths": fitted} if fitted else {}),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _record(plan: _Plan) -> dict:
    record = {
        "type": plan.op,
        "format": plan.written["name"],
        "selected_by": plan.selected_by,
        "config": dict(plan.written),
        "bits": {operand: q.bits for operand, q in plan.quantizers.items()},
    }
    if plan.frac_widths:  # what "auto" became, per operand (a list, one per row, for per-channel weights)
        record["frac_widths"] = dict(plan.frac_widths)
    return record


def _insert(gm: fx.GraphModule, node: fx.Node, index: int, q: Quantizer) -> fx.Node:
    """Feed ``node``'s argument ``index`` through ``q``, as a new ``call_module`` node."""
    name = f"{node.name}_data_in_{index}_quantizer"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, q)
    source = node.args[index]
    # A Linear input that prune_activation masks is quantized before the mask, so that
    # prune_activation can still find and replace its own nodes later.
    pruning = []
    if source.meta.get(ACTIVATION_PRUNE, {}).get("feeds") == node.name:
        pruning = [n for n in gm.graph.nodes if n.meta.get(ACTIVATION_PRUNE, {}).get("feeds") == node.name]
        source = source.args[0]
    with gm.graph.inserting_before(pruning[0] if pruning else node):
        new = gm.graph.call_module(name, (source,))
    new.meta[INSERTED] = {"feeds": node.name, "index": index}
    if "val" in source.meta:
        # a format keeps shape and dtype; fake-running it costs ~45 ms a node (symbolic shapes)
        new.meta["val"] = source.meta["val"]
    if pruning:
        for n in pruning:
            n.replace_input_with(source, new)
    else:
        args = list(node.args)
        args[index] = new
        node.args = tuple(args)
    return new
