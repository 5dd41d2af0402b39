"""Lift ATen calls back into ``call_module`` nodes on the model's own leaf modules.

``torch.export`` flattens a model into ATen calls whose parameters are ``get_attr``
nodes. Passes want the opposite view: one node per Linear, LayerNorm, Embedding and
Dropout, calling the real ``nn.Module`` so that it can be swapped, parametrized,
trained, and switched between train and eval. This module rebuilds that view from
the export's ``nn_module_stack`` metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .fx_utils import fetch_attr, quiet_deepcopy
from .modules import AttentionCore

aten = torch.ops.aten


@dataclass(frozen=True)
class _Leaf:
    module_cls: type
    input_index: int
    params: dict[str, int]  # parameter name -> argument index in the ATen call


_LEAVES = {
    aten.linear.default: _Leaf(nn.Linear, 0, {"weight": 1, "bias": 2}),
    aten.layer_norm.default: _Leaf(nn.LayerNorm, 0, {"weight": 2, "bias": 3}),
    aten.embedding.default: _Leaf(nn.Embedding, 1, {"weight": 0}),
    aten.dropout.default: _Leaf(nn.Dropout, 0, {}),
}

# Export-time guards: they pin dtypes and shapes to the example inputs, which would
# reject inputs eager accepts (a bool attention mask, say).
_DROPPED_TARGETS = {aten._assert_tensor_metadata.default}


def owner_path(node: fx.Node) -> str | None:
    """The qualified name of the innermost module that issued ``node``, if any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    if path.startswith("_empty_nn_module_stack"):
        return None
    return path


def _attr_value(gm: fx.GraphModule, arg) -> object:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return fetch_attr(gm, arg.target)
    return arg


def _matches(gm: fx.GraphModule, node: fx.Node, leaf: _Leaf, module: nn.Module) -> bool:
    """True when the ATen call computes exactly ``module(input)``."""
    if not isinstance(module, leaf.module_cls):
        return False
    for pname, index in leaf.params.items():
        arg = node.args[index] if index < len(node.args) else None
        expected = getattr(module, pname, None)
        if expected is None:
            if arg is not None:
                return False
        elif _attr_value(gm, arg) is not expected:
            return False
    if node.target is aten.dropout.default:
        return float(node.args[1]) == float(module.p)
    if node.target is aten.layer_norm.default:
        return list(node.args[1]) == list(module.normalized_shape) and float(node.args[4]) == float(module.eps)
    return True


def _attention_dropout(owner: nn.Module | None) -> float:
    # HF attention blocks pass `self.dropout.p` to SDPA when training.
    dropout = getattr(owner, "dropout", None)
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def lift_leaf_modules(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Return a new ``GraphModule`` over ``model``'s leaf modules, from an unlifted export."""
    # A fresh copy, owned by no module yet: call_module nodes for modules the
    # export's own GraphModule lacks would otherwise be refused.
    graph = quiet_deepcopy(gm.graph)
    installed: dict[str, nn.Module] = {}

    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        if node.target in _DROPPED_TARGETS:
            graph.erase_node(node)
            continue
        path = owner_path(node)
        if node.target in _LEAVES and path is not None:
            leaf = _LEAVES[node.target]
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if not _matches(gm, node, leaf, module):
                continue
            installed[path] = module
            _replace(graph, node, path, (node.args[leaf.input_index],), {})
        elif node.target is aten.scaled_dot_product_attention.default:
            _lift_attention(graph, node, path, model, installed)

    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)

    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = installed[node.target]
        elif node.op == "get_attr":
            root[node.target] = fetch_attr(gm, node.target)
    graph.lint()
    lifted = fx.GraphModule(root, graph, class_name=f"{type(model).__name__}Graph")
    return lifted


def _lift_attention(graph: fx.Graph, node: fx.Node, path: str | None, model: nn.Module, installed: dict) -> None:
    args = list(node.args) + [None] * (6 - len(node.args))
    query, key, value, attn_mask, _dropout_p, is_causal = args[:6]
    if node.kwargs.get("enable_gqa"):
        return  # not a BERT-family pattern; leave the call as it is
    attn_mask = node.kwargs.get("attn_mask", attn_mask)
    is_causal = bool(node.kwargs.get("is_causal", is_causal or False))
    owner = model.get_submodule(path) if path else None
    core_path = f"{path}.attention_core" if path else "attention_core"
    if core_path not in installed:
        installed[core_path] = AttentionCore(_attention_dropout(owner), node.kwargs.get("scale"), is_causal)
    _replace(graph, node, core_path, (query, key, value), {"attn_mask": attn_mask} if attn_mask is not None else {})


def _replace(graph: fx.Graph, node: fx.Node, target: str, args: tuple, kwargs: dict) -> None:
    with graph.inserting_before(node):
        new = graph.call_module(target, args, kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
