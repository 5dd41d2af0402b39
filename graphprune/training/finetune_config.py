"""The options of :func:`graphprune.finetune`, validated, and the callbacks some of them stand for.

Most options shape the optimiser and the data. Four switch on compression learned
during training, each a callback written once in its own module:

- ``layerdrop`` (Fan et al. 2019): every encoder layer skipped with this probability
  in each training step (``graphprune.training.layerdrop``);
- ``rpp`` (Guo et al. 2019): reweighted proximal L1 on the encoder weights
  (``graphprune.training.rpp``; a table of :class:`RppConfig` fields);
- ``quant_noise`` (Fan et al. 2020): each step, the simulated format applies to this
  fraction of weight blocks only (``graphprune.training.quant_noise``);
- gates on the graph (``l0_structured``, ``factorize``) are always trained with their
  Lagrangian controller (``graphprune.training.lagrangian``), with
  ``gate_learning_rate``, ``reg_learning_rate`` and ``target_warmup``.

``kd_hidden_weight`` adds the layer-wise hidden-state distillation loss
(``graphprune.training.hidden_distillation``) to the logits distillation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneConfig:
    """Fine-tuning options (defaults: the recipe measured in DESIGN.md)."""

    learning_rate: float = 5e-5
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32  # the global batch, over all processes
    max_length: int = 64
    subset: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0
    kd_temperature: float = 2.0
    kd_weight: float = 0.5
    kd_hidden_weight: float = 0.0  # layer-wise hidden-state distillation (CoFi), needs a teacher
    kd_layer_map: list | None = None  # student layer -> teacher layer; None: matched as CoFi does
    score_learning_rate: float = 1e-2  # learned pruning scores (movement), as Sanh et al. 2020
    # Gates and multipliers: CoFi's 0.01 needs its 10-100 epochs; these reach a FLOPs target within
    # half an epoch of MiniLM (one validation run: the multipliers at 1.0 overshot to 0.15 of the
    # FLOPs before settling at the target)
    gate_learning_rate: float = 0.1  # hard-concrete gates' log-alpha, a constant rate
    reg_learning_rate: float = 0.5  # the Lagrange multipliers (gradient ascent)
    target_warmup: float = 0.5  # share of the steps over which a gate target is reached linearly
    layerdrop: float = 0.0
    rpp: dict | None = None
    quant_noise: float = 0.0
    quant_noise_block: int = 8
    eval_batch_size: int = 64
    progress: bool = True

    def __post_init__(self):
        checks = [
            ("learning_rate", self.learning_rate > 0, "a number > 0"),
            ("epochs", self.epochs > 0, "a number > 0"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "an integer >= 1 or None"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("max_length", self.max_length >= 2, "an integer >= 2"),
            ("subset", self.subset is None or self.subset >= 1, "an integer >= 1 or None"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "a number in [0, 1)"),
            ("kd_temperature", self.kd_temperature > 0, "a number > 0"),
            ("kd_weight", 0 <= self.kd_weight <= 1, "a number in [0, 1]"),
            ("kd_hidden_weight", self.kd_hidden_weight >= 0, "a number >= 0"),
            ("kd_layer_map", self.kd_layer_map is None or all(isinstance(i, int) and i >= 0 for i in self.kd_layer_map),
             "a list of teacher layer indices (integers >= 0), one per student layer, or None"),
            ("score_learning_rate", self.score_learning_rate > 0, "a number > 0"),
            ("gate_learning_rate", self.gate_learning_rate > 0, "a number > 0"),
            ("reg_learning_rate", self.reg_learning_rate > 0, "a number > 0"),
            ("target_warmup", 0 <= self.target_warmup <= 1, "a number in [0, 1]"),
            ("layerdrop", 0 <= self.layerdrop < 1, "a probability in [0, 1)"),
            ("rpp", self.rpp is None or isinstance(self.rpp, dict), "a table of rpp options or None"),
            ("quant_noise", 0 <= self.quant_noise <= 1, "a fraction in [0, 1]"),
            ("quant_noise_block", self.quant_noise_block >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"finetune: {name} = {getattr(self, name)!r} is not allowed; expected {allowed}")
        if self.rpp is not None:
            from .rpp import RppConfig

            RppConfig.from_options(self.rpp)  # raises a ValueError naming the field


def option_callbacks(config: FinetuneConfig, graph, teacher) -> list:
    """The built-in callbacks the options ask for, in the order they act on a step."""
    callbacks = []
    if config.layerdrop > 0:
        from .layerdrop import LayerDrop

        callbacks.append(LayerDrop(config.layerdrop, seed=config.seed))
    if config.quant_noise > 0:
        from .quant_noise import QuantNoise

        callbacks.append(QuantNoise(config.quant_noise, block=config.quant_noise_block))
    if config.rpp is not None:
        from .rpp import ReweightedProximal, RppConfig

        callbacks.append(ReweightedProximal(RppConfig.from_options(config.rpp)))
    if config.kd_hidden_weight > 0:
        if teacher is None:
            raise ValueError("finetune: kd_hidden_weight > 0 distils hidden states from a teacher; pass teacher=")
        from .hidden_distillation import HiddenDistillation

        callbacks.append(HiddenDistillation(teacher, config.kd_hidden_weight, config.kd_layer_map))
    from ..ir.gates import gate_groups

    if gate_groups(graph):
        from .lagrangian import LagrangianController

        callbacks.append(LagrangianController(config.reg_learning_rate, config.target_warmup))
    return callbacks
