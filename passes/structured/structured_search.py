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
from graphprune.training.calibration import StagedForward, calibration_batches, model_inputs
from graphprune.training.reconstruction import cross_moments, least_squares_scales, least_squares_weight, second_moments

from ..analysis.add_common_metadata import CommonMetadataConfig, add_common_metadata
from .blocks import StructureError, attention_blocks, ffn_blocks, finish_surgery, slice_heads, slice_neurons
from .costs import median_ms, head_flops, latency_table, neuron_flops
from .importance import mask_gradients

NAME = "structured_search"
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
        for name in ("num_samples", "score_samples", "reconstruct_samples", "seq_len", "batch_size"):
            check_range(name, getattr(self, name), 1)
        check_range("balance", self.balance, 0.0)
        check_range("dampening", self.dampening, 0.0)


@dataclass
class Budget:
    head_cost: float
    neuron_cost: float
    available: float  # what the kept heads and neurons may cost in all
    unit: str
    details: dict


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
    repair = _take(batches, config.reconstruct_samples)
    dense = graph.copy()
    bar = tqdm(total=2 * len(heads) + 1, desc=f"{NAME} ({config.method})", disable=not config.progress, leave=False)
    if config.method == "kwon":
        keep_heads, keep_neurons = _kwon(graph, dense, heads, ffns, batches, repair, budget, config, bar)
    else:
        keep_heads, keep_neurons = _kprune(graph, dense, heads, ffns, batches, repair, budget, config, bar)
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


def _take(batches: list[dict], examples: int) -> list[dict]:
    out, seen = [], 0
    for batch in batches:
        if seen >= examples:
            break
        out.append(batch)
        seen += len(batch["input_ids"])
    return out


