"""What each part of a ``compress`` run is expected to take on this machine, from a few measured calls.

The unit is the dense model's time per validation example (``per_example``), measured on
one padded batch before any other work; the multipliers were read off the benchmarks' logs
on 2 cores (MiniLM, Rotten Tomatoes, 9.9 ms per example at 64 tokens: K-prune with 1024
examples about 50 s, an evaluation of 1297 snippets 11 s, ONNX and AOTInductor exports 8
and 18 s). They only decide whether the budget holds one trial at all (with the shortest
recovery) and how long the first trial may take; from the first finished trial on, the
budget uses measured trial times, and the finale times a probe before it sets its rounds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ...ir.masks import count_parameters
from ..workflow import shape_batch
from .choose import runner

KPRUNE_SAMPLES = 1024          # the default space's calibration examples
KPRUNE_COST = 4.0              # evaluation-equivalents per calibration example (gradients, per-layer rescoring, repair)
STEP_COST = 3.0                # a training example is a forward and a backward pass
TYPICAL_STEPS = 60             # the shortest recovery the default space tries (a budget must hold such a trial)
EXPORT_PRIOR_S = (5.0, 15.0)   # per artefact: fixed, and per MiniLM-sized model (ONNX 8 s and AOTInductor 18 s for MiniLM)
MINILM_PARAMS = 22.7e6


@dataclass
class Estimates:
    per_example: float          # seconds per validation example, dense, eager
    validation: int
    test: int
    params: int
    shape_ms: dict              # dense eager milliseconds per call at each shape
    export_seconds: float = 0.0

    @classmethod
    def measure(cls, dense, validation, test, tokenizer, max_length: int, shapes: dict) -> "Estimates":
        per_example = _fastest(runner(dense, shape_batch(validation, tokenizer, batch_size=32, length=max_length))) / 32
        shape_ms = {name: 1e3 * _fastest(runner(dense, inputs)) for name, inputs in shapes.items()}
        params = count_parameters(dense)[0]
        return cls(per_example, len(validation), len(test), params, shape_ms, EXPORT_PRIOR_S[0] + EXPORT_PRIOR_S[1] * params / MINILM_PARAMS)

    def setup(self) -> float:
        """The dense model's validation scoring, its two reference exports and the ONNX Runtime int8 one's scoring
        (int8 in its runtime: about half the dense model's time)."""
        return 1.5 * self.validation * self.per_example + 2 * self.export_seconds

    def trial(self, steps: int = TYPICAL_STEPS, batch: int = 32, samples: int = KPRUNE_SAMPLES) -> float:
        """K-prune on ``samples`` examples, a recovery of ``steps``, int8, an export, the validation scoring and the
        latency measurement."""
        kprune = samples * KPRUNE_COST * self.per_example
        recovery = steps * self.step_seconds(batch)
        lower = 128 * self.per_example + 10.0
        latency = 2 * 12 * next(iter(self.shape_ms.values())) / 1e3
        return kprune + recovery + lower + self.export_seconds + self.validation * self.per_example + latency

    def step_seconds(self, batch: int = 32) -> float:
        """One recovery step: a forward and a backward pass over ``batch`` examples."""
        return batch * STEP_COST * self.per_example

    def test_seconds(self) -> float:
        return self.test * self.per_example

    def round_seconds(self, models: int) -> float:
        """One timing round of ``models`` at every shape (each call after an untimed one): dense eager, and the others
        at a third of its time (int8 and compiled runtimes, pruned graphs; the finale measures the real figure)."""
        return 2 * (1 + (models - 1) / 3) * sum(self.shape_ms.values()) / 1e3

    def finale(self, models: int = 6, rounds: int = 30, compiles: bool = True) -> float:
        """Timing the candidates, scoring the choice and its artefact on test (a torch graph compiled again on loading,
        which costs about an export), and writing the outputs."""
        return rounds * self.round_seconds(models) + 2 * self.test_seconds() + (self.export_seconds if compiles else 0.0) + 5.0


def _fastest(call, tries: int = 3) -> float:
    """Seconds of the fastest of ``tries`` calls after a warm-up: one slow call (another process's burst) should not
    make the whole budget look too small."""
    call()
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)
