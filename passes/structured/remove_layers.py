"""``remove_layers``: drop whole encoder layers, listed or chosen by how little they change their input.

A layer is the set of nodes the metadata puts in it; its input is what its attention
block reads and its output is the one node whose value leaves the layer. Removing
the layer feeds its input straight to its output's users and deletes the rest, so
the graph is one layer shorter (and the remaining layers are renumbered from 0).

The ``similarity`` criterion (Gromov et al. 2024, "The Unreasonable Ineffectiveness
of the Deeper Layers") removes the layers whose output is closest to their input:
the mean cosine similarity of each real token's hidden state before and after the
layer, over calibration data.

Two fixed schedules choose by position instead, for a model trained with LayerDrop
(Fan et al. 2019, who prune such a model by keeping every other layer):
``every_other`` removes layers 1, 3, 5, ... and ``evenly`` keeps ``depth`` evenly
spaced layers, always the first and the last (indices ``round(i (L - 1) / (depth - 1))``,
halves rounded up; ``depth = 1`` keeps the first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.layers import LayerStructureError
from graphprune.ir.layers import layer_spans as spans_of
from graphprune.training.calibration import StagedForward, calibration_batches

from .blocks import StructureError, editable, finish_surgery

METHODS = ("similarity",)
SCHEDULES = ("every_other", "evenly")


@dataclass(frozen=True)
class RemoveLayersConfig:
    """Fields:
    layers: explicit encoder layer indices to remove; if set, the criterion is not used.
    method: criterion when ``layers`` is not set: similarity (input-output cosine, highest removed first).
    count: how many layers the criterion removes (default 1).
    num_samples: calibration examples for the criterion (default 128).
    schedule: choose by position, not by the criterion: every_other (remove layers 1, 3, 5, ...)
        or evenly (keep ``depth`` evenly spaced layers, the first and the last among them).
    depth: how many layers to keep, with schedule evenly; ``depth`` alone means evenly.
    ``layers``, if set, wins over ``schedule`` and ``depth``.
    """

    layers: list[int] | None = None
    method: str = "similarity"
    count: int = 1
    num_samples: int = 128
    schedule: str | None = None
    depth: int | None = None

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_range("count", self.count, 1)
        check_range("num_samples", self.num_samples, 1)
        if self.schedule is not None:
            check_choice("schedule", self.schedule, SCHEDULES)
        if self.depth is not None:
            check_range("depth", self.depth, 1)
            if self.schedule == "every_other":
                raise ConfigError("depth", self.depth, "no depth with schedule 'every_other' (it keeps layers 0, 2, 4, ...)")
        if self.schedule == "evenly" and self.depth is None:
            raise ConfigError("depth", None, "the number of layers to keep (an integer >= 1) with schedule 'evenly'")

    @property
    def by_position(self) -> str | None:
        """The schedule that chooses the layers, if any (``depth`` alone means evenly)."""
        return self.schedule or ("evenly" if self.depth is not None else None)


def layer_spans(graph) -> list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]]:
    """Per encoder layer, (input node, output node, the node that reads the input first: the query projection)."""
    editable(graph, "remove_layers")
    try:
        return [(s.input, s.output, s.reader) for s in spans_of(graph, "pass 'remove_layers'")]
    except LayerStructureError as error:
        raise StructureError(str(error)) from None


def scheduled_removal(schedule: str, depth: int | None, num_layers: int) -> list[int]:
    """The layers ``schedule`` removes from ``num_layers`` (see the module docstring)."""
    if schedule == "every_other":
        return list(range(1, num_layers, 2))
    if not 1 <= depth < num_layers:
        raise ValueError(f"pass 'remove_layers': {ConfigError('depth', depth, f'an integer in 1..{num_layers - 1} (the graph has {num_layers} layers)')}")
    # Rounded half up in integers, so the choice does not depend on float rounding; depth 1 keeps the first.
    keep = {0} if depth == 1 else {(2 * i * (num_layers - 1) + depth - 1) // (2 * (depth - 1)) for i in range(depth)}
    return [i for i in range(num_layers) if i not in keep]


def similarity_scores(graph, spans, batches) -> list[float]:
    """Mean cosine similarity between each layer's input and output hidden states (real tokens)."""
    run = StagedForward(graph, batches)
    order = {n: i for i, n in enumerate(graph.module.graph.nodes)}
    scores = []
    for source, output, reader in spans:
        run.advance_to(reader)
        before = torch.cat(run.rows_of(source))
        run.advance_to(min(output.users, key=order.get))
        after = torch.cat(run.rows_of(output))
        scores.append(float(F.cosine_similarity(before, after, dim=-1).mean()))
    return scores


@graphprune.register_pass("remove_layers", config=RemoveLayersConfig)
def remove_layers(graph, config: RemoveLayersConfig, data=None):
    """Remove whole encoder layers (explicit indices, or those that change their input least) and rewire the graph.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "remove_layers", {"layers": [4, 5]})
        >>> graph, info = graphprune.run_pass(graph, "remove_layers", {"count": 2}, data=train)
        >>> graph, info = graphprune.run_pass(graph, "remove_layers", {"schedule": "every_other"})  # after LayerDrop
        >>> graph, info = graphprune.run_pass(graph, "remove_layers", {"depth": 3})  # keep 3 evenly spaced layers
    """
    spans = layer_spans(graph)
    if config.layers is not None:
        chosen = sorted(set(config.layers))
        if any(not 0 <= i < len(spans) for i in chosen):
            raise ValueError(f"pass 'remove_layers': {ConfigError('layers', config.layers, f'layer indices in 0..{len(spans) - 1}')}")
        scores = None
    elif config.by_position is not None:
        chosen, scores = scheduled_removal(config.by_position, config.depth, len(spans)), None
    else:
        batches = calibration_batches(graph, data, num_samples=config.num_samples, caller="pass 'remove_layers' (method 'similarity')")
        scores = similarity_scores(graph, spans, batches)
        chosen = sorted(sorted(range(len(spans)), key=lambda i: -scores[i])[: config.count])
    if len(chosen) >= len(spans):
        raise ValueError(f"pass 'remove_layers': {ConfigError('layers', chosen, f'at most {len(spans) - 1} of the {len(spans)} layers removed')}")
    for index in reversed(chosen):  # from the top, so each layer's input node is still in place
        source, output, _ = spans[index]
        output.replace_all_uses_with(source)
        graph.record_edit({"pass": "remove_layers", "layer": index})
    finish_surgery(graph, [])  # no shape changes: the layer's output had its input's shape
    return graph, {"removed": chosen, "num_layers": len(spans) - len(chosen), **({"similarity": scores} if scores else {})}
