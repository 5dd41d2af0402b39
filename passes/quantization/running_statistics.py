"""Statistics of a stream of tensors, as ``profile_statistics`` records them.

``RunningStatistics`` merges batches' moments (Chan et al.), keeps the extremes and a
bounded uniform sample from which percentiles are read; ``tensor_statistics`` is the
exact record of one whole tensor (a weight).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .formats import RANGE_PERCENTILES, quantiles


def percentile_key(p: float) -> str:
    """The JSON key of percentile ``p``: ``"0.1"``, ``"99.9"``, ``"50"`` (exact: the float's shortest repr)."""
    return repr(float(p)).removesuffix(".0")


class RunningStatistics:
    """Moments merged batch by batch (Chan et al.), extremes, and a bounded uniform sample for percentiles."""

    def __init__(self, keep: int, rng: np.random.Generator, gen: torch.Generator):
        self.count, self.mean, self.m2, self.abs_sum = 0, 0.0, 0.0, 0.0
        self.low, self.high = math.inf, -math.inf
        self.keep, self.rng, self.gen = keep, rng, gen
        self.sample: torch.Tensor | None = None

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1)
        n = v.numel()
        if n == 0:
            return
        d = v.double()
        mean = float(d.mean())
        m2 = float(((d - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.abs_sum += float(d.abs().sum())
        self.low, self.high = min(self.low, float(d.min())), max(self.high, float(d.max()))
        if self.keep:
            self._sample(v.float(), n)
        self.count = total

    def _sample(self, v: torch.Tensor, n: int) -> None:
        # A uniform sample of `keep` values out of all seen, without replacement: how many of
        # the kept ones survive is hypergeometric, and a uniform subset of a uniform sample
        # is uniform; so no per-value keys need to be stored.
        if self.sample is None:
            self.sample = v.new_empty(0, device="cpu")  # the sample is kept on the CPU, whatever the graph's device
        if self.count + n <= self.keep:
            self.sample = torch.cat([self.sample, v.cpu()])
            return
        old = int(self.rng.hypergeometric(self.count, n, self.keep))
        kept = self.sample[torch.randperm(len(self.sample), generator=self.gen)[:old]]
        new = v.cpu()[torch.randperm(n, generator=self.gen)[: self.keep - old]]
        self.sample = torch.cat([kept, new])

    def record(self, percentiles) -> dict:
        out = {
            "min": self.low, "max": self.high, "mean": self.mean,
            "variance": self.m2 / (self.count - 1) if self.count > 1 else 0.0,
            "abs_mean": self.abs_sum / self.count, "count": self.count,
            "sample": len(self.sample) if self.sample is not None else 0,
        }
        if percentiles and self.sample is not None and len(self.sample):
            out["percentiles"] = _percentiles(self.sample, percentiles)
        return out


def tensor_statistics(x: torch.Tensor, percentiles=RANGE_PERCENTILES) -> dict:
    """The record of one whole tensor (a weight): exact moments and exact percentiles."""
    run = RunningStatistics(0, None, None)
    run.add(x)
    out = run.record(())
    out["sample"] = out["count"]
    if percentiles and x.numel():
        out["percentiles"] = _percentiles(x, percentiles)
    return out


def _percentiles(values: torch.Tensor, percentiles) -> dict[str, float]:
    found = quantiles(values, [p / 100 for p in percentiles]).tolist()
    return {percentile_key(p): float(q) for p, q in zip(percentiles, found)}
