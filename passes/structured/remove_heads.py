"""``remove_heads``: physically remove attention heads, listed or chosen by a criterion.

Slices the head's query, key and value rows and its output-projection columns, so
the attention block really computes fewer heads (fewer FLOPs, faster on a dense
CPU). The blocks are found from the graph (see ``blocks``), so every supported
family works without attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass

import graphprune

from .blocks import attention_blocks, finish_surgery, slice_heads
from .importance import CRITERIA, unit_scores
from .selection import check_unit_config, choose_removals, lowest_scores


@dataclass(frozen=True)
class RemoveHeadsConfig:
    """Fields:
    heads: explicit ``{layer: [head indices]}`` to remove (TOML: string keys); if set, the criterion is not used.
    method: criterion when ``heads`` is not set: l1 (weights) | taylor (head-mask gradient, Michel et al.) | fisher.
    fraction: share of all heads to remove by the criterion, 0 <= fraction < 1 (default 0.25).
    scope: global (rank all heads, per-layer normalised) | local (the same fraction in every layer).
    min_heads: heads every layer keeps (default 1); 0 allows emptying a layer's attention.
    num_samples: calibration examples for taylor and fisher (default 256).
    """

    heads: dict | None = None
    method: str = "taylor"
    fraction: float = 0.25
    scope: str = "global"
    min_heads: int = 1
    num_samples: int = 256

    def __post_init__(self):
        check_unit_config(self, "heads", "min_heads", CRITERIA)


@graphprune.register_pass("remove_heads", config=RemoveHeadsConfig)
def remove_heads(graph, config: RemoveHeadsConfig, data=None):
    """Remove attention heads (explicit, or the lowest by l1, taylor or fisher), slicing q/k/v rows and output columns.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "remove_heads", {"heads": {0: [1, 5], 3: [0]}})
        >>> graph, info = graphprune.run_pass(graph, "remove_heads", {"method": "taylor", "fraction": 0.3}, data=train)
        >>> info["heads_per_layer"]
    """
    blocks = attention_blocks(graph, "remove_heads")
    sizes = [b.heads for b in blocks]
    removed = choose_removals(
        "remove_heads", config.heads, "heads", sizes, config.min_heads, "head",
        lambda: lowest_scores(unit_scores(graph, "heads", blocks, config.method, data, config.num_samples, "pass 'remove_heads'"),
                              config.fraction, config.scope, config.min_heads),
    )
    changed = []
    for layer, (block, gone) in enumerate(zip(blocks, removed)):
        if gone:
            changed += slice_heads(graph, block, [h for h in range(block.heads) if h not in gone])
            graph.record_edit({"pass": "remove_heads", "layer": layer, "removed": gone, "heads_before": block.heads})
    finish_surgery(graph, changed)
    return graph, {
        "removed": {layer: gone for layer, gone in enumerate(removed) if gone},
        "heads_per_layer": [n - len(gone) for n, gone in zip(sizes, removed)],
        "heads_removed": sum(len(g) for g in removed),
    }
