"""Committing ``factorize``'s rank gates: fold, drop the closed ranks, merge pairs that are not cheaper.

With each gate's evaluation value ``z`` (``HardConcreteGate.deterministic``), the
pair ``second(z * first(x))`` equals ``second'(first'(x))`` where ``first'`` keeps the
rows of ``first`` with ``z_i > 0``, each times ``z_i``, and ``second'`` the matching
columns: the committed graph computes what the gated graph computed at evaluation.
A pair of rank ``r`` costs ``(d_in + d_out) r`` weights; where that is not below the
dense ``d_in d_out`` the product ``second' first'`` goes back in as one Linear under
the original name (FLOP's commit keeps two matrices only where they are smaller).
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from graphprune.ir.gates import GATES

from .blocks import finish_surgery


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear adopting ``weight`` and a copy of ``bias``, in ``like``'s dtype, device, mode and trainability."""
    with warnings.catch_warnings():  # a rank-0 pair has no weights to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=like.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    linear.train(like.training)
    return linear


def _node(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _weights(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def commit_factorize(graph) -> dict:
    """Fold each rank gate into its pair, remove it, and merge the pairs that are not cheaper, in place.

    Returns ``{"ranks": {name: kept}, "merged": [names], "params_dense", "params_before", "params_after"}``
    (parameters of the chosen Linears: dense, factored at full gate width, committed; gates not counted).
    """
    gm = graph.module
    linears = graph.meta[GATES]["linears"]
    ranks, merged, changed = {}, [], []
    before = after = dense = 0
    for record in linears:
        first, second = gm.get_submodule(record["first"]), gm.get_submodule(record["second"])
        gate = gm.get_submodule(record["gate"])
        d_in, d_out = record["d_in"], record["d_out"]
        before += _weights(first) + _weights(second)
        dense += d_in * d_out + (second.bias.numel() if second.bias is not None else 0)
        with torch.no_grad():
            z = gate.deterministic().to(first.weight.dtype)
            keep = torch.nonzero(z > 0).flatten()
            first_w = first.weight[keep] * z[keep, None]
            second_w = second.weight[:, keep]
        rank = int(keep.numel())
        ranks[record["target"]] = rank
        first_node, gate_node, second_node = (_node(gm, record[k]) for k in ("first", "gate", "second"))
        product = next(iter(first_node.users))  # multiply_after left the product as first's one user
        product.replace_all_uses_with(first_node)
        gm.graph.erase_node(product)
        gm.graph.erase_node(gate_node)
        if (d_in + d_out) * rank >= d_in * d_out:  # not cheaper: one dense Linear again
            with torch.no_grad():
                weight = second_w @ first_w
            gm.set_submodule(record["second"], new_linear(weight, second.bias, second))
            second_node.args = (first_node.args[0],) + tuple(second_node.args[1:])
            gm.graph.erase_node(first_node)
            merged.append(record["target"])
            after += _weights(gm.get_submodule(record["second"]))
            changed.append(second_node)
        else:
            gm.set_submodule(record["first"], new_linear(first_w, None, first))
            gm.set_submodule(record["second"], new_linear(second_w, second.bias, second))
            after += _weights(gm.get_submodule(record["first"])) + _weights(gm.get_submodule(record["second"]))
            changed.append(first_node)
    del graph.meta[GATES]
    finish_surgery(graph, changed)  # also drops the gate modules, now unused
    graph.record_edit({"pass": "commit_gates", "method": "factorize", "ranks": ranks, "merged": merged})
    return {"ranks": ranks, "merged": merged, "params_dense": dense, "params_before": before, "params_after": after}
