"""Where each encoder layer starts and ends in a graph, read from the node metadata.

A layer is the set of nodes ``init_metadata`` put in it (``graphprune.common``'s
``layer``); its input is what its query projection reads and its output is the one
node whose value leaves the layer. ``remove_layers``, LayerDrop and the layer-wise
hidden-state distillation all use these spans.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .metadata import common


@dataclass(frozen=True)
class LayerSpan:
    index: int
    input: fx.Node  # the hidden state the layer reads
    output: fx.Node  # the one node whose value leaves the layer
    reader: fx.Node  # the first node that reads the input (the query projection)


class LayerStructureError(ValueError):
    """The graph's encoder layers cannot be found, or have more than one output."""


def layer_spans(graph, caller: str) -> list[LayerSpan]:
    """Per encoder layer, in order, its span; ``caller`` names who asks, in errors.

    Needs ``init_metadata`` (every pass that edits layers runs it first); nodes added
    since without metadata (a training-time LayerDrop skip) count as outside every layer.
    """
    gm = graph.module
    if not any("graphprune.common" in n.meta for n in gm.graph.nodes):
        raise LayerStructureError(f"{caller}: the graph has no node metadata; run the 'init_metadata' pass first")
    queries = [n for n in gm.graph.nodes if common(n).get("role") == "query"]
    if not queries:
        raise LayerStructureError(f"{caller}: {graph.source.get('model_class', 'this graph')} has no encoder layers it can find")
    spans = []
    for position, query in enumerate(queries):
        layer = common(query).get("layer")
        inside = {n for n in gm.graph.nodes if common(n).get("layer") == layer}
        leaving = [n for n in inside if any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            raise LayerStructureError(f"{caller}: encoder layer {layer} has {len(leaving)} outputs, not one")
        spans.append(LayerSpan(position, query.args[0], leaving[0], query))
    return spans
