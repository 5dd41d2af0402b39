"""``prune_activation``: sparsify the inputs of selected Linear layers at run time, as a graph rewrite.

For each selected Linear call ``y = linear(x)`` the pass inserts ATen nodes before it:

- ``l1``: per token, keep the features whose magnitude is above the token's own
  ``(d - k)``-th smallest magnitude, so each token keeps its ``k = d - round(s * d)``
  largest features (ties at the boundary are pruned). Tokens never mix, so padding
  cannot change what a real token keeps::

      abs = aten.abs(x); thr = aten.kthvalue(abs, d - k, -1, keepdim)[0]; x' = x * (abs > thr)

- ``random``: a fixed, seeded set of ``k`` input features is kept for every token
  (a 0/1 buffer on the graph module)::

      x' = x * activation_keep_<node>

The new nodes are ordinary graph nodes: ``graph.module.code`` shows them, checkpoints
save them, gradients flow through the kept features, and running the pass again
replaces them (sparsity 0 removes them).
"""

from __future__ import annotations

import operator
import zlib
from dataclasses import dataclass, field

import torch

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.metadata import key, node_meta
from graphprune.ir.shapes import refresh_shapes

from ..analysis.add_sparsity_metadata import record_sparsity
from .targets import resolve_entries, select_targets

aten = torch.ops.aten
MARK = key("activation_prune")  # on inserted nodes: the Linear node they feed
METHOD_ALIASES = {"l1-norm": "l1", "magnitude": "l1"}


@dataclass(frozen=True)
class ActivationEntry:
    """How much and how to sparsify the inputs an entry selects.

    Fields:
        sparsity: share of each token's input features set to zero, 0 <= sparsity < 1 (default 0.5).
        method: l1 (each token keeps its largest magnitudes) | random (a fixed seeded feature set).
        scope: local only: each token on its own (a global threshold would mix tokens and padding).
        granularity: element only.
    """

    sparsity: float = 0.5
    method: str = "l1"
    scope: str = "local"
    granularity: str = "element"

    def __post_init__(self):
        object.__setattr__(self, "method", METHOD_ALIASES.get(self.method, self.method))
        object.__setattr__(self, "granularity", "element" if self.granularity == "elementwise" else self.granularity)
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_choice("method", self.method, ("l1", "random"))
        if self.scope != "local":
            raise ConfigError("scope", self.scope, "'local': activations are pruned per token (a global threshold would mix tokens and padding)")
        check_choice("granularity", self.granularity, ("element",))


@dataclass(frozen=True)
class PruneActivationConfig:
    """Fields:
    sparsity, method, scope, granularity: the default entry's fields (see ``ActivationEntry``).
    by: how other keys select layers: role (default) | type | name (a regex on module paths).
    default: the default entry as a table.
    <role, type or regex>: an entry for what it selects.
    seed: for the random method.
    """

    EXTRA_FIELD = "entries"

    sparsity: float | None = None
    method: str | None = None
    scope: str | None = None
    granularity: str | None = None
    by: str = "role"
    default: ActivationEntry | None = None
    entries: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        default, entries = resolve_entries(self, ActivationEntry)
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "entries", entries)
        for name in ("sparsity", "method", "scope", "granularity"):
            object.__setattr__(self, name, getattr(default, name))


@graphprune.register_pass("prune_activation", config=PruneActivationConfig)
def prune_activation(graph, config: PruneActivationConfig):
    """Zero the smallest (or random) input features of selected Linear layers, per token, as new graph nodes.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "prune_activation", {"sparsity": 0.5, "method": "l1"})
        >>> print(graph.module.code)  # abs, kthvalue, gt, mul before each pruned Linear
    """
    gm = graph.module
    targets = select_targets(graph, config.by, config.default, config.entries, every_call=True)
    if not targets:
        raise ValueError("pass 'prune_activation': no Linear layer is selected (check 'by' and the entries)")
    rewritten = 0
    for target in targets:
        node, entry = target.node, target.entry
        _remove_existing(gm, node)
        features = target.module.in_features
        kept = features - round(entry.sparsity * features)
        meta = node_meta(node, "sparsity")
        meta.pop("activation", None)
        if kept == features:
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            if entry.method == "l1":
                magnitude = _mark(gm.graph.call_function(aten.abs.default, (x,)), node)
                kth = _mark(gm.graph.call_function(aten.kthvalue.default, (magnitude, features - kept, -1, True)), node)
                threshold = _mark(gm.graph.call_function(operator.getitem, (kth, 0)), node)
                keep = _mark(gm.graph.call_function(aten.gt.Tensor, (magnitude, threshold)), node)
            else:
                name = f"activation_keep_{node.name}"
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(node.name.encode()))
                chosen = torch.randperm(features, generator=generator)[:kept]
                buffer = torch.zeros(features, dtype=target.module.weight.dtype, device=target.module.weight.device)
                buffer[chosen.to(buffer.device)] = 1.0
                gm.register_buffer(name, buffer)
                keep = _mark(gm.graph.get_attr(name), node)
            pruned = _mark(gm.graph.call_function(aten.mul.Tensor, (x, keep)), node)
        node.args = (pruned,) + tuple(node.args[1:])
        meta["activation"] = {"method": entry.method, "sparsity": entry.sparsity, "kept_features": kept, "features": features}
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    refresh_shapes(gm)
    record_sparsity(graph)
    return graph, {"rewritten": rewritten}


def _mark(new: torch.fx.Node, linear: torch.fx.Node) -> torch.fx.Node:
    new.meta[MARK] = {"feeds": linear.name}
    return new


def _remove_existing(gm, linear: torch.fx.Node) -> None:
    """Undo an earlier rewrite of ``linear``: feed it its original input again."""
    inserted = [n for n in gm.graph.nodes if n.meta.get(MARK, {}).get("feeds") == linear.name]
    if not inserted:
        return
    product = next(n for n in inserted if n.target is aten.mul.Tensor)
    linear.args = (product.args[0],) + tuple(linear.args[1:])
    for n in reversed(inserted):
        if n.op == "get_attr":
            delattr(gm, n.target)
        gm.graph.erase_node(n)
