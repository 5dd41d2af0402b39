"""Masks during training, and the explicit step that commits them.

Passes that mask weights use either ``torch.nn.utils.prune`` (a forward pre-hook
recomputes ``weight = weight_orig * weight_mask``) or ``torch.nn.utils.parametrize``.
Both live on the graph's own modules, so they work in ``graph.module``'s forward and
backward and during :func:`graphprune.finetune` unchanged. Until committed they are
reversible; a checkpoint stores only committed weights, so ``commit_masks`` folds
them in, as torch.ao's ``squash_mask`` does.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize, prune

from .graph import Graph


def has_uncommitted_masks(module: nn.Module) -> bool:
    hooks = any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values())
    return hooks or parametrize.is_parametrized(module)


def commit_masks(graph: Graph) -> list[str]:
    """Fold pruning masks and parametrizations into plain weights, in place; returns the module names."""
    committed = []
    for name, module in graph.module.named_modules():
        pruned = [h._tensor_name for h in list(module._forward_pre_hooks.values()) if isinstance(h, prune.BasePruningMethod)]
        for tensor_name in pruned:
            prune.remove(module, tensor_name)
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
            pruned.append("parametrizations")
        if pruned:
            committed.append(name)
    return committed


def count_parameters(graph: Graph) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the effective weights; tied weights count once."""
    committed = graph.copy()
    commit_masks(committed)
    params = list(committed.module.parameters())  # unique: shared parameters are listed once
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)
