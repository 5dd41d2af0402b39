"""``remove_hidden``: physically remove dimensions of the hidden size shared by every layer.

The residual stream is found from the graph (``hidden.hidden_stream``): the
dimensions go from the embedding tables' columns, every LayerNorm on the stream, the
rows of every projection added into it (attention output, FFN down) and the input
columns of every Linear reading it (q/k/v, FFN up, pooler, token-level heads). Every
matrix of every layer gets narrower, so this is the one structured edit that also
shrinks the embeddings. LayerNorms then normalise over the kept dimensions, which is
what CoFi's hidden-dimension masks compute (and ``GatedLayerNorm`` in a gated graph).
A headless encoder's ``last_hidden_state`` gets narrower too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range

from .blocks import _replace_linear, editable, finish_surgery
from .hidden import hidden_stream

METHODS = ("l1",)


@dataclass(frozen=True)
class RemoveHiddenConfig:
    """Fields:
    dims: explicit hidden dimensions to remove; if set, the criterion is not used.
    method: criterion when ``dims`` is not set: l1 (the dimension's L1 norm over every matrix it touches).
    fraction: share of the hidden dimensions the criterion removes, 0 < fraction < 1 (default 0.25).
    """

    dims: list[int] | None = None
    method: str = "l1"
    fraction: float = 0.25

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_range("fraction", self.fraction, 0, 1, low_open=True, high_open=True)


def l1_dimension_scores(graph, stream) -> torch.Tensor:
    gm = graph.module
    total = torch.zeros(stream.hidden)
    for node in stream.embeddings:
        total += gm.get_submodule(node.target).weight.detach().abs().sum(0).cpu()
    for node in stream.readers:
        total += gm.get_submodule(node.target).weight.detach().abs().sum(0).cpu()
    for node in stream.writers:
        total += gm.get_submodule(node.target).weight.detach().abs().sum(1).cpu()
    return total


@torch.no_grad()
def cut_hidden(graph, stream, keep: torch.Tensor) -> None:
    """Keep hidden dimensions ``keep`` (sorted indices) everywhere the stream goes, in place."""
    gm = graph.module
    for node in stream.embeddings:
        old = gm.get_submodule(node.target)
        new = nn.Embedding(old.num_embeddings, len(keep), padding_idx=old.padding_idx, device="meta")
        new.weight = nn.Parameter(old.weight.detach().index_select(1, keep.to(old.weight.device)).contiguous(), requires_grad=old.weight.requires_grad)
        gm.set_submodule(node.target, new.train(old.training))
    for node in stream.norms:
        old = gm.get_submodule(node.target)
        new = nn.LayerNorm(len(keep), eps=old.eps, elementwise_affine=old.elementwise_affine, bias=old.bias is not None, device="meta")
        for name in ("weight", "bias"):
            value = getattr(old, name)
            if value is not None:
                setattr(new, name, nn.Parameter(value.detach().index_select(0, keep.to(value.device)).contiguous(), requires_grad=value.requires_grad))
        gm.set_submodule(node.target, new.train(old.training))
    for node in stream.writers:
        _replace_linear(gm, node.target, keep, None)
    for node in stream.readers:
        _replace_linear(gm, node.target, None, keep)


@graphprune.register_pass("remove_hidden", config=RemoveHiddenConfig)
def remove_hidden(graph, config: RemoveHiddenConfig):
    """Remove hidden dimensions (explicit, or the lowest by L1) from embeddings, LayerNorms and every projection.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "remove_hidden", {"dims": [0, 5, 17]})
        >>> graph, info = graphprune.run_pass(graph, "remove_hidden", {"fraction": 0.25})
        >>> info["hidden_size"]
    """
    editable(graph, "remove_hidden")
    stream = hidden_stream(graph, "remove_hidden")
    if config.dims is not None:
        gone = sorted(set(config.dims))
        if any(not (isinstance(d, int) and 0 <= d < stream.hidden) for d in gone) or len(gone) >= stream.hidden:
            raise ValueError(f"pass 'remove_hidden': {ConfigError('dims', config.dims, f'distinct indices in 0..{stream.hidden - 1}, fewer than {stream.hidden}')}")
    else:
        scores = l1_dimension_scores(graph, stream)
        count = min(stream.hidden - 1, int(round(config.fraction * stream.hidden)))
        gone = sorted(torch.argsort(scores)[:count].tolist())
    keep = torch.tensor([d for d in range(stream.hidden) if d not in set(gone)], dtype=torch.long)
    if gone:
        cut_hidden(graph, stream, keep)
        graph.record_edit({"pass": "remove_hidden", "removed": len(gone), "hidden_before": stream.hidden})
        finish_surgery(graph, None)
    return graph, {"removed": gone, "hidden_size": len(keep)}
