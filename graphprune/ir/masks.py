"""Masks during training, and the explicit step that commits them.

Passes that mask weights use either ``torch.nn.utils.prune`` (a forward pre-hook
recomputes ``weight = weight_orig * weight_mask``) or ``torch.nn.utils.parametrize``.
Both live on the graph's own modules, so they work in ``graph.module``'s forward and
backward and during :func:`graphprune.finetune` unchanged. Until committed they are
reversible; a checkpoint stores only committed weights, so ``commit_masks`` folds
them in, as torch.ao's ``squash_mask`` does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize, prune


def pruning_hooks(module: nn.Module) -> list[prune.BasePruningMethod]:
    """The ``torch.nn.utils.prune`` forward pre-hooks on ``module`` (one per pruned tensor)."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def has_uncommitted_masks(module: nn.Module) -> bool:
    return bool(pruning_hooks(module)) or parametrize.is_parametrized(module)


def masked_tensor_copies(root: nn.Module) -> dict[int, torch.Tensor]:
    """A ``copy.deepcopy`` memo entry for every tensor a pruning hook recomputes.

    ``torch.nn.utils.prune`` keeps ``weight = weight_orig * mask`` as a non-leaf
    tensor, which deepcopy refuses; the hook recomputes it on every forward, so a
    detached clone is a faithful copy.
    """
    memo: dict[int, torch.Tensor] = {}
    for module in root.modules():
        for hook in pruning_hooks(module):
            value = getattr(module, hook._tensor_name, None)
            if isinstance(value, torch.Tensor) and hook._tensor_name not in module._parameters:
                memo[id(value)] = value.detach().clone()
    return memo


def commit_masks(graph) -> list[str]:
    """Fold pruning masks and parametrizations into ``graph``'s plain weights, in place.

    Returns the names of the modules that had masks.
    """
    committed = []
    for name, module in graph.module.named_modules():
        pruned = [h._tensor_name for h in pruning_hooks(module)]
        for tensor_name in pruned:
            prune.remove(module, tensor_name)
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
            pruned.append("parametrizations")
        if pruned:
            committed.append(name)
    return committed


def count_parameters(graph) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the effective weights; tied weights count once."""
    committed = graph.copy()
    commit_masks(committed)
    params = list(committed.module.parameters())  # unique: shared parameters are listed once
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)
