"""The removable structure of an encoder, found from the graph itself, and the surgery on it.

An *attention block* is an ``AttentionCore`` node whose query, key and value come
from three Linear nodes through view/transpose chains and whose output reaches one
Linear (the output projection) through another such chain: the projections' rows
of head ``h`` and the output projection's columns of head ``h`` are coupled. An
*FFN block* is a Linear (up), an elementwise activation, and the Linear it feeds
(down): up's rows and down's columns are coupled. Both are found by walking the fx
graph, so the same code serves every family whose heads are reshaped with ``-1``
(BERT, RoBERTa, XLM-R, Camembert, ELECTRA, DistilBERT); the metadata only labels the
encoder layer. Shared modules (ALBERT) and constant head counts in the reshapes
(DeBERTa-v2) are refused with a clear error.

Shared by ``remove_heads``, ``remove_ffn_neurons``, ``remove_layers``,
``analyze_heads`` and ``structured_search``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from graphprune.ir.masks import mask_of, set_mask, unmasked_weight
from graphprune.ir.metadata import common
from graphprune.ir.modules import AttentionCore
from graphprune.ir.shapes import refresh_shapes

from ..analysis.add_common_metadata import CommonMetadataConfig, add_common_metadata
from ..analysis.add_sparsity_metadata import record_sparsity
from ..analysis.init_metadata import init_node_metadata
from ..analysis.roles import aten_name

_PASS_THROUGH = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias"}
_ACTIVATIONS = {"gelu", "relu", "silu", "tanh", "sigmoid"}
aten = torch.ops.aten


@dataclass
class AttentionBlock:
    layer: int
    core: fx.Node
    qkv: tuple[fx.Node, fx.Node, fx.Node]
    out: fx.Node
    heads: int
    head_size: int


@dataclass
class FfnBlock:
    layer: int
    up: fx.Node
    down: fx.Node
    width: int


class StructureError(ValueError):
    """The graph's structure cannot be edited the way a pass was asked to."""


def _linear(gm: fx.GraphModule, node) -> nn.Linear | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return module
    return None


def _walk_back(gm, node):
    """From a tensor, back through single-input reshapes to the Linear node producing it."""
    while isinstance(node, fx.Node) and _linear(gm, node) is None:
        if node.op != "call_function" or aten_name(node.target) not in _PASS_THROUGH:
            return None
        node = node.args[0]
    return node


def _walk_forward(gm, node):
    """From a node, forward through single-user reshapes to the Linear node consuming it."""
    while True:
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if _linear(gm, user) is not None:
            return user if user.args[0] is node else None
        if user.op != "call_function" or aten_name(user.target) not in _PASS_THROUGH:
            return None
        node = user


def _check_not_shared(gm: fx.GraphModule, pass_name: str) -> None:
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module" and _linear(gm, n) is not None)
    shared = sorted(t for t, c in calls.items() if c > 1)
    if shared:
        raise StructureError(
            f"pass '{pass_name}': Linear layers called more than once ({shared[0]}, ...) share their weights between "
            "encoder layers (ALBERT's shared layer); removing structure from one call would change every call. "
            "Structured pruning supports models with one module per layer (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA)"
        )


def editable(graph, pass_name: str) -> None:
    """Refuse shared layers; make sure every node has its role and layer."""
    _check_not_shared(graph.module, pass_name)
    if any("graphprune.common" not in n.meta for n in graph.module.graph.nodes):
        init_node_metadata(graph)


def attention_blocks(graph, pass_name: str) -> list[AttentionBlock]:
    """Every attention block, in layer order; raises StructureError naming ``pass_name`` if none is editable."""
    gm = graph.module
    editable(graph, pass_name)
    blocks = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), AttentionCore):
            continue
        sources = tuple(_walk_back(gm, a) for a in node.args[:3])
        out = _walk_forward(gm, node)
        val = node.args[0].meta.get("val")
        if None in sources or out is None or not isinstance(val, torch.Tensor) or val.dim() != 4:
            raise StructureError(f"pass '{pass_name}': the attention block at {node.target} does not have the q/k/v -> attention -> output shape it can edit")
        heads, head_size = int(val.shape[1]), int(val.shape[3])
        for source in sources:
            if len(source.users) != 1 or _linear(gm, source).out_features != heads * head_size:
                raise StructureError(f"pass '{pass_name}': {source.target} feeds more than the attention block at {node.target}")
        blocks.append(AttentionBlock(common(node).get("layer"), node, sources, out, heads, head_size))
    if not blocks:
        has_queries = any(common(n).get("role") == "query" for n in gm.graph.nodes)
        why = (
            "its attention has no scaled-dot-product node (DeBERTa-v2's disentangled attention, with the head count fixed in its reshapes), so heads cannot be removed"
            if has_queries
            else "it has no attention blocks"
        )
        raise StructureError(f"pass '{pass_name}': {graph.source.get('model_class', 'this graph')}: {why}")
    return blocks


