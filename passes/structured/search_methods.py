"""``structured_search``'s two methods, Kwon et al.'s and K-prune, and what they share.

Both return the heads and FFN neurons each layer keeps (sorted indices) and leave the
graph's output projections repaired by least squares against the dense graph (``Repair``);
the pass then slices the graph. The methods are described in ``structured_search``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.training.calibration import StagedForward, model_inputs
from graphprune.training.tasks import task_for
from graphprune.training.reconstruction import cross_moments, least_squares_scales, least_squares_weight, second_moments

from .importance import mask_gradients

NAME = "structured_search"  # the pass these methods serve, named in their errors; defined once, here


@dataclass
class Budget:
    head_cost: float
    neuron_cost: float
    available: float  # what the kept heads and neurons may cost in all
    unit: str
    details: dict


def take_examples(batches: list[dict], examples: int) -> list[dict]:
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


def kwon(graph, dense, heads, ffns, batches, repair, budget, config, bar):
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


def kprune(graph, dense, heads, ffns, batches, repair, budget, config, bar):
    task = task_for(graph, f"pass '{NAME}' (method 'kprune')")
    score_batches = take_examples(batches, config.score_samples)
    with torch.no_grad():  # the dense graph's predictive distributions: the teacher every layer's scores are measured against
        teacher = [task.teacher_probabilities(dense.module(**model_inputs(b, dense)), b) for b in score_batches]
    bar.update(1)
    repairer = _Repair(graph, dense, repair, config.dampening)
    spent = 0.0
    keep_heads, keep_neurons = [], []
    for layer in range(len(heads)):
        h_scores, n_scores = _kprune_scores(graph, task, heads[layer:], ffns[layer:], score_batches, teacher, config)
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


def _kprune_scores(graph, task, heads, ffns, batches, teacher, config):
    """Predictive (KL Fisher) plus representational (output energy) scores of the given layers' units.

    The Fisher is of the task's own output distributions (classes; each labelled
    token's tags; answer start and end positions; an embedding's similarities to its
    batch), weighted by the dense graph's probabilities; where classes are too many
    to sum over, it is estimated from ``fisher_samples`` seeded draws per position.
    """
    probs = iter(teacher)
    generator = torch.Generator().manual_seed(0)  # the same draws on every run

    def kl_terms(outputs, batch):
        return task.fisher_terms(outputs, batch, next(probs), config.fisher_samples, generator)

    head_grads, ffn_grads = mask_gradients(graph, heads, ffns, batches, losses=kl_terms)
    pred_h = [sum(term[i].double().pow(2).sum(0) for term in head_grads) for i in range(len(heads))]
    pred_n = [sum(term[i].double().pow(2).sum(0) for term in ffn_grads) for i in range(len(ffns))]
    rep_h, rep_n = _output_energy(graph, heads, ffns, batches)
    mean_pred = torch.cat(pred_h + pred_n).mean().clamp_min(1e-30)
    mean_rep = torch.cat(rep_h + rep_n).mean().clamp_min(1e-30)
    combine = lambda pred, rep: [p / mean_pred + config.balance * r / mean_rep for p, r in zip(pred, rep)]  # noqa: E731
    return combine(pred_h, rep_h), combine(pred_n, rep_n)


@torch.no_grad()
def _output_energy(graph, heads, ffns, batches):
    """Per unit, ``sum_tokens ||W_u x_u||^2`` over real tokens: how much of its sublayer's output it carries.

    Padding is left out, as the least-squares repair leaves it out, so a unit's score does
    not depend on how the calibration examples were batched.
    """
    gm = graph.module
    squares: dict[str, torch.Tensor] = {}
    real: list[torch.Tensor] = []  # the current batch's real-token rows

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            if real and len(real[0]) == len(x):
                x = x[real[0]]
            squares[name] = squares.get(name, 0) + x.T @ x

        return record

    outs = [(f"h{i}", gm.get_submodule(b.out.target)) for i, b in enumerate(heads)] + [(f"f{i}", gm.get_submodule(b.down.target)) for i, b in enumerate(ffns)]
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in outs]
    try:
        for batch in batches:
            real[:] = [batch["attention_mask"].reshape(-1).bool()] if "attention_mask" in batch else []
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
