"""Importance scores of weights: random, magnitude, Taylor (gradient), Wanda, movement.

Each function returns one score tensor per target, shaped like its weight; higher
means more important. Scores are taken on the effective weights (masked entries
are zero), so earlier pruning is respected.
"""

from __future__ import annotations

import zlib

import torch

from graphprune.ir.masks import mask_of, unmasked_weight
from graphprune.training.calibration import collect_linear_inputs


def effective_weight(module) -> torch.Tensor:
    """The weight the module computes with (mask applied), detached."""
    return module.weight.detach()


def random_scores(targets, seed: int) -> dict:
    """Uniform random scores, reproducible per layer from ``seed`` and the layer's path."""
    out = {}
    for t in targets:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(t.path.encode()))
        out[t.path] = torch.rand(t.module.weight.shape, generator=generator).to(t.module.weight.device)
    return out


def magnitude_scores(targets) -> dict:
    """|W|: the L1 (magnitude) criterion."""
    return {t.path: effective_weight(t.module).abs() for t in targets}


def input_square_sums(graph, targets, batches) -> dict:
    """Per target, the sum over calibration tokens of each input feature squared (padding excluded)."""
    sums = {t.path: torch.zeros(t.module.in_features, dtype=torch.float64, device=t.module.weight.device) for t in targets}

    def accumulate(name, rows):
        sums[name] += rows.double().pow(2).sum(dim=0)

    collect_linear_inputs(graph, batches, {t.path: t.module for t in targets}, accumulate)
    return sums


def wanda_scores(targets, square_sums: dict) -> dict:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, the input feature's L2 norm over calibration tokens."""
    return {t.path: effective_weight(t.module).abs() * square_sums[t.path].sqrt().float().unsqueeze(0) for t in targets}


def taylor_scores(graph, targets, batches) -> dict:
    """First-order Taylor importance: sum over calibration batches of |W * dL/dW| (the task loss, eval mode)."""
    module = graph.module
    weights = {t.path: unmasked_weight(t.module) for t in targets}
    scores = {t.path: torch.zeros_like(t.module.weight, dtype=torch.float32) for t in targets}
    saved = {name: (w.requires_grad, w.grad) for name, w in weights.items()}
    was_training = module.training
    module.eval()
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for batch in batches:
            loss = module(**batch).get("loss")
            if loss is None:
                raise ValueError("taylor needs calibration batches with labels: the scores are gradients of the task loss")
            grads = torch.autograd.grad(loss, [weights[t.path] for t in targets], allow_unused=True)
            for t, grad in zip(targets, grads):
                if grad is not None:
                    scores[t.path] += (effective_weight(t.module) * grad).abs()
    finally:
        module.train(was_training)
        for name, w in weights.items():
            w.requires_grad_(saved[name][0])
            w.grad = saved[name][1]
    return scores


def movement_scores(targets) -> dict:
    """The movement scores learned during fine-tuning (Sanh et al. 2020); magnitude before any training."""
    out = {}
    for t in targets:
        mask = mask_of(t.module)
        scores = getattr(mask, "scores", None)
        if scores is None or not bool(torch.count_nonzero(scores.detach())):
            out[t.path] = effective_weight(t.module).abs()  # untrained scores carry no order
        else:
            out[t.path] = scores.detach().clone()
    return out
