"""The modules the ``quantize`` pass puts into graphs, and which nodes it can quantize.

- :class:`Quantizer`: ``x -> x`` in one number format (``formats.py``), straight-through
  gradient. It is the ``call_module`` node inserted before a quantized op's input and the
  parametrization stacked on a quantized weight or bias (after any pruning mask). In
  training, a weight's quantizer can apply its format to a random share of blocks only
  (Quant-Noise, ``noise_fraction``; switched on by ``finetune(..., quant_noise=p)``).
- :class:`QuantizedAttentionCore`: an :class:`AttentionCore` that computes
  ``softmax(q k^T * scale + mask) v`` explicitly, so that both attention matmuls can
  quantize their operands, the probabilities included.

Both hold only JSON config (format name and MASE keys), no tensors, and are registered
with ``register_module_type``, so checkpoints save and reload them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

import graphprune
from graphprune.ir.metadata import key
from graphprune.ir.modules import AttentionCore

from ..pruning.prune_activation import MARK as ACTIVATION_PRUNE  # on the nodes prune_activation inserts
from .format_specs import average_bits, quantizer

aten = torch.ops.aten

INSERTED = key("quantizer")  # on inserted quantizer nodes: {"feeds": node name, "operand": "data_in_0"}

OP_TYPES = ("linear", "matmul", "bmm", "add", "mul", "sub", "relu", "gelu", "tanh", "layer_norm")
_FUNCTIONS = {
    aten.add.Tensor: "add", aten.add.Scalar: "add",
    aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    aten.relu.default: "relu", aten.gelu.default: "gelu", aten.tanh.default: "tanh",
    aten.layer_norm.default: "layer_norm",
    aten.bmm.default: "bmm", aten.matmul.default: "matmul", aten.mm.default: "matmul",  # DeBERTa's explicit ones
}
# The attention matmuls' operands: (name, MASE prefix). MASE quantizes a matmul's first
# operand with the data_in_ keys and its second with the weight_ keys.
ATTENTION_OPERANDS = (("query", "data_in"), ("key", "weight"), ("probs", "data_in"), ("value", "weight"))


class Quantizer(nn.Module):
    """``x -> x`` rounded to a number format, with a straight-through gradient.

    ``keys`` are MASE's prefixed keys for one operand (``{"weight_width": 8,
    "weight_frac_width": 4}``); they are checked on construction (ConfigError).

    Quant-Noise (Fan et al. 2020): in training mode with ``noise_fraction = p > 0``, each
    forward pass rounds only a random share ``p`` of blocks (``noise_block`` consecutive
    elements along the last, input, dimension of each row; a last partial block counts
    as one) and leaves the others float: ``where(chosen, q(w), w)``, every block drawn
    independently from torch's global RNG. Both kinds of block pass the gradient
    straight through. In eval mode or with ``p = 0`` the output is exactly ``q(w)``.
    ``finetune(..., quant_noise=p)`` sets ``p`` on the quantizers of weight tensors only
    (not on the key/value operands that MASE also quantizes with ``weight_`` keys, which
    are activations) and sets it back to 0 afterwards; the two attributes are
    training-time state, not config, so a saved and reloaded quantizer has ``p = 0``.
    """

    def __init__(self, format: str, prefix: str, keys: Mapping):  # noqa: A002  (MASE's word)
        super().__init__()
        self.format = format
        self.prefix = prefix
        self.keys = dict(keys)
        self._fn = quantizer(format, prefix, self.keys)
        self.noise_fraction: float = 0.0
        self.noise_block: int = 8

    @property
    def bits(self) -> float:
        """Bits per element (a block's shared exponent spread over the block)."""
        return average_bits(self.format, self.prefix, self.keys)

    def config(self) -> dict:
        return {"format": self.format, "prefix": self.prefix, "keys": dict(self.keys)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.noise_fraction > 0):
            return self._fn(x)
        return quant_noise(x, self._fn(x), self.noise_fraction, self.noise_block)

    def extra_repr(self) -> str:
        return f"{self.format}, {self.keys}"


def quant_noise(x: torch.Tensor, q: torch.Tensor, p: float, block: int) -> torch.Tensor:
    """``q`` on a random share ``p`` of ``block``-element blocks along ``x``'s last dimension, ``x`` elsewhere.

    ``q`` is computed on the whole tensor first, so formats that share a scale over a
    row or block (per-channel integer, MX, BFP) round the chosen blocks exactly as
    without noise.
    """
    v = x.reshape(1) if x.dim() == 0 else x
    n = v.shape[-1]
    blocks = -(-n // block)  # the last partial block is drawn like a whole one
    chosen = torch.rand(*v.shape[:-1], blocks, device=x.device) < p
    chosen = chosen.repeat_interleave(block, dim=-1)[..., :n]
    return torch.where(chosen, q.reshape(v.shape), v).reshape(x.shape)


class QuantizedAttentionCore(AttentionCore):
    """Attention with quantized matmul operands: ``Qp(softmax(Qq(q) Qk(k)^T * scale + mask)) Qv(v)``.

    Equal to :class:`AttentionCore` (up to float rounding) when the quantizers are
    identity-like. Each operand keeps its own layout: query, key and value are quantized
    as ``[batch, heads, seq, head_dim]`` (block formats share per token and head, so
    padding tokens never share a block with real ones), the probabilities as
    ``[batch, heads, query, key]`` after dropout, as MASE's BERT feeds them to its matmul.
    """

    def __init__(self, dropout_p: float = 0.0, scale: float | None = None, is_causal: bool = False, quantizers: Mapping | None = None):
        super().__init__(dropout_p, scale, is_causal)
        quantizers = quantizers or {}
        missing = [name for name, _ in ATTENTION_OPERANDS if name not in quantizers]
        if missing:
            raise ValueError(f"QuantizedAttentionCore needs a quantizer for each of {[n for n, _ in ATTENTION_OPERANDS]}; missing {missing}")
        for name, _ in ATTENTION_OPERANDS:
            self.add_module(f"{name}_quantizer", quantizers[name])

    @classmethod
    def replacing(cls, core: AttentionCore, quantizers: Mapping) -> "QuantizedAttentionCore":
        return cls(core.dropout_p, core.scale, core.is_causal, quantizers).train(core.training)  # dropout as before

    def forward(self, query, key, value, attn_mask=None):
        probs = attention_probs(self.query_quantizer(query), self.key_quantizer(key), self.scale, self.is_causal, attn_mask)
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, self.dropout_p)
        return torch.matmul(self.probs_quantizer(probs), self.value_quantizer(value))


def attention_probs(query, key, scale: float | None, is_causal: bool, attn_mask=None) -> torch.Tensor:
    """softmax(q k^T * scale + mask), as ``scaled_dot_product_attention`` computes it before dropout."""
    scale = scale if scale is not None else 1.0 / math.sqrt(query.size(-1))
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # SDPA's meaning: True takes part in attention
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1)


