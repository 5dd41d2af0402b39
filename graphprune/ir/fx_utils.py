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


def bias_only(x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """What a Linear with no input features computes: its bias (or zeros) at every position."""
    if bias is None:
        return x.new_zeros(*x.shape[:-1], out_features)
    return bias.expand(*x.shape[:-1], out_features)


def replace_empty_linears(gm: torch.fx.GraphModule) -> int:
    """Replace calls of Linears with no input features (a layer whose heads were all removed keeps
    an output projection that only adds its bias) by ``bias_only``: compilers that pre-pack
    weights (inductor's freezing, int8 kernels) cannot take a weight with no elements.
    Returns how many calls were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = fetch_attr(gm, node.target)
        if not isinstance(module, nn.Linear) or module.in_features != 0:
            continue
        with gm.graph.inserting_before(node):
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            new = gm.graph.call_function(bias_only, (node.args[0], bias, module.out_features))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced
