"""Masks on modules during training, and the explicit step that commits them.

graphprune's pruning passes mask weights with :class:`WeightMask`, a
``torch.nn.utils.parametrize`` parametrization (``weight = original * mask``), or
:class:`MovementMask`, which also learns movement scores. Masks live on the graph's
own modules, so they work in ``graph.module``'s forward and backward and during
:func:`graphprune.finetune` unchanged: after an optimizer step a masked weight is
still exactly zero. They stay reversible until ``commit_masks`` folds them in (as
torch.ao's ``squash_mask`` does), and checkpoints save and reload them in place.
Masks made with ``torch.nn.utils.prune`` hooks work in training and commit too, but
must be committed before saving.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from .modules import register_module_type


class WeightMask(nn.Module):
    """A reversible mask on a weight: the module sees ``original * mask``.

    ``mask`` is a bool buffer, True where the weight is kept. Gradients reach the
    kept weights only, so masked weights stay exactly zero through training.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where, not multiply: a masked negative weight is +0.0, not -0.0, so committed
        # zeros have one bit pattern and sparse checkpoints can skip them all
        return torch.where(self.mask, weight, 0.0)


class MovementMask(WeightMask):
    """A :class:`WeightMask` that also learns movement scores (Sanh et al. 2020).

    The forward value is ``original * mask``; the straight-through gradient of the
    scores is ``dL/dW' * W``, so during fine-tuning a score grows for weights moving
    away from zero and shrinks for weights moving towards it. A pruning pass then
    masks the lowest-scoring weights.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask)
        self.scores = nn.Parameter(torch.zeros(mask.shape, dtype=torch.float32, device=mask.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # the second term is zero in value and carries the scores' gradient, dL/dW' * W
        return torch.where(self.mask, weight, 0.0) + weight.detach() * (self.scores - self.scores.detach())


register_module_type(
    "graphprune.WeightMask",
    WeightMask,
    lambda m: {"shape": list(m.mask.shape)},
    lambda c: WeightMask(torch.ones(c["shape"], dtype=torch.bool)),
)
register_module_type(
    "graphprune.MovementMask",
    MovementMask,
    lambda m: {"shape": list(m.mask.shape)},
    lambda c: MovementMask(torch.ones(c["shape"], dtype=torch.bool)),
)


def mask_of(module: nn.Module, tensor_name: str = "weight") -> WeightMask | None:
    """The :class:`WeightMask` on ``module.<tensor_name>``, if there is one."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    return next((p for p in module.parametrizations[tensor_name] if isinstance(p, WeightMask)), None)


def unmasked_weight(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor:
    """The weight under any mask: the Parameter an optimizer updates."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def zero_weights(module: nn.Module, tensor_name: str = "weight") -> int:
    """How many of the module's effective weights are zero.

    A masked module counts its masked weights (cheap: the bool mask); exact zeros
    among its kept weights show up once the mask is committed.
    """
    mask = mask_of(module, tensor_name)
    if mask is not None:
        return mask.mask.numel() - int(torch.count_nonzero(mask.mask))
    weight = getattr(module, tensor_name)
    return weight.numel() - int(torch.count_nonzero(weight.detach()))


def set_mask(module: nn.Module, keep: torch.Tensor, *, movement: bool = False, tensor_name: str = "weight") -> WeightMask:
    """Mask ``module.<tensor_name>`` to ``keep`` (True = kept), installing a mask if needed.

    An existing mask is updated in place, so an optimizer holding the module's
    parameters (and a MovementMask's scores) keeps working.
    """
    if pruning_hooks(module):
        raise ValueError(
            f"{type(module).__name__} has torch.nn.utils.prune masks; run the 'commit_masks' pass before masking it again"
        )
    existing = mask_of(module, tensor_name)
    if existing is not None:
        existing.mask.copy_(keep)
        return existing
    mask = (MovementMask if movement else WeightMask)(keep.to(unmasked_weight(module, tensor_name).device))
    parametrize.register_parametrization(module, tensor_name, mask, unsafe=True)  # shapes match by construction
    return mask


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
            _fold_parametrizations(module)
            pruned.append("parametrizations")
        if pruned:
            committed.append(name)
    return committed


@torch.no_grad()
def _fold_parametrizations(module: nn.Module) -> None:
    """Replace every parametrized tensor by its current value, keeping the same Parameter objects.

    Done by hand rather than with ``parametrize.remove_parametrizations``, which
    deletes the tensor's property from the module's class: a deep copy of a
    parametrized module shares that class, so the copy's commit would break the
    original (``graph.copy()`` then ``commit_masks`` on the copy).
    """
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    originals = {name: module.parametrizations[name].original for name in values}
    module.__class__ = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    for name, value in values.items():
        parameter = originals[name]
        parameter.copy_(value)
        module.register_parameter(name, parameter)


def count_parameters(graph) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the effective weights; tied weights count once."""
    committed = graph.copy()
    commit_masks(committed)
    params = list(committed.module.parameters())  # unique: shared parameters are listed once
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)
