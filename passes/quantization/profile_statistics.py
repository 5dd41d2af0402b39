"""``profile_statistics``: per-tensor ranges and moments on calibration data, for calibrating quantization.

Like MASE's ``profile_statistics_analysis_pass``: runs calibration batches through the
graph (eval mode, an ``fx.Interpreter`` run) and records, per tensor, ``min``, ``max``,
``mean``, ``variance`` (unbiased, as ``torch.var``), ``abs_mean``, ``count`` and the
chosen ``percentiles``. Only the numbers are kept, never the tensors.

Which tensors (config ``nodes``):

- ``weights``: the weight and bias of every Linear and LayerNorm node, as the layer
  uses them before any quantizer (pruning masks applied). Needs no data.
- ``quantizable`` (default): the weights, and the inputs of every node the ``quantize``
  pass can quantize (``quantizers.op_type`` / ``data_inputs``, so the two always
  agree): ``data_in_0``, ``data_in_1``, ... and, for the attention modules, the
  ``query``, ``key``, ``value`` they take and the softmax ``probs`` they compute. An
  input that an earlier ``quantize`` run already feeds through a quantizer is measured
  before it (the float value the quantizer sees).
- ``all``: the above, plus every floating tensor a node outputs, as ``data_out_0``.

Padding tokens are left out: a value is counted only at positions the batch's
attention mask marks real, along the batch and sequence dimensions of the node's
symbolic shape (both query and key positions for ``probs``). Moments are exact
(float64, merged batch by batch). Percentiles are exact up to ``max_values`` values
per tensor (default 1,000,000); past it they are taken over a uniform random sample
of ``max_values`` of the values (seeded, drawn batch by batch without replacement),
which bounds memory; ``count`` and ``sample`` in the record say which case applies.

Stored, JSON-able: ``node.meta["graphprune.statistics"] = {"weight": {...}, "bias":
{...}, "data_in_0": {...}, ...}`` with ``{"min", "max", "mean", "variance", "abs_mean",
"count", "sample", "percentiles": {"0.1": v, "99.9": v}}``, and ``graph.meta["statistics"]``
(``num_samples``, ``tokens``, ``percentiles``, ``nodes``, ``max_values``). The
``quantize`` pass reads them for ``<prefix>_frac_width = "auto"``.

Config fields:
    nodes: quantizable (default) | all | weights (no data needed).
    num_samples: calibration examples (default 64).
    batch_size: examples per forward pass when the data is examples to batch (default:
        the CalibrationData's, 32); ready batches are used as they come.
    percentiles: percentages to record (default [0.1, 99.9]); may be empty.
    max_values: values kept per tensor for the percentiles (default 1,000,000, at most 2^24).
    seed: for the calibration subset and the percentile sample.
    progress: a progress bar over batches (default true).

Example:
    >>> graph, info = graphprune.run_pass(graph, "profile_statistics", {"num_samples": 128}, data=splits["train"])
    >>> print(info["table"])                   # max |value| per layer and tensor kind
    >>> graph.node("bert_encoder_layer_0_intermediate_dense").meta["graphprune.statistics"]["data_in_0"]["max"]
    >>> graph, _ = graphprune.run_pass(graph, "quantize", {"linear": {"name": "integer",
    ...     "data_in_width": 8, "data_in_frac_width": "auto", "weight_width": 8, "weight_frac_width": "auto",
    ...     "bias_width": 8, "bias_frac_width": "auto"}})
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.calls import model_call_of
from graphprune.ir.metadata import key
from graphprune.ir.shapes import dim_names, shape_list
from graphprune.training.calibration import CalibrationData, calibration_batches, model_inputs

from .formats import RANGE_PERCENTILES
from .quantizers import (
    ACTIVATION_PRUNE,
    INSERTED,
    QuantizedAttentionCore,
    Quantizer,
    attention_probs,
    data_inputs,
    is_float,
    op_type,
)
from .running_statistics import RunningStatistics, tensor_statistics
from ..analysis.init_metadata import nodes_by_section

NAME = "profile_statistics"
STATISTICS = key("statistics")
NODES = ("quantizable", "all", "weights")
ATTENTION_INPUTS = ("query", "key", "value")  # the attention module's arguments, in order


@dataclass(frozen=True)
class ProfileStatisticsConfig:
    """Fields: nodes, num_samples, batch_size, percentiles, max_values, seed, progress (see the module docstring)."""

    nodes: str = "quantizable"
    num_samples: int = 64
    batch_size: int | None = None
    percentiles: tuple[float, ...] = RANGE_PERCENTILES
    max_values: int = 1_000_000
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        check_choice("nodes", self.nodes, NODES)
        check_range("num_samples", self.num_samples, 1)
        if self.batch_size is not None:
            check_range("batch_size", self.batch_size, 1)
        for p in self.percentiles:
            if not (math.isfinite(p) and 0 <= p <= 100):
                raise ConfigError("percentiles", list(self.percentiles), "a list of percentages, each 0 <= p <= 100")
        object.__setattr__(self, "percentiles", tuple(sorted(set(self.percentiles))))
        check_range("max_values", self.max_values, 1, 2**24)  # torch.quantile's limit


def float_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as the layer computes it but before any :class:`Quantizer`: masks applied."""
    if parametrize.is_parametrized(module, name):
        value = module.parametrizations[name].original
        for p in module.parametrizations[name]:
            if not isinstance(p, Quantizer):
                value = p(value)
        return value.detach()
    value = getattr(module, name, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def measured_input(node: fx.Node, index: int) -> fx.Node:
    """The node whose value ``node``'s input ``index`` is quantized from: before an inserted quantizer
    (and before prune_activation's nodes, which ``quantize`` puts after its quantizer)."""
    source = node.args[index]
    if source.meta.get(ACTIVATION_PRUNE, {}).get("feeds") == node.name:
        source = source.args[0]
    if INSERTED in source.meta:
        source = source.args[0]
    return source


@graphprune.register_pass(NAME, config=ProfileStatisticsConfig, kind="analysis")
def profile_statistics(graph, config: ProfileStatisticsConfig, data=None):
    """Record min, max, mean, variance, abs-mean and percentiles of weights and activations (calibration data).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "profile_statistics", {"num_samples": 64}, data=splits["train"])
        >>> print(info["table"])
    """
    start = time.perf_counter()
    gm = graph.module
    if config.nodes != "weights" and data is None:
        raise ValueError(
            f"pass '{NAME}' needs calibration data for activation statistics: pass data=... to run_pass (a "
            "TextDataset, tokenised examples, ready batches or CalibrationData), or set nodes = 'weights'"
        )
    for node in gm.graph.nodes:  # an earlier profile's records would mix with this one's
        node.meta.pop(STATISTICS, None)

    records: dict[fx.Node, dict] = {}
    weights: dict[int, dict] = {}  # a module called by several nodes (ALBERT) is measured once
    watch: dict[fx.Node, list[tuple[fx.Node, str]]] = {}  # value -> (node, operand) records it feeds
    cores: list[fx.Node] = []
    for node in gm.graph.nodes:
        op = op_type(gm, node)
        if op is not None and node.op == "call_module" and op in ("linear", "layer_norm"):
            module = gm.get_submodule(node.target)
            if id(module) not in weights:
                weights[id(module)] = {
                    name: tensor_statistics(t, config.percentiles)
                    for name in ("weight", "bias") if (t := float_tensor(module, name)) is not None
                }
            records.setdefault(node, {}).update(copy.deepcopy(weights[id(module)]))  # each node its own copy
        if config.nodes == "weights":
            continue
        if op == "matmul" and node.op == "call_module":
            for index, operand in enumerate(ATTENTION_INPUTS):
                watch.setdefault(node.args[index], []).append((node, operand))
            cores.append(node)
        elif op is not None:
            for index, _ in data_inputs(node, op):
                watch.setdefault(measured_input(node, index), []).append((node, f"data_in_{index}"))
        if config.nodes == "all" and node.op != "output" and is_float(node):
            watch.setdefault(node, []).append((node, "data_out_0"))

    info = {"tensors": 0, "num_samples": 0, "tokens": None}
    if config.nodes != "weights":
        spec = data
        if config.batch_size is not None:
            spec = (dataclasses.replace(data, batch_size=config.batch_size) if isinstance(data, CalibrationData)
                    else CalibrationData(data, batch_size=config.batch_size))
        batches = calibration_batches(graph, spec, num_samples=config.num_samples, seed=config.seed, caller=f"pass '{NAME}'")
        running, tokens = _profile(graph, batches, watch, cores, config)
        for (node, operand), run in running.items():
            if run.count:  # a value that was never a floating tensor has nothing to record
                records.setdefault(node, {})[operand] = run.record(config.percentiles)
        info["num_samples"] = sum(len(b["input_ids"]) for b in batches)
        info["tokens"] = tokens
    for node, record in records.items():
        node.meta[STATISTICS] = record
    graph.meta["statistics"] = {
        "nodes": config.nodes, "num_samples": info["num_samples"], "tokens": info["tokens"],
        "percentiles": list(config.percentiles), "max_values": config.max_values,
    }
    info["tensors"] = sum(len(r) for r in records.values())
    info["table"] = statistics_table(graph)
    info["seconds"] = round(time.perf_counter() - start, 3)
    return graph, info


class _Recorder(fx.Interpreter):
    """Runs the graph node by node and hands watched values (and the attention probabilities) over."""

    def __init__(self, gm, watch, cores, on_value, on_probs):
        super().__init__(gm)
        self.watch, self.cores, self.on_value, self.on_probs = watch, set(cores), on_value, on_probs

    def run_node(self, n):
        result = super().run_node(n)
        if n in self.watch:
            self.on_value(n, result)
        if n in self.cores:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.on_probs(n, args, kwargs)
        return result


@torch.no_grad()
def _profile(graph, batches, watch, cores, config) -> tuple[dict, int]:
    gm = graph.module
    rng, gen = np.random.default_rng(config.seed), torch.Generator().manual_seed(config.seed)
    running: dict[tuple[fx.Node, str], RunningStatistics] = {}
    for source, uses in watch.items():
        for use in uses:
            running[use] = RunningStatistics(config.max_values if config.percentiles else 0, rng, gen)
    for core in cores:
        running[(core, "probs")] = RunningStatistics(config.max_values if config.percentiles else 0, rng, gen)
    names = dim_names(gm)
    token_dims = {source: _token_dims(source, names) for source in watch}
    state: dict = {}

    def on_value(source, value):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return
        real = _real_values(value, token_dims[source], state["mask"])
        for use in watch[source]:
            running[use].add(real)

    def on_probs(core, args, kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        probs = _attention_probs(gm.get_submodule(core.target), args[0], args[1], mask)
        real = state["mask"]
        if real is not None and probs.dim() == 4 and probs.shape[0] == real.shape[0] and probs.shape[2:] == (real.shape[1],) * 2:
            keep = (real[:, None, :, None] & real[:, None, None, :]).expand_as(probs)
            probs = probs[keep]
        running[(core, "probs")].add(probs)

    recorder = _Recorder(gm, watch, cores, on_value, on_probs)
    call = model_call_of(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    was_training = gm.training
    gm.eval()
    tokens = 0
    try:
        for batch in tqdm(batches, desc=NAME, disable=not config.progress, leave=False):
            inputs = model_inputs(batch, graph)
            values = call.bind(inputs, {})[:-1] if call is not None else [inputs[n.target] for n in placeholders]
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            tokens += int(state["mask"].sum()) if state["mask"] is not None else batch["input_ids"].numel()
            recorder.run(*values, enable_io_processing=False)
    finally:
        gm.train(was_training)
    return running, tokens


def _token_dims(node: fx.Node, names) -> tuple[int | None, list[int]]:
    """The batch dimension and the sequence dimensions of ``node``'s value, from its symbolic shape."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None, []
    shape = shape_list(val, names)
    batch = shape.index("batch") if "batch" in shape else None
    return batch, [i for i, size in enumerate(shape) if size == "seq"]


def _real_values(x: torch.Tensor, dims, mask: torch.Tensor | None) -> torch.Tensor:
    """The values of ``x`` at real (not padding) token positions, flattened."""
    batch, seqs = dims
    if mask is None or batch is None or not seqs:
        return x.reshape(-1)  # no token axes (pooled, per-position tables) or no padding
    b, s = mask.shape
    if x.shape[batch] != b or any(x.shape[i] != s for i in seqs):
        return x.reshape(-1)
    keep = None
    for i in seqs:
        shape = [1] * x.dim()
        shape[batch], shape[i] = b, s
        m = (mask if batch < i else mask.T).reshape(shape)
        keep = m if keep is None else keep & m
    return x[keep.expand_as(x)]


def _attention_probs(core: nn.Module, query, key_, mask) -> torch.Tensor:
    """softmax(q k^T * scale + mask) as the attention module computes it in eval mode (no dropout)."""
    if isinstance(core, QuantizedAttentionCore):
        query, key_ = core.query_quantizer(query), core.key_quantizer(key_)
    return attention_probs(query, key_, getattr(core, "scale", None), getattr(core, "is_causal", False), mask)


# ---- the table ------------------------------------------------------------------------

KINDS = ("weight", "bias", "data_in", "query", "key", "value", "probs", "data_out")


def statistics_table(graph) -> str:
    """Max |value| per layer (embeddings, 0, 1, ..., head) and tensor kind, over the recorded tensors."""
    rows: dict[object, dict[str, float]] = {}
    for node, section in nodes_by_section(graph):
        record = node.meta.get(STATISTICS)
        if not record:
            continue
        row = rows.setdefault(section, {})
        for operand, stats in record.items():
            kind = operand.rsplit("_", 1)[0] if operand.startswith(("data_in_", "data_out_")) else operand
            row[kind] = max(row.get(kind, 0.0), abs(stats["min"]), abs(stats["max"]))
    kinds = [k for k in KINDS if any(k in row for row in rows.values())]
    order = (["embeddings"] if "embeddings" in rows else []) + sorted(k for k in rows if isinstance(k, int))
    order += ["head"] if "head" in rows else []
    lines = ["max |value| per layer and tensor (profile_statistics)",
             f"{'layer':>10} " + " ".join(f"{k:>9}" for k in kinds)]
    for name in order:
        lines.append(f"{name!s:>10} " + " ".join(f"{rows[name][k]:9.4g}" if k in rows[name] else f"{'-':>9}" for k in kinds))
    return "\n".join(lines)
