"""``add_common_metadata``: shapes, dtypes, parameters, FLOPs, head layout, per-layer totals."""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
from torch import fx, nn

import graphprune
from graphprune.infra.config import check_range
from graphprune.ir.gates import HardConcreteGate
from graphprune.ir.metadata import COMMON, common, evaluate, key
from graphprune.ir.modules import AttentionCore
from graphprune.ir.shapes import dim_names, shape_list, size_expr

from .init_metadata import init_node_metadata
from .roles import aten_name


@dataclass(frozen=True)
class CommonMetadataConfig:
    """Fields:
    seq_len: sequence length at which FLOPs are evaluated (symbolic formulas are kept too).
    batch_size: batch size at which FLOPs are evaluated.
    """

    seq_len: int = 128
    batch_size: int = 1

    def __post_init__(self):
        check_range("seq_len", self.seq_len, 1, 1_000_000)
        check_range("batch_size", self.batch_size, 1, 1_000_000)


def _numel(val, names) -> sympy.Expr:
    return sympy.Mul(*[size_expr(s, names) for s in val.shape]) if val.dim() else sympy.Integer(1)


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def node_flops(node: fx.Node, module: nn.Module | None, names) -> sympy.Expr:
    """FLOPs of one call: 2 per multiply-accumulate of matrix products; elementwise work is not counted."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return sympy.Integer(0)
    if isinstance(module, nn.Linear):
        return 2 * _numel(out, names) * module.in_features
    name = aten_name(node.target) if node.op == "call_function" else None
    if isinstance(module, AttentionCore) or name == "scaled_dot_product_attention":
        q, k, v = (_val(a) for a in node.args[:3])
        sq, d = size_expr(q.shape[-2], names), size_expr(q.shape[-1], names)
        sk, dv = size_expr(k.shape[-2], names), size_expr(v.shape[-1], names)
        batch_heads = sympy.Mul(*[size_expr(s, names) for s in q.shape[:-2]])
        return 2 * batch_heads * sq * sk * (d + dv)
    if name in ("linear", "bmm", "matmul", "mm"):
        a = _val(node.args[0])
        inner = size_expr(a.shape[-1], names)
        return 2 * _numel(out, names) * inner
    if name in ("addmm", "baddbmm"):
        a = _val(node.args[1])
        return 2 * _numel(out, names) * size_expr(a.shape[-1], names)
    return sympy.Integer(0)


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    # a gate's log_alpha is training state, not part of the model that commit_gates leaves
    return list(module.parameters()) if module is not None and not isinstance(module, HardConcreteGate) else []


def _tensor_info(val, names):
    if isinstance(val, torch.Tensor):
        return shape_list(val, names), str(val.dtype).removeprefix("torch.")
    return None, None


def _head_layout(node: fx.Node, role: str, module) -> tuple[int | None, int | None]:
    if isinstance(module, AttentionCore):
        q = _val(node.args[0])  # (batch, heads, seq, head_size)
        return int(q.shape[1]), int(q.shape[-1])
    if role in ("query", "key", "value"):
        # The projection is viewed as (batch, seq, heads, head_size) right after.
        for user in node.users:
            val = user.meta.get("val")
            if aten_name(user.target) in ("view", "reshape", "_unsafe_view") and isinstance(val, torch.Tensor) and val.dim() == 4:
                return int(val.shape[2]), int(val.shape[3])
    return None, None


@graphprune.register_pass("add_common_metadata", config=CommonMetadataConfig, kind="analysis")
def add_common_metadata(graph, config: CommonMetadataConfig):
    """Add shapes, dtypes, parameter counts, FLOPs and head layouts to every node, and per-layer totals.

    Node fields (in ``node.meta["graphprune.common"]``): in_shapes, in_dtypes,
    out_shape, out_dtype (symbolic dims named ``batch`` and ``seq``), params,
    flops_expr (a formula in batch and seq), flops (at ``batch_size``/``seq_len``),
    and heads/head_size on attention blocks and q/k/v projections. Graph fields
    (in ``graph.meta["common"]``): family, num_layers, hidden_size, layers (heads,
    head_size, ffn_width, params, flops per layer), embeddings, head and totals.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "add_common_metadata", {"seq_len": 64})
        >>> graph.meta["common"]["layers"][0]["heads"]
        12
    """
    gm = graph.module
    if any(key(COMMON) not in n.meta for n in gm.graph.nodes):
        init_node_metadata(graph)
    names = dim_names(gm)
    seq, batch = config.seq_len, config.batch_size

    layers: dict[int, dict] = {}
    sections = {"embeddings": {"params": set(), "flops": sympy.Integer(0)}, "head": {"params": set(), "flops": sympy.Integer(0)}}
    layer_params: dict[int, set] = {}
    layer_flops: dict[int, sympy.Expr] = {}
    seen_layer = False
    hidden_size = None
    for node in gm.graph.nodes:
        meta = common(node)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        inputs = [_tensor_info(_val(a), names) for a in node.all_input_nodes]
        meta["in_shapes"] = [s for s, _ in inputs if s is not None]
        meta["in_dtypes"] = [d for _, d in inputs if d is not None]
        meta["out_shape"], meta["out_dtype"] = _tensor_info(node.meta.get("val"), names)
        params = _params(module)
        meta["params"] = sum(p.numel() for p in params)
        flops = node_flops(node, module, names)
        meta["flops_expr"] = str(flops)
        meta["flops"] = evaluate(flops, batch=batch, seq=seq)
        heads, head_size = _head_layout(node, meta["role"], module)
        if heads is not None:
            meta["heads"], meta["head_size"] = heads, head_size

        layer = meta["layer"]
        if layer is not None:
            seen_layer = True
            info = layers.setdefault(layer, {"index": layer, "heads": None, "head_size": None, "ffn_width": None})
            layer_params.setdefault(layer, set()).update(id(p) for p in params)
            layer_flops[layer] = layer_flops.get(layer, sympy.Integer(0)) + flops
            if meta["role"] == "query" and heads is not None:
                info["heads"], info["head_size"] = heads, head_size
                hidden_size = hidden_size or module.in_features
            if meta["role"] == "attention" and info["heads"] is None:
                info["heads"], info["head_size"] = heads, head_size
            if meta["role"] == "ffn_up" and isinstance(module, nn.Linear):
                info["ffn_width"] = module.out_features
            # a layer whose heads or neurons were all removed keeps only its output projection's bias
            if meta["role"] == "attention_output" and isinstance(module, nn.Linear) and module.in_features == 0:
                info["heads"] = 0
            if meta["role"] == "ffn_down" and isinstance(module, nn.Linear) and info["ffn_width"] is None:
                info["ffn_width"] = module.in_features
        elif node.op in ("call_module", "call_function", "get_attr"):
            section = sections["head" if seen_layer else "embeddings"]
            section["params"].update(id(p) for p in params)
            if node.op == "get_attr":
                value = gm.get_parameter(node.target) if _is_param(gm, node.target) else None
                if value is not None:
                    section["params"].add(id(value))
            section["flops"] = section["flops"] + flops

    sizes = {id(p): p.numel() for p in gm.parameters()}
    total_flops = sum(layer_flops.values(), sympy.Integer(0)) + sections["embeddings"]["flops"] + sections["head"]["flops"]
    layer_rows = []
    for index in sorted(layers):
        row = layers[index]
        row["params"] = sum(sizes.get(i, 0) for i in layer_params[index])
        row["flops_expr"] = str(layer_flops[index])
        row["flops"] = evaluate(layer_flops[index], batch=batch, seq=seq)
        layer_rows.append(row)
    graph.meta[COMMON] = {
        "model_class": graph.source.get("model_class"),
        "family": graph.source.get("model_type"),
        "num_layers": len(layer_rows),
        "hidden_size": hidden_size,
        "seq_len": seq,
        "batch_size": batch,
        "layers": layer_rows,
        **{
            name: {
                "params": sum(sizes.get(i, 0) for i in section["params"]),
                "flops_expr": str(section["flops"]),
                "flops": evaluate(section["flops"], batch=batch, seq=seq),
            }
            for name, section in sections.items()
        },
        "totals": {
            "params": sum(sizes.values()),
            "flops_expr": str(total_flops),
            "flops": evaluate(total_flops, batch=batch, seq=seq),
        },
    }
    totals = graph.meta[COMMON]["totals"]
    return graph, {"params": totals["params"], "flops": totals["flops"], "num_layers": len(layer_rows)}


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False
