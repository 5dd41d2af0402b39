"""``init_metadata``: give every node a fresh ``graphprune.common`` record."""

from __future__ import annotations

from torch import fx

import graphprune
from graphprune.ir.lifting import owner_path
from graphprune.ir.metadata import COMMON, common, key

from .roles import layer_keys, node_kind, node_role


def _target(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else str(node.target)


def init_node_metadata(graph) -> None:
    """Write identity fields (name, op, target, kind, module, role, layer) on every node."""
    gm = graph.module
    layers = layer_keys(gm)
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        path = node.target if node.op == "call_module" else owner_path(node)
        stack = node.meta.get("nn_module_stack") or {}
        module_class = type(module).__name__ if module is not None else (
            list(stack.values())[-1][1].rsplit(".", 1)[-1] if stack and path else None
        )
        layer = layers.get(node.name)
        node.meta[key(COMMON)] = {
            "name": node.name,
            "op": node.op,
            "target": _target(node),
            "kind": node_kind(node, module),
            "module": path,
            "module_class": module_class,
            "role": node_role(node, module, layer),
            "layer": layer,
        }


def nodes_by_section(graph):
    """``(node, section)`` in graph order: the node's encoder layer, else ``"embeddings"``
    before the first layer and ``"head"`` after it (identity metadata written first if missing)."""
    gm = graph.module
    if any("role" not in common(n) for n in gm.graph.nodes):
        init_node_metadata(graph)
    in_layers = False
    for node in gm.graph.nodes:
        layer = common(node).get("layer")
        in_layers |= layer is not None
        yield node, layer if layer is not None else ("head" if in_layers else "embeddings")


@graphprune.register_pass("init_metadata", kind="analysis")
def init_metadata(graph, config):
    """Reset common metadata: node identity, kind, owning module, role and encoder layer.

    Other concerns' metadata (sparsity, quantization, ...) is left alone.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "init_metadata")
    """
    init_node_metadata(graph)
    graph.meta[COMMON] = {"model_class": graph.source.get("model_class"), "family": graph.source.get("model_type")}
    return graph, {"nodes": len(graph.module.graph.nodes)}
