"""The choice of ``graphprune compress``: the fastest trials within the limit on validation, timed again side by side.

The search measured each trial once, against the dense graph, while other work ran; the
candidates (the ``CANDIDATES`` fastest feasible trials, a repeated pipeline once) are timed
again here at every shape, interleaved with the dense references (torch fp32 eager, ONNX
Runtime int8, AOTInductor fp32) so that the machine's load hits all alike, for at least
``MIN_ROUNDS`` rounds each. The chosen one is the fastest by the geometric mean of its
speed-ups over dense eager across the shapes, so no shape decides alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ...training.timing import time_interleaved
from ..search.front import feasible
from ..search.objectives import Exported

CANDIDATES = 3
REFERENCES = ("dense eager fp32", "dense ort int8", "dense aoti fp32")


def candidates(trials: list, count: int = CANDIDATES) -> list:
    """The ``count`` fastest completed feasible trials on validation (latency ratio), a repeated pipeline once."""
    pool = [t for t in trials if feasible(t) and "repeat_of" not in t.user_attrs and "latency" in (t.user_attrs.get("metrics") or {})]
    return sorted(pool, key=lambda t: (t.user_attrs["metrics"]["latency"], t.number))[:count]


def runner(model, inputs: dict):
    """A zero-argument call of a graph (torch), an :class:`Exported` trial or an artefact folder (its own runtime) on ``inputs``."""
    if isinstance(model, Exported):
        model = model.folder
    if isinstance(model, (str, Path)):
        from ..export import load_artefact

        artefact = load_artefact(model, threads=torch.get_num_threads())
        feeds = {k: np.asarray(v, dtype=np.int64) for k, v in inputs.items() if k in artefact.inputs}
        return lambda: artefact(feeds)
    module = model.module.eval()

    def call():
        with torch.no_grad():
            module(**inputs)

    return call


def prepare(models: dict, shapes: dict) -> dict:
    """``{shape: {name: call}}``: every model made ready once (artefacts loaded), so timing them again costs only the calls."""
    return {shape: {name: runner(model, inputs) for name, model in models.items()} for shape, inputs in shapes.items()}


def time_side_by_side(calls: dict, rounds: int, warmup: int = 2) -> dict:
    """``{name: {shape: ms}}``: every prepared call at every shape, all interleaved (medians of ``rounds``)."""
    out: dict = {}
    for shape, by_name in calls.items():
        for name, ms in time_interleaved(by_name, iters=rounds, warmup=warmup).items():
            out.setdefault(name, {})[shape] = ms
    return out


def choose(timed: dict, names: list, eager: str = REFERENCES[0]) -> str:
    """Of ``names``, the fastest by the geometric mean over shapes of its time against dense eager's."""
    def score(name):
        ratios = [timed[name][shape] / timed[eager][shape] for shape in timed[eager]]
        return math.exp(sum(map(math.log, ratios)) / len(ratios))

    return min(names, key=score)


def speedups(timed: dict, name: str) -> dict:
    """``{shape: {vs_<reference>: x}}``: how many times faster ``name`` is than each dense reference timed beside it."""
    keys = {REFERENCES[0]: "vs_eager_fp32", REFERENCES[1]: "vs_ort_int8", REFERENCES[2]: "vs_aoti_fp32"}
    return {shape: {keys[ref]: round(timed[ref][shape] / ms, 3) for ref in REFERENCES if ref in timed}
            for shape, ms in timed[name].items()}
