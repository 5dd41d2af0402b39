"""What each part of a ``compress`` run is expected to take on this machine, from a few measured calls.

The unit is the dense model's evaluation time per validation example (``per_example``),
measured on one batch before any other work; the multipliers were read off the
benchmarks' logs on 2 cores (MiniLM, Rotten Tomatoes: K-prune with 2048 examples 57 to 96
s, an evaluation of 1297 snippets about 8 s) and are deliberately on the high side. They
only decide whether the budget holds one trial at all and how long the first trial may
take; from the first finished trial on, the budget uses measured trial times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ...ir.masks import count_parameters
from ..workflow import shape_batch
from .choose import runner

KPRUNE_SAMPLES = 1024          # the default space's calibration examples
KPRUNE_COST = 8.0              # evaluation-equivalents per calibration example (gradients, per-layer rescoring, repair)
STEP_COST = 3.0                # a training example is a forward and a backward pass
TYPICAL_STEPS = 120            # the middle of the default recovery choices
EXPORT_PRIOR_S = (10.0, 25.0)  # per artefact: fixed (AOTInductor compiles even a tiny model for 15 s), and per MiniLM-sized model
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
        batch = runner(dense, shape_batch(validation, tokenizer, batch_size=32, length=max_length))
        batch()  # warm-up: the first call pays for allocation
        started = time.perf_counter()
        batch()
        per_example = (time.perf_counter() - started) / 32
        shape_ms = {}
        for name, inputs in shapes.items():
            call = runner(dense, inputs)
            call()
            started = time.perf_counter()
            call()
            shape_ms[name] = (time.perf_counter() - started) * 1e3
        params = count_parameters(dense)[0]
        return cls(per_example, len(validation), len(test), params, shape_ms, EXPORT_PRIOR_S[0] + EXPORT_PRIOR_S[1] * params / MINILM_PARAMS)

    def setup(self) -> float:
        """The dense model's validation scoring and its two reference exports."""
        return self.validation * self.per_example + 2 * self.export_seconds

    def trial(self, steps: int = TYPICAL_STEPS, batch: int = 32) -> float:
        """K-prune, a recovery of ``steps``, int8, an export, the validation scoring and the latency measurement."""
        kprune = KPRUNE_SAMPLES * KPRUNE_COST * self.per_example
        recovery = steps * batch * STEP_COST * self.per_example
        lower = 128 * self.per_example + 10.0
        latency = 2 * 12 * next(iter(self.shape_ms.values())) / 1e3
        return kprune + recovery + lower + self.export_seconds + self.validation * self.per_example + latency

    def test_seconds(self) -> float:
        return self.test * self.per_example

    def round_seconds(self, models: int) -> float:
        """One timing round of ``models`` at every shape (each call after an untimed one), at dense eager's speed."""
        return 2 * models * sum(self.shape_ms.values()) / 1e3

    def finale(self, models: int = 6, rounds: int = 30, compiles: bool = True) -> float:
        """Timing the candidates, scoring the choice and its artefact on test (a torch graph compiled again on loading,
        which costs about an export), and writing the outputs."""
        return rounds * self.round_seconds(models) + 2 * self.test_seconds() + (self.export_seconds if compiles else 0.0) + 5.0
