"""Small helpers on torch.fx objects that several IR modules need."""

from __future__ import annotations

import copy
import warnings

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
