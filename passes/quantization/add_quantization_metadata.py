"""``add_quantization_metadata``: average bits per weight and per activation, per layer and in total.

Reads the quantizers the ``quantize`` pass installed and writes ``graph.meta["quantize"]``:

- ``embeddings``, ``layers`` (one row per encoder layer, with ``index``), ``head`` and
  ``totals``, each with ``formats`` (the formats used), ``quantized_nodes``,
  ``weight_bits`` and ``activation_bits``, and the element counts they average over;
- ``weight_bits``: over every parameter of the graph (each tied tensor once), a
  quantized one at its format's bits (a block's shared exponent or scale spread over
  the block), any other at its dtype's (32 for float32);
- ``activation_bits``: over the inputs of every op the pass can quantize (Linear and
  LayerNorm inputs, the attention matmuls' query, key, probabilities and value,
  element-wise inputs), weighted by their element counts for one example of
  ``seq_len`` tokens (the common metadata's, else 128).

The ``quantize`` pass calls it; ``graph.summary()`` and ``graphprune info`` show it.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

import graphprune
from graphprune.ir.fx_utils import fetch_attr
from graphprune.ir.metadata import COMMON, evaluate, key
from graphprune.ir.shapes import dim_names, shape_list

from .quantizers import (
    ATTENTION_OPERANDS,
    QuantizedAttentionCore,
    data_inputs,
    inserted_quantizers,
    op_type,
    tensor_quantizer,
)
from ..analysis.init_metadata import nodes_by_section

DEFAULT_SEQ_LEN = 128
QUANTIZE = key("quantize")


class _Tally:
    def __init__(self):
        self.formats: set[str] = set()
        self.nodes = 0
        self.weights = self.weight_bits = 0
        self.activations = self.activation_bits = 0

    def weight(self, numel: int, bits: float) -> None:
        self.weights += numel
        self.weight_bits += numel * bits

    def activation(self, numel: int, bits: float) -> None:
        self.activations += numel
        self.activation_bits += numel * bits

    def add(self, other: "_Tally") -> None:
        self.formats |= other.formats
        self.nodes += other.nodes
        self.weights += other.weights
        self.weight_bits += other.weight_bits
        self.activations += other.activations
        self.activation_bits += other.activation_bits

    def row(self) -> dict:
        return {
            "formats": sorted(self.formats),
            "quantized_nodes": self.nodes,
            "weight_bits": self.weight_bits / self.weights if self.weights else None,
            "activation_bits": self.activation_bits / self.activations if self.activations else None,
            "weights": self.weights,
            "activations": self.activations,
        }


def record_quantization(graph) -> dict:
    """Write ``graph.meta["quantize"]`` (see the module docstring) and return it."""
    gm = graph.module
    seq = (graph.meta.get(COMMON) or {}).get("seq_len") or DEFAULT_SEQ_LEN
    names = dim_names(gm)
    inserted = inserted_quantizers(gm)
    rows: dict[object, _Tally] = {}
    seen: set[int] = set()

    def dims(node) -> list[int] | None:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        return [evaluate(d, batch=1, seq=seq) for d in shape_list(val, names)]

    def numel(node) -> int:
        shape = dims(node)
        return math.prod(shape) if shape is not None else 0

    for node, section in nodes_by_section(graph):
        tally = rows.setdefault(section, _Tally())
        if node.op == "call_module":
            for tensor, bits in _tensors(gm.get_submodule(node.target)):
                if id(tensor) not in seen:  # tied and shared weights count once
                    seen.add(id(tensor))
                    tally.weight(tensor.numel(), bits)
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, nn.Parameter) and id(value) not in seen:
                seen.add(id(value))
                tally.weight(value.numel(), _dtype_bits(value))
        if QUANTIZE in node.meta:
            tally.nodes += 1
            tally.formats.add(node.meta[QUANTIZE]["format"])
        op = op_type(gm, node)
        if op == "matmul" and node.op == "call_module":  # the attention matmuls
            q, k, v = node.args[:3]
            core = gm.get_submodule(node.target)
            sizes = {"query": numel(q), "key": numel(k), "value": numel(v)}
            q_dims, k_dims = dims(q), dims(k)
            sizes["probs"] = math.prod(q_dims[:-1]) * k_dims[-2] if q_dims and k_dims else 0  # [.., queries, keys]
            for operand, _ in ATTENTION_OPERANDS:
                quantizer = getattr(core, f"{operand}_quantizer", None) if isinstance(core, QuantizedAttentionCore) else None
                tally.activation(int(sizes[operand]), quantizer.bits if quantizer is not None else 32.0)
        elif op is not None:
            for index, source in data_inputs(node, op):
                quantizer = inserted.get(node.name, {}).get(index)
                bits = gm.get_submodule(quantizer.target).bits if quantizer is not None else _dtype_bits(source.meta.get("val"))
                tally.activation(numel(source), bits)

    total = _Tally()
    for tally in rows.values():
        total.add(tally)
    layers = sorted(k for k in rows if isinstance(k, int))
    graph.meta["quantize"] = {
        "embeddings": rows["embeddings"].row() if "embeddings" in rows else None,
        "layers": [{"index": i, **rows[i].row()} for i in layers],
        "head": rows["head"].row() if "head" in rows else None,
        "totals": {**total.row(), "seq_len": seq},
    }
    return graph.meta["quantize"]


def _tensors(module: nn.Module):
    """(tensor, bits) for each parameter of a leaf module; a parametrized one is its original."""
    for name, param in module._parameters.items():
        if param is not None:
            yield param, _dtype_bits(param)
    if parametrize.is_parametrized(module):
        for name, chain in module.parametrizations.items():
            q = tensor_quantizer(module, name)
            yield chain.original, q.bits if q is not None else _dtype_bits(chain.original)


def _dtype_bits(tensor) -> float:
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
        return float(torch.finfo(tensor.dtype).bits)
    return 32.0


@graphprune.register_pass("add_quantization_metadata", kind="analysis")
def add_quantization_metadata(graph, config):
    """Record average bits per weight and per activation, per layer, in the metadata (shown by summary()).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "add_quantization_metadata")
        >>> info["weight_bits"]                # 32.0 before any quantize pass
    """
    totals = record_quantization(graph)["totals"]
    return graph, {"weight_bits": totals["weight_bits"], "activation_bits": totals["activation_bits"]}
