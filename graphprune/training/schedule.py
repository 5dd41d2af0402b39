"""Gradual pruning during fine-tuning (Zhu & Gupta 2017, "To prune, or not to prune").

Sparsity follows the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** 3,   t_0 <= t <= t_1

and a pruning pass is called every ``every`` steps with ``{config_key: s_t}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..infra.pipeline import run_pass


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Target sparsity at ``step`` (``initial`` before ``start``, ``final`` from ``end`` on)."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass
class GradualPruning:
    """A :func:`graphprune.finetune` callback that calls a pruning pass on a cubic schedule.

    Args:
        pass_name: a registered pass that takes a sparsity field.
        initial: the sparsity at ``start_step``.
        final: the sparsity from ``end_step`` on.
        start_step: the first pruning step.
        end_step: the last pruning step.
        every: steps between prunings (the pass runs at start_step, every ``every``
            steps after it, and at end_step).
        config_key: the pass's sparsity field name.
        config: other fields passed to the pass each time.
        data: calibration data for the pass (Wanda, SparseGPT...), if it takes any.

    The pass also runs once before training, at ``initial`` (the schedule's sparsity
    before ``start_step``), which installs learned scores for ``movement`` pruning.

    Example:
        >>> schedule = GradualPruning("prune_weight", 0.0, 0.9, start_step=0, end_step=500, every=50,
        ...                           config={"method": "movement"})
        >>> graphprune.finetune(graph, train, tokenizer, max_steps=600, callbacks=[schedule])
    """

    pass_name: str
    initial: float
    final: float
    start_step: int
    end_step: int
    every: int = 100
    config_key: str = "sparsity"
    config: dict = field(default_factory=dict)
    data: object = None  # calibration data for passes that take it
    applied: list = field(default_factory=list)  # (step, sparsity) pairs, for logs and tests

    def __post_init__(self):
        if not 0 <= self.initial <= self.final < 1:
            raise ValueError(f"GradualPruning: need 0 <= initial <= final < 1, got initial={self.initial!r}, final={self.final!r}")
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(f"GradualPruning: need 0 <= start_step < end_step, got {self.start_step!r}, {self.end_step!r}")
        if self.every < 1:
            raise ValueError(f"GradualPruning: every = {self.every!r} must be at least 1")

    def on_train_begin(self, graph, total_steps: int) -> None:
        # The schedule's sparsity before start_step is `initial`: apply it before the
        # optimizer is built, which is also when learned scores (movement) get installed.
        self._prune(graph, 0, self.initial)

    def _prune(self, graph, step: int, sparsity: float) -> None:
        run_pass(graph, self.pass_name, {**self.config, self.config_key: sparsity}, inplace=True, data=self.data)
        if sparsity > 0:
            self.applied.append((step, sparsity))

    def due(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.every == 0 or step == self.end_step

    def on_step_end(self, graph, step: int, total_steps: int) -> None:
        if not self.due(step):
            return
        sparsity = cubic_sparsity(step, initial=self.initial, final=self.final, start=self.start_step, end=self.end_step)
        if sparsity <= 0:
            return
        self._prune(graph, step, sparsity)
