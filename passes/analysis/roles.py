"""What each node of a BERT-family graph is: its role and its encoder layer.

Roles come from module names, which differ by family (BERT/RoBERTa/ELECTRA use
``attention.self.query``, DistilBERT ``q_lin``, DeBERTa-v2 ``query_proj``, ALBERT
``ffn``/``ffn_output``). The encoder layer comes from the module stack that
torch.export records; ALBERT calls one shared layer many times, so layers are
numbered by call (``...albert_layers.0@3`` is the fourth call), not by module.
"""

from __future__ import annotations

import re

import torch
from torch import fx, nn

from graphprune.ir.modules import AttentionCore

_LINEAR_ROLES = [
    ("query", re.compile(r"(^|\.)(query|q_lin|query_proj|q_proj)$")),
    ("key", re.compile(r"(^|\.)(key|k_lin|key_proj|k_proj)$")),
    ("value", re.compile(r"(^|\.)(value|v_lin|value_proj|v_proj)$")),
    ("attention_output", re.compile(r"attention\.output\.dense$|attention\.dense$|(^|\.)out_lin$|(^|\.)o_proj$")),
    ("ffn_up", re.compile(r"intermediate\.dense$|(^|\.)lin1$|(^|\.)ffn$")),
    ("ffn_down", re.compile(r"(^|\.)output\.dense$|(^|\.)lin2$|(^|\.)ffn_output$")),
    ("embedding_projection", re.compile(r"embeddings_project$|embedding_hidden_mapping_in$")),
    ("pooler", re.compile(r"(^|\.)pooler(\.dense)?$")),
]
_LAYER_PATH = re.compile(r"(^|\.)(layer|layers|albert_layers)\.\d+$")

_ACTIVATIONS = {"gelu", "relu", "tanh", "silu", "sigmoid", "softmax", "_softmax", "gelu_", "relu_"}
_VIEWS = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice",
    "select", "contiguous", "clone", "t", "flatten", "unflatten", "alias", "detach", "detach_", "lift_fresh_copy",
}
_MATMULS = {"bmm", "matmul", "mm", "addmm", "baddbmm", "linear", "einsum"}


def aten_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return None


def node_kind(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "constant"
    if node.op == "call_module":
        if isinstance(module, AttentionCore):
            return "attention"
        return type(module).__name__.lower()
    name = aten_name(node.target) or getattr(node.target, "__name__", "")
    if name in _ACTIVATIONS:
        return "activation"
    if name in _VIEWS:
        return "view"
    if name in _MATMULS:
        return "matmul"
    if name == "scaled_dot_product_attention":
        return "attention"
    if name and name != "sym_size":
        return "elementwise"
    return "other"


def node_role(node: fx.Node, module: nn.Module | None, layer: int | None) -> str:
    if node.op == "call_module":
        if isinstance(module, nn.Linear):
            for role, pattern in _LINEAR_ROLES:
                if pattern.search(node.target):
                    return role
            return "other" if layer is not None else "classifier"
        if isinstance(module, nn.Embedding):
            return "embedding"
        if isinstance(module, nn.LayerNorm):
            return "layernorm"
        if isinstance(module, nn.Dropout):
            return "dropout"
        if isinstance(module, AttentionCore):
            return "attention"
        return "other"
    if node.op == "call_function":
        name = aten_name(node.target)
        if name in _ACTIVATIONS:
            return "activation"
        if name == "scaled_dot_product_attention":
            return "attention"
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    return "other"


def layer_keys(gm: fx.GraphModule) -> dict[str, int | None]:
    """Node name -> encoder layer index (None outside the layers), numbered by call order."""
    order: dict[str, int] = {}
    result: dict[str, int | None] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        layer_key = None
        for stack_key, (path, _cls) in stack.items():
            if _LAYER_PATH.search(path):
                layer_key = stack_key  # keeps "@n", which tells repeated calls apart
        if layer_key is not None and layer_key not in order:
            order[layer_key] = len(order)
        result[node.name] = order.get(layer_key) if layer_key is not None else None
    return result
