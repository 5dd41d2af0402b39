"""Small helpers on torch.fx objects that several IR modules need."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def quiet_deepcopy(obj, memo=None):
    """``copy.deepcopy`` without torch's own LeafSpec FutureWarning from copying pytree specs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(obj, memo)


def fetch_attr(root: nn.Module, target: str):
    """The attribute at the dotted path ``target`` below ``root`` (a module, parameter or buffer)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters (or, without any, its buffers) live; the CPU for a module with neither."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
