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

import time
from dataclasses import dataclass, field

from torch import fx

import graphprune
from graphprune.infra.config import check_choice
from graphprune.ir.metadata import key
from graphprune.ir.modules import AttentionCore
from graphprune.ir.shapes import refresh_shapes

from .add_quantization_metadata import record_quantization
from .quantize_plan import Plan, check_entry_key, checked_entry, plan_quantizers
from .quantizers import (
    ACTIVATION_PRUNE,
    INSERTED,
    QuantizedAttentionCore,
    Quantizer,
    data_inputs,
    inserted_quantizers,
    quantize_tensor,
    remove_inserted,
    remove_tensor_quantizers,
)

BY = ("type", "name", "regex")
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
            ``config`` wrapper may be left out). ``name`` is a format of ``format_specs.FORMATS``,
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
        object.__setattr__(self, "default", checked_entry("default", self.default))
        entries = {}
        for name, raw in self.entries.items():
            check_entry_key(self.by, name, raw)
            entries[name] = checked_entry(name, raw, REQUIRED.get(name, ("data_in",)) if self.by == "type" else ())
        object.__setattr__(self, "entries", entries)


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
        plans = plan_quantizers(graph, config)
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


def _record(plan: Plan) -> dict:
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
