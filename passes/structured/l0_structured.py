"""``l0_structured``: hard-concrete gates on heads, sublayers, FFN neurons and hidden dimensions (CoFi).

Xia et al. 2022 (CoFi) learn, during fine-tuning, which structure to keep at several
granularities at once: attention heads, whole attention sublayers, FFN neurons,
whole FFN sublayers, and the hidden dimension shared by every layer. Voita et al.
2019 is the heads-only case (``units = ["heads"]``). This pass puts the gates on the
graph (see ``graphprune.ir.gates``):

- heads: ``z_h`` (one per head) on the attention core's output, per layer;
- attention: one ``z`` on the attention output projection's output, per layer;
- neurons: ``z_n`` on the FFN activation, per layer;
- ffn: one ``z`` on the FFN down projection's output, per layer;
- hidden: one ``z_d`` per hidden dimension, on the embeddings' LayerNorm output and on
  every projection added into the residual stream; the stream's LayerNorms become
  ``GatedLayerNorm`` (statistics over the open dimensions only).

``graphprune.finetune`` then trains them (with a teacher: distillation, as CoFi) under
a Lagrangian that drives the expected remaining size (``metric``: FLOPs at ``seq_len``
or parameters of the encoder layers, CoFi's formulas) to ``1 - target``. The
``commit_gates`` pass folds the evaluation gates into the weights and removes what
they closed with ``remove_heads``, ``remove_ffn_neurons`` and ``remove_hidden``
(``l0_commit``); its output equals the gated graph's at evaluation.

With ``init_from`` the heads' and neurons' gates start ranked by an importance
(Fisher, Taylor or L1, as ``remove_heads`` ranks them) instead of all at ``init``.
On MiniLM with half an epoch, heads and neurons started from Fisher ranks lost 0.1
points of test accuracy at a quarter of the FLOPs where CoFi's five kinds of gate
from a uniform start lost 6.8 (see the README's learned-compression measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.gates import (
    GATES,
    LOG_ALPHA_LIMIT,
    TEMPERATURE_RANGE,
    GateMethod,
    HardConcreteGate,
    add_gate,
    multiply_after,
    register_gate_method,
)

from .blocks import attention_blocks, ffn_blocks, finish_surgery
from .costs import head_flops, neuron_flops
from .hidden import GatedLayerNorm, hidden_stream
from .importance import CRITERIA, unit_scores
from .l0_commit import commit_l0, describe_l0

PASS = "l0_structured"
UNITS = ("heads", "attention", "neurons", "ffn", "hidden")
METRICS = ("flops", "params")


@dataclass(frozen=True)
class L0StructuredConfig:
    """Fields:
    target: the share of the encoder layers' FLOPs (or parameters) to remove, 0 < target < 1.
    metric: flops (at ``seq_len`` tokens, CoFi's and Kwon's formulas) | params.
    units: which gates, any of heads, attention, neurons, ffn, hidden (default all: CoFi); ["heads"] is Voita et al.
    seq_len: sequence length of the FLOPs formula (default 128).
    temperature: the hard-concrete temperature (default 2/3, CoFi's).
    init: initial log_alpha of every gate (default 3: open with probability 0.99, evaluation value 0.97;
        CoFi's 10 is too far from closing for a budget of one or two epochs, and its 0 for FFN
        neurons halves their evaluation gate before any training).
    init_from: none | fisher | taylor | l1: rank the heads (and the FFN neurons) of all layers by this importance
        (``remove_heads``' criteria and global scope: each layer's scores over their L2 norm; fisher and taylor
        need calibration data) and start each gate at
        ``init - init_spread * rank`` (rank 0 for the most important unit, 1 for the least), so the Lagrangian
        closes the least important first; none starts every gate at ``init``.
    init_spread: how far below ``init`` the least important unit starts (default 4).
    num_samples: calibration examples for the fisher and taylor scores (default 512).
    """

    target: float = 0.5
    metric: str = "flops"
    units: tuple[str, ...] = UNITS
    seq_len: int = 128
    temperature: float = 2 / 3
    init: float = 3.0
    init_from: str = "none"
    init_spread: float = 4.0
    num_samples: int = 512

    def __post_init__(self):
        check_range("target", self.target, 0, 1, low_open=True, high_open=True)
        check_choice("metric", self.metric, METRICS)
        if not self.units or len(set(self.units)) != len(self.units) or any(u not in UNITS for u in self.units):
            raise ConfigError("units", list(self.units), f"a non-empty list of distinct names from {list(UNITS)}")
        check_range("seq_len", self.seq_len, 1)
        check_range("temperature", self.temperature, *TEMPERATURE_RANGE)
        check_range("init", self.init, -LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
        check_choice("init_from", self.init_from, ("none", *CRITERIA))
        check_range("init_spread", self.init_spread, 0, self.init + LOG_ALPHA_LIMIT)
        check_range("num_samples", self.num_samples, 1)


@graphprune.register_pass(PASS, config=L0StructuredConfig)
def l0_structured(graph, config: L0StructuredConfig, data=None):
    """Put hard-concrete gates on heads, sublayers, FFN neurons and hidden dimensions; train with finetune; commit_gates.

    Example:
        >>> graph, info = graphprune.run_pass(dense, "l0_structured", {"target": 0.6})
        >>> graphprune.finetune(graph, train, tokenizer, teacher=dense, epochs=2, kd_hidden_weight=1.0)
        >>> graph, info = graphprune.run_pass(graph, "commit_gates")
    """
    if graph.meta.get(GATES):
        raise ValueError(f"pass '{PASS}': the graph already carries {graph.meta[GATES]['method']!r} gates; run 'commit_gates' first")
    heads, ffns = attention_blocks(graph, PASS), ffn_blocks(graph, PASS)
    if len(heads) != len(ffns):
        raise ValueError(f"pass '{PASS}': found {len(heads)} attention blocks but {len(ffns)} FFN blocks; expected one of each per layer")
    stream = hidden_stream(graph, PASS) if "hidden" in config.units else None
    if stream is not None:  # a factorised embedding (ELECTRA's) starts a narrower stream than the layers' own
        outside = [node.target for attn, ffn in zip(heads, ffns) for node in (attn.out, ffn.down) if node not in stream.writers]
        if outside:
            raise ValueError(
                f"pass '{PASS}': {outside[0]} does not write the hidden stream that starts at the {stream.hidden}-wide word "
                "embeddings (a factorised embedding projects into the layers), so 'hidden' gates cannot apply; choose units without 'hidden'"
            )
    starts = _ranked_starts(graph, heads, ffns, config, data)  # before any edit: a bad input leaves the graph as it was
    gm = graph.module

    def gate(name, size, shape, before, start=None):
        module = HardConcreteGate(size, shape, config.temperature, config.init)
        if start is not None:
            with torch.no_grad():
                module.log_alpha.copy_(start)
        return add_gate(gm, name, module.to(graph.device), before)

    record = {"method": PASS, "target": 1.0 - config.target, "metric": config.metric, "seq_len": config.seq_len, "layers": [], "hidden": None}
    z_hidden = None
    if stream is not None:
        first_norm = min(stream.norms, key=lambda n: list(gm.graph.nodes).index(n))
        z_hidden = gate("l0_gates.hidden", stream.hidden, (stream.hidden,), first_norm)
        record["hidden"] = {"gate": z_hidden.target, "size": stream.hidden, "norms": [n.target for n in stream.norms],
                            "embedding_norm": first_norm.target}
    for index, (attn, ffn) in enumerate(zip(heads, ffns)):
        layer = {"index": index, "heads": attn.heads, "head_size": attn.head_size, "ffn_width": ffn.width,
                 "out": attn.out.target, "down": ffn.down.target, "gates": {}}
        if "heads" in config.units:
            z = gate(f"l0_gates.layer_{index}.heads", attn.heads, (1, attn.heads, 1, 1), attn.core, starts.get(("heads", index)))
            multiply_after(gm, attn.core, z)
            layer["gates"]["heads"] = z.target
        if "attention" in config.units:
            z = gate(f"l0_gates.layer_{index}.attention", 1, (1,), attn.core)
            multiply_after(gm, attn.out, z)
            layer["gates"]["attention"] = z.target
        if "neurons" in config.units:
            z = gate(f"l0_gates.layer_{index}.neurons", ffn.width, (ffn.width,), ffn.up, starts.get(("neurons", index)))
            multiply_after(gm, ffn.down.args[0], z)
            layer["gates"]["neurons"] = z.target
        if "ffn" in config.units:
            z = gate(f"l0_gates.layer_{index}.ffn", 1, (1,), ffn.up)
            multiply_after(gm, ffn.down, z)
            layer["gates"]["ffn"] = z.target
        if z_hidden is not None:
            multiply_after(gm, attn.out, z_hidden)
            multiply_after(gm, ffn.down, z_hidden)
        record["layers"].append(layer)
    if z_hidden is not None:
        multiply_after(gm, first_norm, z_hidden)
        for node in stream.norms:  # LayerNorms over the open dimensions only
            gm.set_submodule(node.target, GatedLayerNorm.replacing(gm.get_submodule(node.target)))
            node.args = (node.args[0], z_hidden)
    for node in gm.graph.nodes:  # gates produce a known shape: no need to trace them for it
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), HardConcreteGate):
            node.meta["val"] = torch.empty(gm.get_submodule(node.target).shape, device="meta")
    graph.meta[GATES] = record
    finish_surgery(graph, None)
    with torch.no_grad():
        start = float(expected_fraction(graph))
    return graph, {"gates": sum(1 for _ in _gates(graph)), "units": list(config.units), "target_fraction": record["target"], "expected_fraction": start}


def _ranked_starts(graph, heads, ffns, config, data) -> dict:
    """``{(unit, layer): initial log_alpha}`` from the units' importance ranked over all layers (empty for init_from none)."""
    starts = {}
    if config.init_from == "none":
        return starts
    for unit, blocks in (("heads", heads), ("neurons", ffns)):
        if unit not in config.units:
            continue
        scores = unit_scores(graph, unit, blocks, config.init_from, data, config.num_samples, f"pass '{PASS}' (init_from)")
        # each layer's scores over their L2 norm, as remove_heads' global scope ranks them (Michel et al.), so
        # a layer with small gradients does not start all its units low
        flat = torch.cat([s.double() / (s.double().norm() + 1e-12) for s in scores])
        rank = torch.empty_like(flat)
        rank[torch.argsort(flat, descending=True, stable=True)] = torch.arange(len(flat), dtype=flat.dtype)
        start = (config.init - config.init_spread * rank / max(1, len(flat) - 1)).float()
        for index, piece in enumerate(torch.split(start, [len(s) for s in scores])):
            starts[(unit, index)] = piece
    return starts


def _gates(graph):
    gm = graph.module
    for name, module in gm.named_modules():
        if isinstance(module, HardConcreteGate):
            yield name, module


def _count(gm, layer, unit, full: int):
    """Expected open units of ``unit`` in ``layer`` (a tensor), or ``full`` without that gate."""
    target = layer["gates"].get(unit)
    return gm.get_submodule(target).open_probability().sum() if target else torch.tensor(float(full))


def layer_size(layer: dict, heads, attention, neurons, ffn, hidden_fraction, hidden: int, metric: str, seq: int):
    """One layer's size (FLOPs or parameters) from its (expected) unit counts; shared by the dense and the expected size."""
    d = hidden * hidden_fraction
    if metric == "flops":
        # costs.head_flops and neuron_flops, with the hidden width an expected value: the
        # projections narrow with the hidden dimension, the attention products do not
        size = layer["head_size"]
        per_head = (head_flops(1, size, seq) - head_flops(0, size, seq)) * d + head_flops(0, size, seq)
        return attention * heads * per_head + ffn * neurons * neuron_flops(1, seq) * d
    return attention * heads * 4 * d * layer["head_size"] + ffn * neurons * 2 * d


def expected_fraction(graph) -> torch.Tensor:
    """Expected remaining size of the encoder layers / their dense size (differentiable in the gates)."""
    gm, record = graph.module, graph.meta[GATES]
    device = graph.device
    hidden_record = record["hidden"]
    hidden = hidden_record["size"] if hidden_record else _hidden_width(graph)
    rho = (gm.get_submodule(hidden_record["gate"]).open_probability().sum() / hidden) if hidden_record else torch.tensor(1.0)
    expected, dense = torch.zeros((), device=device), 0.0
    for layer in record["layers"]:
        counts = [_count(gm, layer, u, n).to(device) for u, n in
                  (("heads", layer["heads"]), ("attention", 1), ("neurons", layer["ffn_width"]), ("ffn", 1))]
        expected = expected + layer_size(layer, *counts, rho.to(device), hidden, record["metric"], record["seq_len"])
        dense += float(layer_size(layer, layer["heads"], 1, layer["ffn_width"], 1, 1.0, hidden, record["metric"], record["seq_len"]))
    return expected / dense


def _hidden_width(graph) -> int:
    # the layers' own width (what their attention output projection writes), not the word embeddings':
    # the two differ where a factorised embedding (ELECTRA's) projects into the layers
    gm, record = graph.module, graph.meta[GATES]
    return gm.get_submodule(record["layers"][0]["out"]).out_features


register_gate_method(GateMethod(PASS, expected_fraction, commit_l0, describe_l0))
