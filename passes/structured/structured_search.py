"""``structured_search``: choose heads and FFN neurons to remove under a FLOPs or latency budget, and repair, with no retraining.

Two methods share the calibration data, the mask gradients, the budget and the
least-squares repair:

- ``kwon`` (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
  Transformers"): the diagonal Fisher information of every head and neuron mask
  (task loss, per example); a global search for the number of heads and neurons that
  keeps the most Fisher importance within the budget; per-layer mask rearrangement
  with the layer's full Fisher block (greedy swaps that lower ``(1-m)^T F (1-m)``);
  then layer by layer, bottom-up, each kept unit's mask value tuned by least squares
  so the layer's output projection matches the dense graph's output on the inputs of
  the graph as pruned so far.
- ``kprune`` (Park et al. 2024, "Accurate Retraining-free Pruning for Pretrained
  Encoder-based Language Models"): layer by layer, bottom-up, scores recomputed on the
  partly pruned graph: a predictive score (the Fisher of the KL divergence from the
  dense graph's predictions: ``sum_x sum_y p_dense(y|x) (d log p(y|x) / d mask)^2``)
  plus a representational score (the energy a unit adds to its sublayer's output),
  each divided by its mean; units are chosen by score per FLOP (or per ms) for the
  remaining budget, the layer's share is applied, and its output projection (weights
  and bias) is re-solved by least squares against the dense sublayer output.

The budget is a fraction of the graph's FLOPs at ``seq_len`` (``flops``) or a latency
speed-up at ``batch_size`` x ``seq_len`` on this machine (``speedup``), spent with
per-head and per-neuron costs from a lookup table measured here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.masks import has_uncommitted_masks
from graphprune.training.calibration import calibration_batches

from ..analysis.add_common_metadata import CommonMetadataConfig, add_common_metadata
from .blocks import StructureError, attention_blocks, ffn_blocks, finish_surgery, slice_heads, slice_neurons
from .costs import median_ms, head_flops, latency_table, neuron_flops
from .search_methods import NAME, Budget, kprune, kwon, take_examples

METHODS = ("kwon", "kprune")


@dataclass(frozen=True)
class StructuredSearchConfig:
    """Fields:
    method: kwon | kprune (see the module docstring).
    flops: share of the graph's FLOPs to keep, 0 < flops <= 1 (default 0.6 when speedup is not set).
    speedup: a latency speed-up to reach on this machine instead (> 1), from a measured lookup table.
    num_samples: calibration examples for the Fisher scores (default 2048).
    score_samples: kprune: examples for each layer's recomputed scores (default 256).
    reconstruct_samples: examples for the least-squares repair (default 512).
    rearrange: kwon: rearrange masks within each layer with the full Fisher block (default true).
    balance: kprune: weight of the representational score against the predictive one (default 1).
    fisher_samples: kprune: draws per position from the dense graph's distribution where the Fisher is
        estimated rather than summed over classes (token tags, answer positions, embeddings; default 8).
    dampening: ridge of the least-squares repair, a share of the mean diagonal (default 0.01).
    seq_len, batch_size: the shape at which FLOPs (seq_len) and latency (both) are counted.
    progress: show a progress bar.
    """

    method: str = "kwon"
    flops: float | None = None
    speedup: float | None = None
    num_samples: int = 2048
    score_samples: int = 256
    reconstruct_samples: int = 512
    rearrange: bool = True
    balance: float = 1.0
    fisher_samples: int = 8
    dampening: float = 0.01
    seq_len: int = 128
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        if self.flops is not None and self.speedup is not None:
            raise ConfigError("speedup", self.speedup, "either flops or speedup, not both")
        if self.flops is None and self.speedup is None:
            object.__setattr__(self, "flops", 0.6)
        if self.flops is not None:
            check_range("flops", self.flops, 0.0, 1.0, low_open=True)
        if self.speedup is not None:
            check_range("speedup", self.speedup, 1.0, low_open=True)
        for name in ("num_samples", "score_samples", "reconstruct_samples", "seq_len", "batch_size", "fisher_samples"):
            check_range(name, getattr(self, name), 1)
        check_range("balance", self.balance, 0.0)
        check_range("dampening", self.dampening, 0.0)


@graphprune.register_pass(NAME, config=StructuredSearchConfig)
def structured_search(graph, config: StructuredSearchConfig, data=None):
    """Remove the heads and FFN neurons that matter least under a FLOPs or latency budget, then repair by least squares.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "structured_search", {"method": "kwon", "flops": 0.5}, data=train)
        >>> info["heads_per_layer"], info["ffn_width_per_layer"], info["flops_ratio"]
    """
    start = time.perf_counter()
    heads, ffns = attention_blocks(graph, NAME), ffn_blocks(graph, NAME)
    if [b.layer for b in heads] != [b.layer for b in ffns]:
        raise StructureError(f"pass '{NAME}': every encoder layer needs one attention block and one FFN block")
    gm = graph.module
    if any(has_uncommitted_masks(gm.get_submodule(n.target)) for b in heads for n in (b.out, *b.qkv)) or any(
        has_uncommitted_masks(gm.get_submodule(n.target)) for b in ffns for n in (b.up, b.down)
    ):
        raise ValueError(f"pass '{NAME}': the graph has uncommitted weight masks; run 'commit_masks' first (the repair rewrites weights)")
    needs_labels = config.method == "kwon"
    batches = calibration_batches(graph, data, num_samples=config.num_samples, caller=f"pass '{NAME}' (method {config.method!r})", needs_targets=needs_labels)
    budget = _budget(graph, heads, ffns, config, batches)
    repair = take_examples(batches, config.reconstruct_samples)
    dense = graph.copy()
    bar = tqdm(total=2 * len(heads) + 1, desc=f"{NAME} ({config.method})", disable=not config.progress, leave=False)
    if config.method == "kwon":
        keep_heads, keep_neurons = kwon(graph, dense, heads, ffns, batches, repair, budget, config, bar)
    else:
        keep_heads, keep_neurons = kprune(graph, dense, heads, ffns, batches, repair, budget, config, bar)
    bar.close()
    dense_flops = dense.meta["common"]["totals"]["flops"]
    changed = []
    for block, keep in zip(heads, keep_heads):
        if len(keep) < block.heads:
            changed += slice_heads(graph, block, keep)
            graph.record_edit({"pass": NAME, "layer": block.layer, "heads_kept": keep, "heads_before": block.heads})
    for block, keep in zip(ffns, keep_neurons):
        if len(keep) < block.width:
            changed += slice_neurons(graph, block, keep)
            graph.record_edit({"pass": NAME, "layer": block.layer, "neurons_kept": len(keep), "width_before": block.width})
    finish_surgery(graph, changed)
    flops_after = graph.meta["common"]["totals"]["flops"]
    return graph, {
        "method": config.method,
        "heads_per_layer": [len(k) for k in keep_heads],
        "ffn_width_per_layer": [len(k) for k in keep_neurons],
        "flops_ratio": flops_after / dense_flops,
        "budget": budget.details,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _budget(graph, heads, ffns, config, batches) -> Budget:
    """Per-unit costs and what the kept units may cost, in FLOPs or in measured ms."""
    add_common_metadata(graph, CommonMetadataConfig(seq_len=config.seq_len, batch_size=1))
    total = graph.meta["common"]["totals"]["flops"]
    gm = graph.module
    hidden = gm.get_submodule(heads[0].out.target).out_features
    head_size = heads[0].head_size
    units_heads, units_neurons = sum(b.heads for b in heads), sum(b.width for b in ffns)
    if config.flops is not None:
        head_cost, neuron_cost = head_flops(hidden, head_size, config.seq_len), neuron_flops(hidden, config.seq_len)
        fixed = total - units_heads * head_cost - units_neurons * neuron_cost
        available = config.flops * total - fixed
        details = {"kind": "flops", "keep": config.flops, "dense_flops": total, "fixed_flops": fixed}
        if available < 0:
            raise ValueError(
                f"pass '{NAME}': flops = {config.flops} is not reachable: the parts that cannot be removed "
                f"(embeddings, pooler, classifier) take {fixed / total:.1%} of the FLOPs"
            )
        return Budget(head_cost, neuron_cost, available, "flops", details)
    # measured where the graph runs: the table's per-unit costs are spent against the graph's own time
    table = latency_table(
        hidden, max(b.heads for b in heads), head_size, max(b.width for b in ffns),
        batch=config.batch_size, seq=config.seq_len, device=graph.device,
    )
    inputs = _latency_inputs(batches, config.batch_size, config.seq_len)
    try:
        with torch.no_grad():
            dense_ms = median_ms(lambda: gm(**inputs), 5, graph.device)
    except IndexError as error:  # an embedding lookup past the model's positions
        raise ValueError(f"pass '{NAME}': cannot time a {config.batch_size} x {config.seq_len} batch (seq_len, batch_size): {error}") from None
    fixed = dense_ms - units_heads * table["per_head_ms"] - units_neurons * table["per_neuron_ms"]
    available = dense_ms / config.speedup - fixed
    details = {"kind": "latency", "speedup": config.speedup, "dense_ms": dense_ms, "fixed_ms": fixed, "table": table}
    if available < 0:
        raise ValueError(
            f"pass '{NAME}': speedup = {config.speedup} is not reachable on this machine: the parts that do not shrink "
            f"with heads and neurons take {fixed:.1f} of {dense_ms:.1f} ms (at most {dense_ms / max(fixed, 1e-9):.2f}x)"
        )
    return Budget(table["per_head_ms"], table["per_neuron_ms"], available, "ms", details)


def _latency_inputs(batches: list[dict], batch_size: int, seq_len: int) -> dict:
    """A full ``batch_size`` x ``seq_len`` batch cut from the calibration tokens (no padding)."""
    tokens = torch.cat([b["input_ids"][b["attention_mask"].bool()] if "attention_mask" in b else b["input_ids"].flatten() for b in batches])
    needed = batch_size * seq_len
    ids = tokens.repeat(needed // len(tokens) + 1)[:needed].reshape(batch_size, seq_len)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
