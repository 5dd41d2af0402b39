"""``mixed_precision``: weight widths per layer (or per Linear) from Hessian sensitivity, under an average-bits budget.

Reads the groups ``hessian_sensitivity`` measured (``graph.meta["sensitivity"]``) and
gives each group one integer weight width from ``widths`` so that the average weight
width over the measured Linears (weighted by their weight counts) is at most
``average_bits``, minimising the expected increase of the loss (HAWQ-v2, Dong et al.
2020):

    sum_g  s_g * ||Q_b(W_g) - W_g||^2

with ``s_g`` the magnitude of the group's trace per parameter (``criterion = "trace"``, HAWQ-v2) or its
top eigenvalue mean + std (``"eigenvalue"``, Q-BERT's ranking, Shen et al. 2020), and
``Q_b`` the very quantizer ``quantize`` applies (it is run on a copy at each width to
measure the errors). The allocation is an exact multiple-choice knapsack (dynamic
programming over the groups' weight counts in units of their greatest common divisor,
coarsened to at most ``MAX_UNITS`` units for uneven pruned graphs). The chosen widths are
then applied by ``quantize`` (``by = "name"``), one entry per Linear: ``integer`` weights
with power-of-two per-channel scales fitted to each row, plus whatever ``entry`` adds
(its ``data_in_`` keys; by default a 16-bit input grid with 8 fractional bits, near float, and 16-bit
biases, so that only the weights' widths differ).

Config fields:
    average_bits: the budget, average weight bits over the measured Linears (default 4).
    widths: the allowed widths (default [3, 4, 5, 6, 8]; 2-bit per-channel weights wreck a BERT layer
        without retraining, so 2 is there only when asked for).
    criterion: trace (default) | eigenvalue.
    entry: the other keys of each Linear's quantize entry (default data_in_width 16, data_in_frac_width 8,
        bias_width 16, bias_frac_width auto).

Example:
    >>> graph, _ = graphprune.run_pass(graph, "hessian_sensitivity", {}, data=splits["train"])
    >>> graph, info = graphprune.run_pass(graph, "mixed_precision", {"average_bits": 4})
    >>> info["widths"]                        # {"layer 0": 5, "layer 1": 4, ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.infra.pipeline import run_pass

NAME = "mixed_precision"
MAX_UNITS = 4096  # knapsack units per group at most: the DP stays small for any graph
WEIGHT_KEYS = ("weight_width", "weight_frac_width", "weight_per_channel")
# quantize needs a format for a Linear's input: by default a 16-bit grid with 8 fractional bits, near
# float for BERT's activations, so that the weights' widths are what is compared
NEAR_FLOAT_INPUTS = {"data_in_width": 16, "data_in_frac_width": 8, "bias_width": 16, "bias_frac_width": "auto"}


@dataclass(frozen=True)
class MixedPrecisionConfig:
    average_bits: float = 4.0
    widths: tuple[int, ...] = (3, 4, 5, 6, 8)
    criterion: str = "trace"
    entry: dict = field(default_factory=lambda: dict(NEAR_FLOAT_INPUTS))

    def __post_init__(self):
        if not self.widths or len(set(self.widths)) != len(self.widths) or any(w < 2 or w > 16 for w in self.widths):
            raise ConfigError("widths", list(self.widths), "a non-empty list of distinct integer widths from 2 to 16")
        check_range("average_bits", self.average_bits, min(self.widths), max(self.widths))
        check_choice("criterion", self.criterion, ("trace", "eigenvalue"))
        clash = sorted(k for k in self.entry if k in WEIGHT_KEYS or k == "name")
        if clash:
            raise ConfigError(f"entry.{clash[0]}", self.entry[clash[0]], "keys other than name and the weight width keys, which the pass sets")


def allocate(sizes: list[int], errors: list[dict[int, float]], budget_bits: float) -> list[int]:
    """Widths minimising ``sum_g errors[g][b_g]`` subject to ``sum_g sizes[g] * b_g <= budget_bits`` (exact DP).

    Raises ValueError when even the narrowest widths exceed the budget.
    """
    unit = math.gcd(*sizes) or 1
    if sum(sizes) // unit > MAX_UNITS:
        unit = math.ceil(sum(sizes) / MAX_UNITS)
    units = [max(1, round(s / unit)) for s in sizes]
    capacity = math.floor(budget_bits / unit + 1e-9)
    # best[c] = (error, widths) using at most c bit-units so far
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for g, options in enumerate(errors):
        step: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (error, chosen) in best.items():
            for width, e in options.items():
                c = used + units[g] * width
                if c <= capacity and (c not in step or error + e < step[c][0]):
                    step[c] = (error + e, chosen + (width,))
        if not step:
            raise ValueError(f"pass '{NAME}': even the narrowest widths exceed the average-bits budget")
        best = step
    return list(min(best.values())[1])


def _weight_entry(config: MixedPrecisionConfig, width: int) -> dict:
    return {"config": {"name": "integer", **config.entry, "weight_width": width, "weight_frac_width": "auto", "weight_per_channel": True}}


def _quantized_weights(graph, linears: list[str], config: MixedPrecisionConfig, width: int) -> dict[str, torch.Tensor]:
    trial, _ = run_pass(graph, "quantize", {"by": "name", **{n: _weight_entry(config, width) for n in linears}})
    gm = trial.module
    return {n: gm.get_submodule(trial.node(n).target).weight.detach() for n in linears}


@graphprune.register_pass(NAME, config=MixedPrecisionConfig)
def mixed_precision(graph, config: MixedPrecisionConfig):
    """Integer weight widths per sensitivity group under an average-bits budget (HAWQ-v2's objective, exact allocation).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "mixed_precision", {"average_bits": 4, "widths": [2, 4, 8]})
    """
    sensitivity = graph.meta.get("sensitivity")
    if not sensitivity:
        raise ValueError(f"pass '{NAME}' reads the Hessian sensitivity: run 'hessian_sensitivity' first (with calibration data)")
    groups = sensitivity["groups"]
    measure = "trace_per_param" if config.criterion == "trace" else "sensitivity"
    if any(g.get(measure) is None for g in groups):
        skipped, field, other = (("the traces", "trace_samples = 0", "eigenvalue") if config.criterion == "trace"
                                 else ("the eigenvalues", "eigenvalue = false", "trace"))
        raise ValueError(f"pass '{NAME}': field 'criterion' = {config.criterion!r} needs {skipped}, which hessian_sensitivity "
                         f"skipped ({field}); measure them or use criterion = {other!r}")
    names = {n.name for n in graph.nodes}
    gone = sorted(n for g in groups for n in g["linears"] if n not in names)
    if gone:
        raise ValueError(f"pass '{NAME}': the sensitivity names Linears the graph no longer has ({gone[:3]}); measure it again")
    gm = graph.module
    linears = [n for g in groups for n in g["linears"]]
    with torch.no_grad():
        originals = {n: gm.get_submodule(graph.node(n).target).weight.detach().clone() for n in linears}
        quantized = {w: _quantized_weights(graph, linears, config, w) for w in config.widths}
    errors, sizes = [], []
    for g in groups:
        # magnitudes: at a fine-tuned minimum the curvature is positive, but a short power iteration or a
        # few Hutchinson probes can come out negative, and a negative weight would reward the error
        scale = abs(g[measure])
        errors.append({w: scale * sum(float((quantized[w][n] - originals[n]).double().pow(2).sum()) for n in g["linears"])
                       for w in config.widths})
        sizes.append(sum(originals[n].numel() for n in dict.fromkeys(g["linears"])))
    widths = allocate(sizes, errors, config.average_bits * sum(sizes))
    entries = {n: _weight_entry(config, w) for g, w in zip(groups, widths) for n in g["linears"]}
    out, info = run_pass(graph, "quantize", {"by": "name", **entries}, inplace=True)
    average = sum(s * w for s, w in zip(sizes, widths)) / sum(sizes)
    graph.meta["mixed_precision"] = {"criterion": config.criterion, "average_bits": average, "budget": config.average_bits,
                                     "widths": {g["name"]: w for g, w in zip(groups, widths)}}
    return out, {"widths": {g["name"]: w for g, w in zip(groups, widths)}, "average_bits": average,
                 "expected_error": sum(e[w] for e, w in zip(errors, widths))}

