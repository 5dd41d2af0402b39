"""``demo_magnitude_prune``: a stand-in compression step for the demo, until the pruning issue lands.

It applies ``torch.nn.utils.prune.l1_unstructured`` (the smallest-|w| weights of
each encoder Linear are masked to zero) and leaves the masks reversible, so that a
recovery fine-tune keeps them; ``commit_masks`` folds them in.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils import prune

import graphprune
from graphprune.infra.config import ConfigError, check_range
from graphprune.ir.metadata import common, node_meta

from ..analysis.init_metadata import init_node_metadata

ENCODER_ROLES = ("query", "key", "value", "attention_output", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class DemoMagnitudePruneConfig:
    """Fields:
    sparsity: fraction of each selected weight matrix set to zero, 0 <= sparsity < 1.
    roles: node roles whose Linear weights are pruned (default: the encoder's projections).
    """

    sparsity: float = 0.5
    roles: tuple[str, ...] = ENCODER_ROLES

    def __post_init__(self):
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        allowed = set(ENCODER_ROLES) | {"pooler", "classifier", "embedding_projection"}
        if not self.roles or not set(self.roles) <= allowed:
            raise ConfigError("roles", list(self.roles), f"a non-empty list drawn from {sorted(allowed)}")


@graphprune.register_pass("demo_magnitude_prune", config=DemoMagnitudePruneConfig)
def demo_magnitude_prune(graph, config: DemoMagnitudePruneConfig):
    """Stand-in for the demo: mask the smallest-magnitude weights of encoder Linears (L1, per matrix).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "demo_magnitude_prune", {"sparsity": 0.5})
    """
    gm = graph.module
    if any("role" not in common(n) for n in gm.graph.nodes):
        init_node_metadata(graph)
    pruned: dict[str, float] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or common(node).get("role") not in config.roles:
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or node.target in pruned:
            continue  # ALBERT calls one shared module per layer: prune it once
        current = float((module.weight_mask == 0).float().mean()) if prune.is_pruned(module) else 0.0
        if config.sparsity > current:
            # Pruning again masks a share of what is left (torch's PruningContainer), so
            # ask for the share that brings the total to the target. The original
            # Parameter stays in place: an optimizer holding it keeps working.
            prune.l1_unstructured(module, "weight", amount=(config.sparsity - current) / (1.0 - current))
        pruned[node.target] = float((module.weight == 0).float().mean())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in pruned:
            node_meta(node, "sparsity")["weight"] = pruned[node.target]
    if not pruned:
        raise ValueError(f"pass 'demo_magnitude_prune': no Linear node has a role in {list(config.roles)}")
    total = sum(gm.get_submodule(t).weight.numel() for t in pruned)
    zeros = sum(int((gm.get_submodule(t).weight == 0).sum()) for t in pruned)
    graph.meta["sparsity"] = {"method": "demo_magnitude_prune", "target": config.sparsity, "weight_sparsity": zeros / total}
    return graph, {"modules": len(pruned), "weight_sparsity": zeros / total}