def search_counts(head_scores: torch.Tensor, neuron_scores: torch.Tensor, budget: Budget) -> tuple[int, int]:
    """How many heads and neurons to keep (the highest-scoring of each) to keep the most score within the budget.

    Kwon et al.'s search: for every head count, the rest of the budget buys neurons.
    """
    head_sum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.sort(head_scores.double(), descending=True).values.cumsum(0)])
    neuron_sum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.sort(neuron_scores.double(), descending=True).values.cumsum(0)])
    best, choice = -1.0, (0, 0)
    for h in range(len(head_scores) + 1):
        left = budget.available - h * budget.head_cost
        if left < 0:
            break
        n = min(len(neuron_scores), int(left // budget.neuron_cost))
        value = float(head_sum[h] + neuron_sum[n])
        if value > best:
            best, choice = value, (h, n)
    return choice


def _top_per_layer(scores: list[torch.Tensor], count: int) -> list[list[int]]:
    """The ``count`` highest scores over all layers, as sorted indices per layer."""
    flat = torch.cat(scores)
    chosen = set(torch.argsort(flat, descending=True, stable=True)[:count].tolist())
    out, offset = [], 0
    for s in scores:
        out.append([i for i in range(len(s)) if i + offset in chosen])
        offset += len(s)
    return out


def rearrange(fisher: torch.Tensor, keep: list[int], max_swaps: int = 100) -> list[int]:
    """Swap kept and removed units of one layer while that lowers ``(1-m)^T F (1-m)`` (Kwon et al.'s mask rearrangement)."""
    n = len(fisher)
    pruned = torch.ones(n, dtype=torch.bool)
    pruned[keep] = False
    if not 0 < int(pruned.sum()) < n:
        return sorted(keep)
    f = fisher.double()
    diag = torch.diag(f)
    for _ in range(max_swaps):
        s = f @ pruned.double()
        p_idx, k_idx = pruned.nonzero().squeeze(1), (~pruned).nonzero().squeeze(1)
        # moving p out of and k into the pruned set changes the objective by this much
        delta = (diag[p_idx] - 2 * s[p_idx])[:, None] + (diag[k_idx] + 2 * s[k_idx])[None, :] - 2 * f[p_idx][:, k_idx]
        best = int(torch.argmin(delta))
        if float(delta.flatten()[best]) >= -1e-12 * max(float(s.abs().max()), 1e-30):
            break
        p, k = p_idx[best // len(k_idx)], k_idx[best % len(k_idx)]
        pruned[p], pruned[k] = False, True
    return sorted((~pruned).nonzero().squeeze(1).tolist())


def _kwon(graph, dense, heads, ffns, batches, repair, budget, config, bar):
    (head_grads,), (ffn_grads,) = mask_gradients(graph, heads, ffns, batches)
    head_fisher = [g.double().pow(2).sum(0) for g in head_grads]
    neuron_fisher = [g.double().pow(2).sum(0) for g in ffn_grads]
    count_h, count_n = search_counts(torch.cat(head_fisher), torch.cat(neuron_fisher), budget)
    keep_heads, keep_neurons = _top_per_layer(head_fisher, count_h), _top_per_layer(neuron_fisher, count_n)
    if config.rearrange:
        keep_heads = [rearrange(g.double().T @ g.double(), k) for g, k in zip(head_grads, keep_heads)]
        keep_neurons = [rearrange(g.double().T @ g.double(), k) for g, k in zip(ffn_grads, keep_neurons)]
    bar.update(1)
    repairer = _Repair(graph, dense, repair, config.dampening)
    for layer, (hb, fb) in enumerate(zip(heads, ffns)):
        repairer.attention(hb, keep_heads[layer], scales=True)
        bar.update(1)
        repairer.ffn(fb, keep_neurons[layer], scales=True)
        bar.update(1)
    return keep_heads, keep_neurons


def _kprune(graph, dense, heads, ffns, batches, repair, budget, config, bar):
    score_batches = _take(batches, config.score_samples)
    with torch.no_grad():
        teacher = [torch.softmax(dense.module(**model_inputs(b, dense)).logits.float(), -1) for b in score_batches]
    if teacher[0].dim() != 2:
        raise ValueError(f"pass '{NAME}': method 'kprune' needs a sequence-classification graph (logits of shape (batch, classes))")
    bar.update(1)
    repairer = _Repair(graph, dense, repair, config.dampening)
    spent = 0.0
    keep_heads, keep_neurons = [], []
    for layer in range(len(heads)):
        h_scores, n_scores = _kprune_scores(graph, heads[layer:], ffns[layer:], score_batches, teacher, config.balance)
        remaining = Budget(budget.head_cost, budget.neuron_cost, budget.available - spent, budget.unit, budget.details)
        count_h, count_n = search_counts(torch.cat(h_scores), torch.cat(n_scores), remaining)
        keep_h = _top_per_layer(h_scores, count_h)[0]
        keep_n = _top_per_layer(n_scores, count_n)[0]
        repairer.attention(heads[layer], keep_h, scales=False)
        bar.update(1)
        repairer.ffn(ffns[layer], keep_n, scales=False)
        bar.update(1)
        spent += len(keep_h) * budget.head_cost + len(keep_n) * budget.neuron_cost
        keep_heads.append(keep_h)
        keep_neurons.append(keep_n)
    return keep_heads, keep_neurons


def _kprune_scores(graph, heads, ffns, batches, teacher, balance):
    """Predictive (KL Fisher) plus representational (output energy) scores of the given layers' units."""
    probs = iter(teacher)

    def kl_terms(outputs, batch):
        p = next(probs).to(outputs.logits.device)
        log_p = torch.log_softmax(outputs.logits, -1)
        return [(p[:, y].sqrt() * log_p[:, y]).sum() for y in range(p.shape[1])]

    head_grads, ffn_grads = mask_gradients(graph, heads, ffns, batches, losses=kl_terms)
    pred_h = [sum(term[i].double().pow(2).sum(0) for term in head_grads) for i in range(len(heads))]
    pred_n = [sum(term[i].double().pow(2).sum(0) for term in ffn_grads) for i in range(len(ffns))]
    rep_h, rep_n = _output_energy(graph, heads, ffns, batches)
    mean_pred = torch.cat(pred_h + pred_n).mean().clamp_min(1e-30)
    mean_rep = torch.cat(rep_h + rep_n).mean().clamp_min(1e-30)
    combine = lambda pred, rep: [p / mean_pred + balance * r / mean_rep for p, r in zip(pred, rep)]  # noqa: E731
    return combine(pred_h, rep_h), combine(pred_n, rep_n)


@torch.no_grad()
def _output_energy(graph, heads, ffns, batches):
    """Per unit, ``sum_tokens ||W_u x_u||^2``: how much of its sublayer's output it carries."""
    gm = graph.module
    squares: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            squares[name] = squares.get(name, 0) + x.T @ x

        return record

    outs = [(f"h{i}", gm.get_submodule(b.out.target)) for i, b in enumerate(heads)] + [(f"f{i}", gm.get_submodule(b.down.target)) for i, b in enumerate(ffns)]
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in outs]
    try:
        for batch in batches:
            gm(**model_inputs(batch, graph))
    finally:
        for handle in handles:
            handle.remove()
    energy = {}
    for name, module in outs:
        w = module.weight.double()
        energy[name] = (squares[name] * (w.T @ w)).cpu()
    rep_h = [energy[f"h{i}"].reshape(b.heads, b.head_size, b.heads, b.head_size).diagonal(dim1=0, dim2=2).sum((0, 1)).float() for i, b in enumerate(heads)]
    rep_n = [torch.diagonal(energy[f"f{i}"]).float() for i in range(len(ffns))]
    return rep_h, rep_n


class _Repair:
    """Bottom-up least-squares repair of each pruned sublayer's output projection, on staged forwards of both graphs."""

    def __init__(self, graph, dense, batches, dampening):
        self.graph, self.dense, self.dampening = graph, dense, dampening
        self.run, self.dense_run = StagedForward(graph, batches), StagedForward(dense, batches)
        self.dense_nodes = {n.name: n for n in dense.module.graph.nodes}

    def attention(self, block, keep: list[int], scales: bool) -> None:
        columns = [h * block.head_size + j for h in keep for j in range(block.head_size)]
        groups = torch.tensor([i // block.head_size for i in range(len(columns))], dtype=torch.long)
        self._solve(block.out, columns, groups, scales)

    def ffn(self, block, keep: list[int], scales: bool) -> None:
        self._solve(block.down, keep, torch.arange(len(keep)), scales)

    @torch.no_grad()
    def _solve(self, node, columns: list[int], groups: torch.Tensor, scales: bool) -> None:
        module = self.graph.module.get_submodule(node.target)
        dense_node = self.dense_nodes[node.name]
        dense_module = self.dense.module.get_submodule(dense_node.target)
        if len(columns) == module.in_features and scales:
            return  # nothing removed: the mask values stay 1
        self.run.advance_to(node)
        self.dense_run.advance_to(dense_node)
        kept = torch.tensor(columns, dtype=torch.long, device=module.weight.device)  # it indexes activations and weights
        rows = [r[:, kept] for r in self.run.input_rows(node)]
        dense_rows = self.dense_run.input_rows(dense_node)
        weight = module.weight
        if scales:
            if len(columns):
                square, _ = second_moments(rows)
                m = least_squares_scales(weight[:, kept], dense_module.weight, square, cross_moments(dense_rows, rows), groups, self.dampening)
                new = (weight[:, kept].double() * m[groups].to(weight.device)[None, :]).to(weight.dtype)
            weight.zero_()
            if len(columns):
                weight[:, kept] = new
            return
        ones = lambda r: torch.cat([r, torch.ones(len(r), 1, dtype=r.dtype, device=r.device)], 1)  # noqa: E731  (the bias column)
        rows, dense_rows = [ones(r) for r in rows], [ones(r) for r in dense_rows]
        square, _ = second_moments(rows)
        target = torch.cat([dense_module.weight, dense_module.bias[:, None]], 1)
        solved = least_squares_weight(target, square, cross_moments(dense_rows, rows), self.dampening)
        weight.zero_()
        weight[:, kept] = solved[:, :-1].to(weight.device)
        module.bias.copy_(solved[:, -1])
