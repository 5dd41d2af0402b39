"""Leaf modules graphprune puts into graphs, and how modules are named in checkpoints.

A checkpoint never pickles code: every module in a saved graph is rebuilt from a
registered type name and a JSON config, then its tensors are loaded from
safetensors. Built-in torch leaves are registered here; a pass that introduces its
own module class registers it with :func:`register_module_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
import torch.nn.functional as F


class AttentionCore(nn.Module):
    """Scaled dot-product attention as a leaf module.

    torch.export bakes the attention dropout probability into the SDPA call as 0.0
    when it traces an eval-mode model. Lifting that call into this module makes
    attention dropout follow ``.train()``/``.eval()`` like every other dropout, and
    gives passes one node per attention block to read head layouts from.
    """

    def __init__(self, dropout_p: float = 0.0, scale: float | None = None, is_causal: bool = False):
        super().__init__()
        self.dropout_p = float(dropout_p)
        self.scale = scale
        self.is_causal = bool(is_causal)

    def forward(self, query, key, value, attn_mask=None):
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=self.is_causal,
            scale=self.scale,
        )

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, scale={self.scale}, is_causal={self.is_causal}"


@dataclass(frozen=True)
class ModuleType:
    name: str
    cls: type
    to_config: Callable[[nn.Module], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], nn.Module]


_BY_NAME: dict[str, ModuleType] = {}
_BY_CLASS: dict[type, ModuleType] = {}


def register_module_type(
    name: str,
    cls: type,
    to_config: Callable[[nn.Module], dict[str, Any]],
    from_config: Callable[[dict[str, Any]], nn.Module],
) -> None:
    """Make ``cls`` saveable: ``to_config`` gives a JSON-able dict, ``from_config`` rebuilds it.

    ``from_config`` is called under ``torch.device("meta")``; the tensors are then
    assigned from the checkpoint, so it only needs to build the right shapes.
    """
    if name in _BY_NAME or cls in _BY_CLASS:
        raise ValueError(f"module type {name!r} ({cls.__name__}) is already registered")
    entry = ModuleType(name, cls, to_config, from_config)
    _BY_NAME[name] = entry
    _BY_CLASS[cls] = entry


def module_type_of(module: nn.Module) -> ModuleType | None:
    """The registered type of ``module`` (a parametrized module counts as its original class)."""
    return _BY_CLASS.get(parametrize.type_before_parametrizations(module))


def module_type_named(name: str) -> ModuleType | None:
    return _BY_NAME.get(name)


register_module_type(
    "torch.nn.Linear",
    nn.Linear,
    lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    lambda c: nn.Linear(c["in_features"], c["out_features"], bias=c["bias"]),
)
register_module_type(
    "torch.nn.LayerNorm",
    nn.LayerNorm,
    lambda m: {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": getattr(m, "bias", None) is not None,
    },
    lambda c: nn.LayerNorm(c["normalized_shape"], eps=c["eps"], elementwise_affine=c["elementwise_affine"], bias=c["bias"]),
)
register_module_type(
    "torch.nn.Embedding",
    nn.Embedding,
    lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx},
    lambda c: nn.Embedding(c["num_embeddings"], c["embedding_dim"], padding_idx=c["padding_idx"]),
)
register_module_type(
    "torch.nn.Dropout",
    nn.Dropout,
    lambda m: {"p": m.p},
    lambda c: nn.Dropout(c["p"]),
)
register_module_type(
    "graphprune.AttentionCore",
    AttentionCore,
    lambda m: {"dropout_p": m.dropout_p, "scale": m.scale, "is_causal": m.is_causal},
    lambda c: AttentionCore(c["dropout_p"], c["scale"], c["is_causal"]),
)
