"""The hidden dimension shared by every layer (the residual stream), found from the graph.

The stream starts at the embedding tables whose width is the model's hidden size and
flows through additions, dropout, gate products, LayerNorms and row selections (the
pooler's first token). Linears that read it (q/k/v, FFN up, pooler, token heads) lose
input columns when a hidden dimension goes; Linears whose output is added into it (the
attention output projection, the FFN down projection) lose rows; embeddings and
LayerNorms lose the dimension. Anything else the stream reaches (a reshape with the
width written in, a matmul, a tied decoder) cannot be cut and is refused by name.

``GatedLayerNorm`` is the LayerNorm of a graph whose hidden dimensions are gated
(``l0_structured``): statistics over the dimensions whose gate is open only, zero
elsewhere, which is what the LayerNorm of the committed, narrower graph computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.ir.modules import register_module_type

from ..analysis.roles import aten_name
from .blocks import StructureError, _linear

_ELEMENTWISE = {"add", "sub"}
_SELECTS = {"select", "slice"}  # along a dimension other than the hidden one
_PASS = {"clone", "contiguous", "alias"}


class GatedLayerNorm(nn.LayerNorm):
    """``forward(x, z)``: LayerNorm over the dimensions where ``z != 0``; closed dimensions are 0."""

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None or torch._guards.detect_fake_mode() is not None or bool((z != 0).all()):
            return super().forward(x)
        keep = (z.reshape(-1) != 0).nonzero().squeeze(1)
        weight = self.weight[keep] if self.weight is not None else None
        bias = self.bias[keep] if self.bias is not None else None
        normed = F.layer_norm(x.index_select(-1, keep), (len(keep),), weight, bias, self.eps)
        return x.new_zeros(x.shape).index_copy(-1, keep, normed)

    @classmethod
    def replacing(cls, norm: nn.LayerNorm) -> "GatedLayerNorm":
        gated = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine, bias=norm.bias is not None, device="meta")
        gated.weight, gated.bias = norm.weight, norm.bias  # the same Parameters: the optimizer and ties keep working
        return gated.train(norm.training)


register_module_type(
    "graphprune.GatedLayerNorm",
    GatedLayerNorm,
    lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "elementwise_affine": m.elementwise_affine, "bias": m.bias is not None},
    lambda c: GatedLayerNorm(c["normalized_shape"], eps=c["eps"], elementwise_affine=c["elementwise_affine"], bias=c["bias"]),
)


@dataclass
class HiddenStream:
    hidden: int
    embeddings: list[fx.Node] = field(default_factory=list)  # tables writing the stream: columns cut
    norms: list[fx.Node] = field(default_factory=list)  # LayerNorms on the stream
    writers: list[fx.Node] = field(default_factory=list)  # Linears added into the stream: rows cut
    readers: list[fx.Node] = field(default_factory=list)  # Linears reading the stream: columns cut
    nodes: set = field(default_factory=set)  # every node carrying the stream


def current_hidden_size(graph) -> int | None:
    """The width of the word embeddings (the table ``input_ids`` index): the hidden size as the graph is now."""
    gm = graph.module
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target == "input_ids":
            for user in node.users:
                if isinstance(_module(gm, user), nn.Embedding):
                    return gm.get_submodule(user.target).embedding_dim
    return None


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def hidden_stream(graph, pass_name: str) -> HiddenStream:
    """Find the residual stream of ``graph``; StructureError naming ``pass_name`` where it cannot be cut."""
    gm = graph.module
    hidden = current_hidden_size(graph)
    if hidden is None:
        raise StructureError(f"pass '{pass_name}': the graph has no word embedding table (fed by input_ids) to find the hidden size from")
    stream = HiddenStream(hidden)
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, nn.Embedding) and module.embedding_dim == hidden:
            stream.embeddings.append(node)
            stream.nodes.add(node)
    if not stream.embeddings:
        raise StructureError(f"pass '{pass_name}': no embedding table of width {hidden} starts a hidden stream")
    work = list(stream.embeddings)
    while work:
        node = work.pop()
        for user in list(node.users):
            if user in stream.nodes or user in stream.readers:
                continue
            kind = _classify(gm, user, node, hidden)
            if kind == "reader":
                stream.readers.append(user)
                continue
            if kind == "output":
                continue
            if kind is None:
                raise StructureError(
                    f"pass '{pass_name}': the hidden dimension flows into {user.name} ({user.target}), which cannot be narrowed"
                )
            if kind == "norm":
                stream.norms.append(user)
            if kind == "add":
                for other in user.args:
                    if isinstance(other, fx.Node) and other is not node and other not in stream.nodes:
                        work += _trace_writer(gm, other, stream, pass_name)
            stream.nodes.add(user)
            work.append(user)
    for node in stream.writers + stream.readers:
        if any(gm.get_submodule(node.target).weight is gm.get_submodule(e.target).weight for e in stream.embeddings):
            raise StructureError(f"pass '{pass_name}': {node.target} shares its weight with an embedding table (tied); the hidden size cannot be cut")
    return stream


def _classify(gm, user: fx.Node, node: fx.Node, hidden: int) -> str | None:
    module = _module(gm, user)
    if user.op == "output":
        return "output"
    if isinstance(module, nn.Linear):
        return "reader" if user.args[0] is node and module.in_features == hidden else None
    if isinstance(module, nn.LayerNorm):
        return "norm" if tuple(module.normalized_shape) == (hidden,) and user.args[0] is node else None
    if isinstance(module, nn.Dropout):
        return "pass"
    if user.op != "call_function":
        return None
    name = aten_name(user.target)
    if name in _ELEMENTWISE:
        return "add"
    if name == "mul" and user.meta.get("graphprune.gate_product"):
        return "pass"
    if name in _PASS:
        return "pass"
    if name == "slice" and user.args[1:] == (-1, 0, 0):
        return "output"  # an emptied block's zero-width input (blocks._empty_input): nothing of the stream is read
    if name in _SELECTS and len(user.args) > 1 and user.args[1] not in (-1, _rank(node) - 1):
        return "pass"
    return None


def _rank(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else 3


def _trace_writer(gm, node: fx.Node, stream: HiddenStream, pass_name: str) -> list[fx.Node]:
    """Back from an addend of the stream to the Linears and embedding tables that write it; returns new stream nodes."""
    if node in stream.nodes:
        return []
    module = _module(gm, node)
    if isinstance(module, nn.Embedding) and module.embedding_dim == stream.hidden:
        stream.embeddings.append(node)
    elif _linear(gm, node) is not None:
        if module.out_features != stream.hidden:
            raise StructureError(f"pass '{pass_name}': {node.target} adds {module.out_features} values into the hidden stream of {stream.hidden}")
        stream.writers.append(node)
        return []  # a writer's output width is its own: it is narrowed, not carried
    elif node.op == "call_function" and aten_name(node.target) in _ELEMENTWISE:
        found = [node]
        stream.nodes.add(node)
        for arg in node.args:
            if isinstance(arg, fx.Node):
                found += _trace_writer(gm, arg, stream, pass_name)
        return found
    else:
        passing = isinstance(module, nn.Dropout) or (
            node.op == "call_function" and (aten_name(node.target) in _PASS or node.meta.get("graphprune.gate_product"))
        )
        if not passing:
            raise StructureError(f"pass '{pass_name}': {node.name} ({node.target}) is added into the hidden stream but is not a projection it can narrow")
        found = [node] + _trace_writer(gm, node.args[0], stream, pass_name)
        stream.nodes.add(node)
        return found
    stream.nodes.add(node)
    return [node]
