"""Latency measured side by side: both models interleaved, medians compared."""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def compare_latency(candidate, reference, inputs: dict, *, iters: int = 10, warmup: int = 2) -> dict:
    """Median forward latency of two modules on the same inputs, interleaved so noise hits both.

    Returns ``{"candidate_ms", "reference_ms", "ratio"}`` with ratio = candidate / reference.
    """
    was = candidate.training, reference.training
    candidate.eval(), reference.eval()
    for _ in range(warmup):
        candidate(**inputs), reference(**inputs)
    times_c, times_r = [], []
    for _ in range(iters):
        start = time.perf_counter()
        candidate(**inputs)
        times_c.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference(**inputs)
        times_r.append(time.perf_counter() - start)
    candidate.train(was[0]), reference.train(was[1])
    c, r = statistics.median(times_c), statistics.median(times_r)
    return {"candidate_ms": c * 1e3, "reference_ms": r * 1e3, "ratio": c / r}