def ffn_blocks(graph, pass_name: str) -> list[FfnBlock]:
    """Every FFN block (up -> activation -> down), in layer order."""
    gm = graph.module
    editable(graph, pass_name)
    blocks = []
    for node in gm.graph.nodes:
        if common(node).get("role") != "ffn_up" or _linear(gm, node) is None:
            continue
        act = next(iter(node.users)) if len(node.users) == 1 else None
        down = None
        if act is not None and act.op == "call_function" and aten_name(act.target) in _ACTIVATIONS and len(act.users) == 1:
            (down,) = act.users
        if _linear(gm, down) is None or down.args[0] is not act:
            raise StructureError(f"pass '{pass_name}': {node.target} does not feed one activation and one Linear (an FFN block it can edit)")
        blocks.append(FfnBlock(common(node).get("layer"), node, down, _linear(gm, node).out_features))
    if not blocks:
        raise StructureError(f"pass '{pass_name}': {graph.source.get('model_class', 'this graph')} has no FFN blocks")
    return blocks


def _replace_linear(gm: fx.GraphModule, target: str, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Swap the Linear at ``target`` for one keeping only ``rows`` (outputs) and ``cols`` (inputs), masks included."""
    old = gm.get_submodule(target)
    original = unmasked_weight(old)
    weight = original.detach()
    mask = mask_of(old)
    if torch.nn.utils.parametrize.is_parametrized(old) and (mask is None or len(old.parametrizations["weight"]) != 1):
        raise StructureError(f"{target} carries parametrizations other than a graphprune mask; commit or remove them first")
    new_weight = _take(_take(weight, 0, rows), 1, cols)
    with warnings.catch_warnings():  # an emptied block's Linear has no inputs: nothing to initialise, nothing to warn about
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        new = nn.Linear(new_weight.shape[1], new_weight.shape[0], bias=old.bias is not None, device="meta", dtype=weight.dtype)
    # the sliced tensors are fresh copies already: adopt them rather than copy them again
    new.weight = nn.Parameter(new_weight.contiguous(), requires_grad=original.requires_grad)
    if old.bias is not None:
        new.bias = nn.Parameter(_take(old.bias.detach(), 0, rows).contiguous(), requires_grad=unmasked_weight(old, "bias").requires_grad)
    new.train(old.training)
    if mask is not None:
        set_mask(new, _take(_take(mask.mask, 0, rows), 1, cols), movement=hasattr(mask, "scores"))
    gm.set_submodule(target, new)


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
    # the kept indices are built on the CPU; index_select wants them where the weight is (a GPU)
    return tensor if index is None else tensor.index_select(dim, index.to(tensor.device))


def _empty_input(gm: fx.GraphModule, consumer: fx.Node, like: fx.Node) -> fx.Node:
    """Feed ``consumer`` (a Linear with no inputs left) a zero-width slice of ``like``: its output is its bias."""
    with gm.graph.inserting_before(consumer):
        empty = gm.graph.call_function(aten.slice.Tensor, (like, -1, 0, 0))
    empty.meta["nn_module_stack"] = dict(consumer.meta.get("nn_module_stack", {}))
    consumer.args = (empty,) + tuple(consumer.args[1:])
    return empty


def slice_heads(graph, block: AttentionBlock, keep: list[int]) -> list[fx.Node]:
    """Keep only heads ``keep`` of ``block``; with none kept the block's output is its output bias.

    Returns the nodes whose output width changed (for :func:`finish_surgery`).
    """
    gm = graph.module
    rows = torch.cat([torch.arange(h * block.head_size, (h + 1) * block.head_size) for h in keep]) if keep else torch.zeros(0, dtype=torch.long)
    for source in block.qkv:
        _replace_linear(gm, source.target, rows, None)
    _replace_linear(gm, block.out.target, None, rows)
    if not keep:
        return [_empty_input(gm, block.out, block.qkv[0].args[0])]
    return list(block.qkv)


def slice_neurons(graph, block: FfnBlock, keep: list[int]) -> list[fx.Node]:
    """Keep only intermediate neurons ``keep`` of ``block``; with none kept its output is the down bias.

    Returns the nodes whose output width changed (for :func:`finish_surgery`).
    """
    gm = graph.module
    index = torch.as_tensor(sorted(keep), dtype=torch.long)
    _replace_linear(gm, block.up.target, index, None)
    _replace_linear(gm, block.down.target, None, index)
    if not keep:
        return [_empty_input(gm, block.down, block.up.args[0])]
    return [block.up]


def reshaped_nodes(gm: fx.GraphModule, producers: list[fx.Node]) -> list[fx.Node]:
    """The nodes whose shapes change when ``producers`` change width: them, and their users up to the next Linear."""
    seen, stack = set(), [p for p in producers if p.graph is gm.graph]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _linear(gm, node) is not None and node not in producers:
            continue  # a Linear's output width is its own
        stack.extend(node.users)
    return list(seen)


def finish_surgery(graph, producers: list[fx.Node] | None = None) -> None:
    """Drop what the edits left dead, recompile, and bring shapes and metadata up to date.

    ``producers``: the nodes whose output width the edits changed (sliced Linears, new
    slices); only the shapes downstream of them, up to the next Linear, are recomputed.
    None recomputes every shape.
    """
    gm = graph.module
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    refresh_shapes(gm, None if producers is None else reshaped_nodes(gm, producers))
    init_node_metadata(graph)
    if "common" in graph.meta:
        old = graph.meta["common"]
        add_common_metadata(graph, CommonMetadataConfig(seq_len=old.get("seq_len", 128), batch_size=old.get("batch_size", 1)))
    if "sparsity" in graph.meta:
        record_sparsity(graph)
