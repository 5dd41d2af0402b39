"""Evaluation and fine-tuning of a traced graph itself (not the source model).

Training runs through HF ``accelerate``: the same code uses one CPU here, and
several GPUs or machines under ``accelerate launch``. Whatever a pass put into the
graph (masks as parametrizations or ``torch.nn.utils.prune`` hooks, fake-quantizers
as modules) is part of ``graph.module`` and so takes part in training. Callbacks
get a hook after every optimiser step, which is where gradual pruning lives.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TextDataset, make_loader
from ..ir.graph import Graph


def _forward(module, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return module(**inputs).logits


@torch.no_grad()
def evaluate(graph: Graph, data: TextDataset, tokenizer, *, batch_size: int = 64, max_length: int = 64, progress: bool = True) -> dict:
    """Accuracy and mean cross-entropy of ``graph`` on ``data`` (eval mode, no_grad).

    The graph's train/eval mode is restored afterwards.
    """
    module = graph.module
    was_training = module.training
    module.eval()
    correct, loss_sum, n = 0, 0.0, 0
    try:
        loader = make_loader(data, tokenizer, batch_size=batch_size, max_length=max_length)
        for batch in tqdm(loader, desc=f"evaluate {data.name}", disable=not progress, leave=False):
            logits = _forward(module, batch)
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            n += len(batch["labels"])
    finally:
        module.train(was_training)
    if n == 0:
        raise ValueError(f"evaluate: dataset {data.name!r} is empty")
    return {"accuracy": correct / n, "loss": loss_sum / n, "examples": n}


class Callback(Protocol):
    def on_step_end(self, graph: Graph, step: int, total_steps: int) -> None: ...


@dataclass
class FinetuneConfig:
    """Fine-tuning options (defaults: the recipe measured in DESIGN.md)."""

    learning_rate: float = 5e-5
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32
    max_length: int = 64
    subset: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0
    kd_temperature: float = 2.0
    kd_weight: float = 0.5
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
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"finetune: {name} = {getattr(self, name)!r} is not allowed; expected {allowed}")


@dataclass
class FinetuneResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, weight: float):
    """(1 - w) * CE(student, labels) + w * T^2 * KL(teacher_T || student_T) (Hinton et al. 2015)."""
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - weight) * ce + weight * temperature**2 * kl


def finetune(
    graph: Graph,
    train_data: TextDataset,
    tokenizer,
    *,
    eval_data: TextDataset | None = None,
    teacher: Graph | None = None,
    callbacks: list | tuple = (),
    **options,
) -> FinetuneResult:
    """Fine-tune ``graph`` in place on ``train_data``; returns losses and per-epoch evaluations.

    Options are the fields of :class:`FinetuneConfig` (learning_rate, epochs or
    max_steps, batch_size, subset, seed, ...). With ``teacher`` (usually the dense
    graph) the loss is the distillation loss with ``kd_temperature``/``kd_weight``.
    AdamW with linear warm-up and decay; seeded. Both graphs are moved to the
    accelerator's device if they are elsewhere. Callbacks may mask weights in place
    but must keep the graph's Parameter objects: the optimizer holds them.

    Example:
        >>> result = graphprune.finetune(graph, splits["train"], tokenizer, eval_data=splits["validation"], epochs=1)
    """
    from accelerate import Accelerator

    config = FinetuneConfig(**options)
    torch.manual_seed(config.seed)
    data = train_data.subset(config.subset, seed=config.seed)
    loader = make_loader(data, tokenizer, batch_size=config.batch_size, max_length=config.max_length, shuffle=True, seed=config.seed)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"finetune: dataset {train_data.name!r} is empty")
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    for g in (graph, teacher):
        if g is not None and next(g.module.parameters()).device != accelerator.device:
            g.to(accelerator.device)  # also moves the devices export baked into the graph
    module = graph.module
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate
    )
    warmup = int(config.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / max(1, warmup) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    )
    module, optimizer, loader, schedule = accelerator.prepare(module, optimizer, loader, schedule)
    teacher_module = teacher.module.eval() if teacher is not None else None

    result = FinetuneResult(steps=0)
    module.train()
    bar = tqdm(total=total, desc="finetune", disable=not config.progress)
    try:
        while result.steps < total:
            for batch in loader:
                logits = _forward(module, batch)
                if teacher_module is not None:
                    with torch.no_grad():
                        teacher_logits = _forward(teacher_module, batch)
                    loss = distillation_loss(logits, teacher_logits, batch["labels"], config.kd_temperature, config.kd_weight)
                else:
                    loss = F.cross_entropy(logits, batch["labels"])
                accelerator.backward(loss)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                result.steps += 1
                result.losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                for callback in callbacks:
                    callback.on_step_end(graph, result.steps, total)
                if result.steps % steps_per_epoch == 0 or result.steps == total:
                    if eval_data is not None:
                        metrics = evaluate(graph, eval_data, tokenizer, batch_size=config.eval_batch_size, max_length=config.max_length, progress=False)
                        result.evaluations.append({"step": result.steps, **metrics})
                        bar.write(f"step {result.steps}: {eval_data.name} accuracy {metrics['accuracy']:.4f} loss {metrics['loss']:.4f}")
                    module.train()
                if result.steps >= total:
                    break
    finally:
        bar.close()
        graph.module.eval()
    recorded = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "eval_batch_size")}
    graph.history.append(
        {"pass": "finetune", "config": {**recorded, "dataset": train_data.name, "steps": result.steps, "teacher": teacher is not None}}
    )
    return result
