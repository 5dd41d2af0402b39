"""What a head and an FFN neuron cost: FLOPs from the layer shapes, latency from a table measured here.

FLOPs count 2 per multiply-accumulate, as ``add_common_metadata`` does, for one
sequence of ``seq`` tokens: a head has ``d`` rows in each of q, k, v (``6 seq H d``),
``d`` columns of the output projection (``2 seq d H``) and its two attention products
(``4 seq^2 d``); a neuron has a row of the up and a column of the down projection
(``4 seq H``).

Latency (Kwon et al. 2022) comes from a lookup table measured on this machine, on the
graph's device: an attention block with ``h`` heads and an FFN with ``n`` neurons, at
the given batch and length, timed for a few counts; a straight line through each gives
the cost per head and per neuron, and the search spends a latency budget with those costs.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from graphprune.training.timing import synchronize


def head_flops(hidden: int, head_size: int, seq: int) -> int:
    return 8 * seq * hidden * head_size + 4 * seq * seq * head_size


def neuron_flops(hidden: int, seq: int) -> int:
    return 4 * seq * hidden


def median_ms(fn, reps: int, device: torch.device | str = "cpu") -> float:
    """Median milliseconds of ``fn()``, each call timed until ``device`` has finished its work."""
    device = torch.device(device)
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def latency_table(
    hidden: int, heads: int, head_size: int, width: int, *, batch: int, seq: int, reps: int = 5, device: torch.device | str = "cpu"
) -> dict:
    """Measured attention-block and FFN latency (ms) by head and neuron count on ``device``, and the fitted per-unit costs."""
    x = torch.randn(batch, seq, hidden, device=device)

    def attention(h: int):
        qkv = torch.nn.Linear(hidden, 3 * h * head_size, device=device)
        out = torch.nn.Linear(h * head_size, hidden, device=device)

        def run():
            q, k, v = qkv(x).view(batch, seq, 3, h, head_size).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v)
            return out(y.transpose(1, 2).reshape(batch, seq, h * head_size))

        return run

    def ffn(n: int):
        up, down = torch.nn.Linear(hidden, n, device=device), torch.nn.Linear(n, hidden, device=device)
        return lambda: down(F.gelu(up(x)))

    head_counts = sorted({max(1, heads // 4), max(1, heads // 2), max(1, 3 * heads // 4), heads})
    neuron_counts = sorted({max(1, width // 4), max(1, width // 2), max(1, 3 * width // 4), width})
    attn = {h: median_ms(attention(h), reps, device) for h in head_counts}
    mlp = {n: median_ms(ffn(n), reps, device) for n in neuron_counts}
    per_head, attn_fixed = _line(attn)
    per_neuron, ffn_fixed = _line(mlp)
    return {
        "batch": batch, "seq": seq, "attention_ms": attn, "ffn_ms": mlp,
        "per_head_ms": per_head, "per_neuron_ms": per_neuron, "attention_fixed_ms": attn_fixed, "ffn_fixed_ms": ffn_fixed,
    }


def _line(points: dict) -> tuple[float, float]:
    """Least-squares slope and intercept through (count, ms); the slope is kept positive."""
    xs = torch.tensor(list(points), dtype=torch.float64)
    ys = torch.tensor(list(points.values()), dtype=torch.float64)
    design = torch.stack([xs, torch.ones_like(xs)], 1)
    slope, intercept = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution.squeeze(1).tolist()
    return max(slope, 1e-9), max(intercept, 0.0)
