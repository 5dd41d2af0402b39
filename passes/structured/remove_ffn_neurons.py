"""``remove_ffn_neurons``: physically remove FFN intermediate neurons, listed or chosen by a criterion.

Slices the up projection's rows and the down projection's columns of each removed
neuron: a narrower FFN, fewer FLOPs, a faster dense forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import graphprune

from .blocks import ffn_blocks, finish_surgery, slice_neurons
from .importance import CRITERIA, unit_scores
from .selection import check_unit_config, choose_removals, lowest_scores


@dataclass(frozen=True)
class RemoveFfnNeuronsConfig:
    """Fields:
    neurons: explicit ``{layer: [neuron indices]}`` to remove (TOML: string keys); if set, the criterion is not used.
    method: criterion when ``neurons`` is not set: l1 (weights) | taylor (neuron-mask gradient) | fisher.
    fraction: share of all intermediate neurons to remove by the criterion, 0 <= fraction < 1 (default 0.25).
    scope: global (rank all neurons, per-layer normalised) | local (the same fraction in every layer).
    min_neurons: neurons every layer keeps (default 1); 0 allows emptying a layer's FFN.
    num_samples: calibration examples for taylor and fisher (default 256).
    """

    neurons: dict | None = None
    method: str = "taylor"
    fraction: float = 0.25
    scope: str = "global"
    min_neurons: int = 1
    num_samples: int = 256

    def __post_init__(self):
        check_unit_config(self, "neurons", "min_neurons", CRITERIA)


@graphprune.register_pass("remove_ffn_neurons", config=RemoveFfnNeuronsConfig)
def remove_ffn_neurons(graph, config: RemoveFfnNeuronsConfig, data=None):
    """Remove FFN neurons (explicit, or the lowest by l1, taylor or fisher), slicing up rows and down columns.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "remove_ffn_neurons", {"method": "l1", "fraction": 0.5, "scope": "local"})
        >>> info["ffn_width_per_layer"]
    """
    blocks = ffn_blocks(graph, "remove_ffn_neurons")
    sizes = [b.width for b in blocks]
    removed = choose_removals(
        "remove_ffn_neurons", config.neurons, "neurons", sizes, config.min_neurons, "neuron",
        lambda: lowest_scores(unit_scores(graph, "neurons", blocks, config.method, data, config.num_samples, "pass 'remove_ffn_neurons'"),
                              config.fraction, config.scope, config.min_neurons),
    )
    changed = []
    for layer, (block, gone) in enumerate(zip(blocks, removed)):
        if gone:
            dropped = set(gone)
            changed += slice_neurons(graph, block, [i for i in range(block.width) if i not in dropped])
            graph.record_edit({"pass": "remove_ffn_neurons", "layer": layer, "removed": len(gone), "width_before": block.width})
    finish_surgery(graph, changed)
    return graph, {
        "ffn_width_per_layer": [n - len(gone) for n, gone in zip(sizes, removed)],
        "neurons_removed": sum(len(g) for g in removed),
    }
