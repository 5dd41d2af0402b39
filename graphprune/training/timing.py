"""Latency measured side by side: both models interleaved, medians compared."""

from __future__ import annotations

import statistics
import time

import torch

from ..ir.fx_utils import module_device
from .batches import on_device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work: a GPU call returns before its kernels finish, so a timer must wait."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(module, inputs: dict):
    """A call of ``module`` on ``inputs`` moved to its device, that returns once the work is done."""
    device = module_device(module)
    inputs = on_device(inputs, device)

    def run():
        module(**inputs)
        synchronize(device)

    return run


@torch.no_grad()
def compare_latency(candidate, reference, inputs: dict, *, iters: int = 10, warmup: int = 2) -> dict:
    """Median forward latency of two modules on the same inputs, interleaved so noise hits both.

    The inputs are moved to each module's device (once, before timing); on a GPU each
    call is timed until its kernels finish.

    Returns ``{"candidate_ms", "reference_ms", "ratio"}`` with ratio = candidate / reference.
    """
    was = candidate.training, reference.training
    candidate.eval(), reference.eval()
    run_c, run_r = _call(candidate, inputs), _call(reference, inputs)
    for _ in range(warmup):
        run_c(), run_r()
    times_c, times_r = [], []
    for _ in range(iters):
        start = time.perf_counter()
        run_c()
        times_c.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_r()
        times_r.append(time.perf_counter() - start)
    candidate.train(was[0]), reference.train(was[1])
    c, r = statistics.median(times_c), statistics.median(times_r)
    return {"candidate_ms": c * 1e3, "reference_ms": r * 1e3, "ratio": c / r}


def time_interleaved(calls: dict, *, iters: int = 10, warmup: int = 2, settle: int = 1) -> dict[str, float]:
    """Median milliseconds of each of several zero-argument callables, run in turn so noise hits all alike.

    For runtimes that are not torch modules (ONNX Runtime sessions, AOTInductor
    packages) beside ones that are; each callable must return once its work is done.
    Each runtime has its own thread pool, whose threads spin for a while after a call:
    the call of another runtime right after it competes with them for the cores
    (measured on 2 cores: an ONNX Runtime call 45% slower right after a torch call, a
    torch call 25% slower right after ONNX Runtime). So each turn starts with
    ``settle`` untimed calls, and the timed call sees the runtime as a server would.
    """
    for _ in range(warmup):
        for run in calls.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, run in calls.items():
            for _ in range(settle):
                run()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}
