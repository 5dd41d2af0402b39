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
    A layer is found by its nodes' ``layer`` record, so one whose every attention head
    was removed (no query projection left) still counts, with its place in the stack.
    """
    gm = graph.module
    if not any("graphprune.common" in n.meta for n in gm.graph.nodes):
        raise LayerStructureError(f"{caller}: the graph has no node metadata; run the 'init_metadata' pass first")
    nodes = list(gm.graph.nodes)
    layers: dict[int, list[fx.Node]] = {}
    for node in nodes:
        layer = common(node).get("layer")
        if isinstance(layer, int) and not isinstance(layer, bool):
            layers.setdefault(layer, []).append(node)
    if not layers:
        raise LayerStructureError(f"{caller}: {graph.source.get('model_class', 'this graph')} has no encoder layers it can find")
    spans = []
    for position, layer in enumerate(sorted(layers)):
        inside = set(layers[layer])
        leaving = [n for n in layers[layer] if any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            raise LayerStructureError(f"{caller}: encoder layer {layer} has {len(leaving)} outputs, not one")
        query = next((n for n in layers[layer] if common(n).get("role") == "query"), None)
        if query is not None:
            source, reader = query.args[0], query
        else:
            # No attention left: the hidden state is what the layer's first computing node reads from outside it
            # (the residual's slice; masks are placeholders and weights get_attr nodes, neither computed).
            reader, source = next(((n, a) for n in layers[layer] for a in n.all_input_nodes
                                   if a not in inside and a.op.startswith("call_")), (None, None))
            if reader is None:
                raise LayerStructureError(f"{caller}: encoder layer {layer} reads no hidden state from outside it")
        spans.append(LayerSpan(position, source, leaving[0], reader))
    return spans
