"""Committing ``l0_structured`` gates: fold the evaluation gates into the weights, then remove what they closed.

Every gate multiplies a value that a Linear (or the embeddings' LayerNorm) produces
or consumes linearly, so its evaluation value folds in exactly: a head's gate into
its output-projection columns, the attention gate into the whole output projection
(bias too), a neuron's gate into its down-projection column, the FFN gate into the
whole down projection, a hidden dimension's gate into the rows of every projection
added into the residual stream and into the embeddings' LayerNorm. Then the gates
go, the LayerNorms are plain again, and the closed units are removed by the
structured passes themselves: ``remove_heads`` (a closed attention sublayer loses
every head; its output is its zeroed bias, so the layer computes LayerNorm(residual)),
``remove_ffn_neurons`` (likewise) and ``remove_hidden``. The result computes what the
gated graph computes at evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.infra.pipeline import run_pass
from graphprune.ir.gates import GATES, remove_gate_products
from graphprune.ir.masks import unmasked_weight

from .hidden import GatedLayerNorm


def _values(gm, layer) -> dict[str, torch.Tensor]:
    return {unit: gm.get_submodule(target).deterministic() for unit, target in layer["gates"].items()}


@torch.no_grad()
def _fold(gm, record) -> tuple[list[dict], torch.Tensor | None]:
    hidden = record["hidden"]
    z_hidden = gm.get_submodule(hidden["gate"]).deterministic() if hidden else None
    values = []
    for layer in record["layers"]:
        z = _values(gm, layer)
        values.append(z)
        out, down = gm.get_submodule(layer["out"]), gm.get_submodule(layer["down"])
        w_out, w_down = unmasked_weight(out), unmasked_weight(down)
        if "heads" in z:
            w_out.mul_(z["heads"].repeat_interleave(layer["head_size"]).to(w_out))
        if "neurons" in z:
            w_down.mul_(z["neurons"].to(w_down))
        for unit, linear, weight in (("attention", out, w_out), ("ffn", down, w_down)):
            if unit in z:
                weight.mul_(z[unit].to(weight))
                if linear.bias is not None:
                    linear.bias.mul_(z[unit].to(weight))
        if z_hidden is not None:
            for linear, weight in ((out, w_out), (down, w_down)):
                weight.mul_(z_hidden.to(weight).unsqueeze(1))
                if linear.bias is not None:
                    linear.bias.mul_(z_hidden.to(weight))
    if z_hidden is not None:
        norm = gm.get_submodule(hidden["embedding_norm"])
        for tensor in (norm.weight, norm.bias):
            if tensor is not None:
                tensor.mul_(z_hidden.to(tensor))
    return values, z_hidden


def _plain_norms(gm) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), GatedLayerNorm):
            gated = gm.get_submodule(node.target)
            plain = nn.LayerNorm(gated.normalized_shape, eps=gated.eps, elementwise_affine=gated.elementwise_affine,
                                 bias=gated.bias is not None, device="meta")
            plain.weight, plain.bias = gated.weight, gated.bias
            gm.set_submodule(node.target, plain.train(gated.training))
            node.args = (node.args[0],)


def commit_l0(graph) -> dict:
    """Fold and remove, in place (see the module docstring); returns what was removed."""
    gm, record = graph.module, graph.meta[GATES]
    values, z_hidden = _fold(gm, record)
    _plain_norms(gm)
    remove_gate_products(gm)
    gm.recompile()
    del graph.meta[GATES]
    heads, neurons = {}, {}
    for layer, z in zip(record["layers"], values):
        closed_layer = "attention" in z and float(z["attention"].max()) == 0
        if "heads" in z or closed_layer:
            gone = list(range(layer["heads"])) if closed_layer else (z["heads"] == 0).nonzero().flatten().tolist()
            if gone:
                heads[layer["index"]] = gone
        closed_ffn = "ffn" in z and float(z["ffn"].max()) == 0
        if "neurons" in z or closed_ffn:
            gone = list(range(layer["ffn_width"])) if closed_ffn else (z["neurons"] == 0).nonzero().flatten().tolist()
            if gone:
                neurons[layer["index"]] = gone
    if heads:
        run_pass(graph, "remove_heads", {"heads": heads, "min_heads": 0}, inplace=True)
    if neurons:
        run_pass(graph, "remove_ffn_neurons", {"neurons": neurons, "min_neurons": 0}, inplace=True)
    hidden_gone = [] if z_hidden is None else (z_hidden == 0).nonzero().flatten().tolist()
    if hidden_gone:
        run_pass(graph, "remove_hidden", {"dims": hidden_gone}, inplace=True)
    if not (heads or neurons or hidden_gone):
        from .blocks import finish_surgery

        finish_surgery(graph, None)
    return {
        "heads_removed": {i: len(g) for i, g in heads.items()},
        "neurons_removed": {i: len(g) for i, g in neurons.items()},
        "hidden_removed": len(hidden_gone),
    }


def describe_l0(graph) -> dict[str, dict]:
    """Per summary row, the open units at evaluation: ``heads 5/12, ffn 700/1536`` (and the hidden size)."""
    gm, record = graph.module, graph.meta[GATES]
    rows = {}
    for layer in record["layers"]:
        z = _values(gm, layer)
        parts = []
        if "heads" in z or "attention" in z:
            open_heads = int((z["heads"] > 0).sum()) if "heads" in z else layer["heads"]
            shut = "attention" in z and float(z["attention"].max()) == 0
            parts.append(f"heads {0 if shut else open_heads}/{layer['heads']}")
        if "neurons" in z or "ffn" in z:
            open_neurons = int((z["neurons"] > 0).sum()) if "neurons" in z else layer["ffn_width"]
            shut = "ffn" in z and float(z["ffn"].max()) == 0
            parts.append(f"ffn {0 if shut else open_neurons}/{layer['ffn_width']}")
        rows[str(layer["index"])] = {"gates": ", ".join(parts)}
    if record["hidden"]:
        z = gm.get_submodule(record["hidden"]["gate"]).deterministic()
        rows["embeddings"] = {"gates": f"hidden {int((z > 0).sum())}/{record['hidden']['size']}"}
    return rows
