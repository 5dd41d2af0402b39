"""``add_sparsity_metadata``: per-layer weight sparsity and activation pruning, in the metadata.

Counts the zero weights of every Linear layer (masked ones, for a masked layer) and the
activation-pruning settings ``prune_activation`` recorded, and writes:

- on each Linear node, ``node.meta["graphprune.sparsity"]``: ``weight_sparsity``
  (share of zero weights), ``masked`` (an uncommitted mask is on it), and the
  ``weight``/``activation`` records of the passes that pruned it;
- ``graph.meta["sparsity"]``: per encoder layer ``weight_sparsity`` (over its Linear
  weights) and ``activation_sparsity`` (mean input sparsity of its Linear layers),
  the same for the head, and totals.

``graph.summary()`` and ``graphprune info`` show these columns.
"""

from __future__ import annotations

from torch import nn

import graphprune
from graphprune.ir.masks import mask_of, unmasked_weight, zero_weights
from graphprune.ir.metadata import common, node_meta

from .init_metadata import init_node_metadata


def record_sparsity(graph) -> dict:
    """Write the sparsity metadata (see the module docstring) and return ``graph.meta["sparsity"]``."""
    gm = graph.module
    if any("role" not in common(n) for n in gm.graph.nodes):
        init_node_metadata(graph)
    layers: dict[object, dict] = {}
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear):
            continue
        numel = unmasked_weight(module).numel()
        zeros = zero_weights(module)
        meta = node_meta(node, "sparsity")
        meta["weight_sparsity"] = zeros / numel if numel else 0.0  # (empty: every head of its layer removed)
        meta["masked"] = mask_of(module) is not None
        activation = meta.get("activation", {}).get("sparsity", 0.0)
        layer = common(node).get("layer")
        group = layers.setdefault("head" if layer is None else layer, {"weights": 0, "zeros": 0, "activation": [], "masked": False})
        group["activation"].append(activation)
        if node.target not in seen:  # a shared module's weights count once
            seen.add(node.target)
            group["weights"] += numel
            group["zeros"] += zeros
            group["masked"] |= meta["masked"]

    def row(group: dict) -> dict:
        return {
            "weight_sparsity": group["zeros"] / group["weights"] if group["weights"] else 0.0,
            "activation_sparsity": sum(group["activation"]) / len(group["activation"]) if group["activation"] else 0.0,
            "masked": group["masked"],
            "linear_weights": group["weights"],
            "zero_weights": group["zeros"],
        }

    indices = sorted(k for k in layers if k != "head")
    weights = sum(g["weights"] for g in layers.values())
    zeros = sum(g["zeros"] for g in layers.values())
    graph.meta["sparsity"] = {
        "layers": [{"index": i, **row(layers[i])} for i in indices],
        "head": row(layers["head"]) if "head" in layers else None,
        "totals": {
            "linear_weights": weights,
            "zero_weights": zeros,
            "weight_sparsity": zeros / weights if weights else 0.0,
            "activation_pruned_layers": sum(1 for n in gm.graph.nodes if "activation" in n.meta.get("graphprune.sparsity", {})),
            "masked": any(g["masked"] for g in layers.values()),
        },
    }
    return graph.meta["sparsity"]


@graphprune.register_pass("add_sparsity_metadata", kind="analysis")
def add_sparsity_metadata(graph, config):
    """Record each layer's weight sparsity and activation pruning in the metadata (shown by summary()).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "add_sparsity_metadata")
        >>> graph.meta["sparsity"]["totals"]["weight_sparsity"]
        0.5
    """
    totals = record_sparsity(graph)["totals"]
    return graph, {"weight_sparsity": totals["weight_sparsity"], "activation_pruned_layers": totals["activation_pruned_layers"]}