def _quantizer_from_config(c: dict) -> Quantizer:
    return Quantizer(c["format"], c["prefix"], c["keys"])


graphprune.register_module_type("graphprune.Quantizer", Quantizer, Quantizer.config, _quantizer_from_config)
graphprune.register_module_type(
    "graphprune.QuantizedAttentionCore",
    QuantizedAttentionCore,
    lambda m: {
        "dropout_p": m.dropout_p, "scale": m.scale, "is_causal": m.is_causal,
        "quantizers": {name: getattr(m, f"{name}_quantizer").config() for name, _ in ATTENTION_OPERANDS},
    },
    lambda c: QuantizedAttentionCore(
        c["dropout_p"], c["scale"], c["is_causal"], {k: _quantizer_from_config(v) for k, v in c["quantizers"].items()}
    ),
)


# ---- weights and biases: parametrizations -------------------------------------------


def tensor_quantizer(module: nn.Module, tensor_name: str) -> Quantizer | None:
    """The :class:`Quantizer` parametrizing ``module.<tensor_name>``, if any."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    return next((p for p in module.parametrizations[tensor_name] if isinstance(p, Quantizer)), None)


def quantize_tensor(module: nn.Module, tensor_name: str, q: Quantizer) -> None:
    """Stack ``q`` last on ``module.<tensor_name>``: after a pruning mask, so masked weights stay zero."""
    parametrize.register_parametrization(module, tensor_name, q, unsafe=True)  # same shape by construction


def remove_tensor_quantizers(module: nn.Module) -> None:
    """Drop every :class:`Quantizer` parametrization of ``module``, keeping masks and the Parameters.

    Done by hand (as ``commit_masks`` does) rather than with ``remove_parametrizations``,
    which edits the module's class, a class a deep copy of the graph shares.
    """
    if not parametrize.is_parametrized(module):
        return
    chains = {name: list(chain) for name, chain in module.parametrizations.items()}
    if not any(isinstance(p, Quantizer) for chain in chains.values() for p in chain):
        return
    originals = {name: module.parametrizations[name].original for name in chains}
    module.__class__ = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    for name, original in originals.items():
        if isinstance(original, nn.Parameter):
            module.register_parameter(name, original)
        else:
            module.register_buffer(name, original)
    for name, chain in chains.items():
        for p in chain:
            if not isinstance(p, Quantizer):
                parametrize.register_parametrization(module, name, p, unsafe=True)


# ---- which nodes are quantizable ------------------------------------------------------


def op_type(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """MASE's op type of ``node`` when the pass can quantize it: linear, matmul (attention),
    layer_norm, add, mul, sub, relu, gelu, tanh; None otherwise.

    Element-wise ops count only on floating tensors (not the index and mask arithmetic
    of the traced graph), and nodes other passes inserted (quantizers, activation
    pruning) are not the model's own ops.
    """
    if INSERTED in node.meta or ACTIVATION_PRUNE in node.meta:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.LayerNorm):
            return "layer_norm"
        if isinstance(module, AttentionCore):
            return "matmul"
        return None
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    op = _FUNCTIONS[node.target]
    inputs = data_inputs(node, op)
    if not inputs or not all(is_float(a) for _, a in inputs):
        return None
    return op


def data_inputs(node: fx.Node, op: str) -> list[tuple[int, fx.Node]]:
    """The tensor inputs quantized by inserted nodes: (argument index, node)."""
    if op in ("linear", "layer_norm", "relu", "gelu", "tanh"):
        return [(0, node.args[0])] if node.args and isinstance(node.args[0], fx.Node) else []
    if node.op == "call_module":
        return []  # the attention matmuls: inside the module
    return [(i, a) for i, a in enumerate(node.args[:2]) if isinstance(a, fx.Node)]


def input_prefix(op: str, index: int) -> str:
    """The keys that quantize input ``index``: a matmul's second operand uses ``weight_`` (MASE)."""
    return "weight" if op in ("matmul", "bmm") and index == 1 else "data_in"


def is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def inserted_quantizers(gm: fx.GraphModule) -> dict[str, dict[int, fx.Node]]:
    """Inserted quantizer nodes by the node they feed, then by argument index."""
    found: dict[str, dict[int, fx.Node]] = {}
    for node in gm.graph.nodes:
        mark = node.meta.get(INSERTED)
        if mark:
            found.setdefault(mark["feeds"], {})[mark["index"]] = node
    return found


def remove_inserted(gm: fx.GraphModule, q: fx.Node) -> None:
    """Remove an inserted quantizer node and its module; its users read its input again."""
    q.replace_all_uses_with(q.args[0])
    gm.graph.erase_node(q)
    gm.delete_submodule(q.target)
