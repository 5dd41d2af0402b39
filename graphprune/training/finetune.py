"""Fine-tuning of a traced graph itself (not the source model), with its own task loss.

Training runs through HF ``accelerate``: the same code uses one CPU or GPU, and runs
data-parallel over several processes, GPUs or machines under ``accelerate launch``
(one copy of the graph per process, gradients averaged). ``batch_size`` is the
global batch: every optimizer step sees the same ``batch_size`` examples however many
processes share them (each computes its slice), so N processes train the same model
as one, to float rounding. Progress bars and logs come from rank 0 only, and
checkpoints are written by rank 0 only. Whatever a pass put into the
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

from ..ir.calls import model_call_of
from ..ir.graph import Graph
from .batches import data_name, make_batches, on_device, subset
from .evaluate import evaluate, main_metric, task_of
from .tasks import FeatureExtraction, task_for, task_for_data
from .finetune_config import FinetuneConfig, option_callbacks


class Callback(Protocol):
    """Hooks into :func:`finetune`; every hook is optional.

    ``on_train_begin`` runs before the optimizer is built, so parameters a callback
    adds there (movement scores, gates) are trained; ``on_optimizer`` gets the
    optimizer once built (for the current learning rate); ``extra_loss`` returns a
    term added to the step's loss (a regulariser, a distillation term) or None;
    ``on_step_end`` runs after every optimizer step; ``on_train_end`` runs once
    training stops, also after an error (to undo what ``on_train_begin`` put in).
    """

    def on_train_begin(self, graph: Graph, total_steps: int) -> None: ...

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...

    def extra_loss(self, graph: Graph, batch: dict, step: int, total_steps: int) -> torch.Tensor | None: ...

    def on_step_end(self, graph: Graph, step: int, total_steps: int) -> None: ...

    def on_train_end(self, graph: Graph) -> None: ...


@dataclass
class FinetuneResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def kd_divergence(student_logits, teacher_logits, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last dimension, averaged over rows.

    Rows are every position before the last dimension (examples; or tokens, where
    ``mask`` keeps only the real ones).
    """
    classes = student_logits.size(-1)
    kl = F.kl_div(
        F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1),
        F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    if mask is not None and mask.numel() == kl.numel():
        kl = kl[mask.reshape(-1).bool()]
    return temperature**2 * kl.mean()


def distillation_loss(student, teacher, task_loss, temperature: float, weight: float, mask: torch.Tensor | None = None):
    """(1 - w) * task loss + w * T^2 * KL(teacher_T || student_T) (Hinton et al. 2015).

    ``student`` and ``teacher`` are the graphs' outputs; the divergence is averaged
    over their logits fields (``logits``, or ``start_logits`` and ``end_logits``).
    """
    fields = [k for k in student.keys() if k.endswith("logits")]
    kd = sum(kd_divergence(student[k], teacher[k], temperature, mask) for k in fields) / len(fields)
    return (1 - weight) * task_loss + weight * kd


def _slice_for_process(batch: dict, rank: int, processes: int, device) -> tuple[dict, torch.Tensor]:
    """This process's rows of a global batch (on ``device``) and how many loss terms they hold.

    Loss terms: labelled targets (``labels`` not -100: examples, or tokens for token-level
    tasks), else rows. Rows are split as evenly as possible, in order.
    """
    batch = dict(batch)
    rows = len(batch["input_ids"])
    if processes > 1:
        if rows < processes:
            raise ValueError(
                f"finetune: a batch of {rows} examples cannot be shared by {processes} processes; use a batch_size "
                "and a dataset size that leave every process at least one example per batch"
            )
        start, stop = rows * rank // processes, rows * (rank + 1) // processes
        batch = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == rows else v for k, v in batch.items()}
    batch = on_device(batch, device)
    labels = batch.get("labels")
    terms = (labels != -100).sum() if isinstance(labels, torch.Tensor) else torch.tensor(len(batch["input_ids"]))
    return batch, terms.to(device=device, dtype=torch.float32)


def finetune(
    graph: Graph,
    train_data,
    tokenizer=None,
    *,
    eval_data=None,
    teacher: Graph | None = None,
    callbacks: list | tuple = (),
    collate_fn=None,
    **options,
) -> FinetuneResult:
    """Fine-tune ``graph`` in place on ``train_data``; returns losses and per-epoch evaluations.

    The loss is the graph's own (the source model's task loss: classification,
    token classification, question answering, masked LM), so ``train_data`` must
    carry targets: a ``TextDataset`` (with ``tokenizer``), a list of example dicts
    (collated by ``collate_fn``, default HF's padding collator), or a DataLoader.
    Options are the fields of :class:`FinetuneConfig` (learning_rate, epochs or
    max_steps, batch_size, subset, seed, ...). With ``teacher`` (usually the dense
    graph) the loss is the distillation loss with ``kd_temperature``/``kd_weight``.
    A headless encoder (feature extraction) has no labels: it trains toward
    ``teacher``'s embeddings alone (1 - cosine), on unlabelled texts.
    AdamW with linear warm-up and decay; seeded. Both graphs are moved to the
    accelerator's device if they are elsewhere. Callbacks may mask weights in place
    but must keep the graph's Parameter objects: the optimizer holds them.

    Example:
        >>> result = graphprune.finetune(graph, splits["train"], tokenizer, eval_data=splits["validation"], epochs=1)
    """
    from accelerate import Accelerator

    config = FinetuneConfig(**options)
    if _embedder(graph) is not None:
        if teacher is None:
            raise ValueError(
                "finetune: a feature-extraction model (a headless encoder) has no labels to train on; pass "
                "teacher=<the dense graph>: it then learns the teacher's embeddings (1 - cosine)"
            )
    else:
        task_of(graph, "finetune")
    torch.manual_seed(config.seed)
    data = subset(train_data, config.subset, seed=config.seed)
    loader = make_batches(
        data, tokenizer, batch_size=config.batch_size, max_length=config.max_length, shuffle=True, seed=config.seed, collate_fn=collate_fn
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"finetune: dataset {data_name(train_data)!r} is empty")
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    processes = accelerator.num_processes
    if config.batch_size < processes:
        raise ValueError(
            f"finetune: batch_size = {config.batch_size} is not allowed with {processes} processes; it is the global "
            f"batch, shared by the processes, so expected an integer >= {processes}"
        )
    for g in (graph, teacher):
        if g is not None and g.device != accelerator.device:
            g.to(accelerator.device)  # also moves the devices export baked into the graph
    callbacks = list(callbacks) + option_callbacks(config, graph, teacher)
    begun = []
    try:
        for callback in callbacks:
            if hasattr(callback, "on_train_begin"):
                callback.on_train_begin(graph, total)
            begun.append(callback)
        return _train(graph, teacher, train_data, tokenizer, eval_data, collate_fn, config, loader, total, accelerator, callbacks)
    finally:
        for callback in reversed(begun):
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(graph)
        graph.module.eval()


def _train(graph, teacher, train_data, tokenizer, eval_data, collate_fn, config, loader, total, accelerator, callbacks) -> FinetuneResult:
    steps_per_epoch = len(loader)
    processes, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    module = graph.module
    params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    scores = [p for name, p in params if name.endswith(".scores")]
    gates = [p for name, p in params if name.endswith(".log_alpha")]
    weights = [(name, p) for name, p in params if not name.endswith((".scores", ".log_alpha"))]
    groups = [
        {"params": [p for _, p in weights if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for _, p in weights if p.dim() < 2], "weight_decay": 0.0},  # biases and LayerNorm weights
    ]
    if scores:  # learned pruning scores: their own learning rate, no decay
        groups.append({"params": scores, "weight_decay": 0.0, "lr": config.score_learning_rate})
    gate_group = len(groups) if gates else None
    if gates:  # hard-concrete gates (l0_structured, factorize): their own learning rate, no decay
        groups.append({"params": gates, "weight_decay": 0.0, "lr": config.gate_learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    for callback in callbacks:
        if hasattr(callback, "on_optimizer"):
            callback.on_optimizer(optimizer)
    warmup = int(config.warmup_ratio * total)
    def warmup_then_decay(step):
        return (step + 1) / max(1, warmup) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

    # gates keep a constant rate (as CoFi's own optimizer for them): the size target must still be
    # reachable in the last steps, when the weights' rate has decayed to nothing
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda step: 1.0) if i == gate_group else warmup_then_decay for i in range(len(optimizer.param_groups))]
    )
    # The loader is not prepared: every process reads the same global batches and takes its
    # own slice (accelerate's sharding would give each process whole batches, or pad the last).
    module, optimizer = accelerator.prepare(module, optimizer)
    teacher_module = teacher.module.eval() if teacher is not None else None
    targets = set(model_call_of(graph.module).targets)
    embedder = _embedder(graph)
    call = model_call_of(graph.module)
    float_head = task_for(graph, "finetune") if call is not None and call.task == "sequence_classification" else None

    result = FinetuneResult(steps=0)
    module.train()
    bar = tqdm(total=total, desc="finetune", disable=not config.progress or not main)
    try:
        while result.steps < total:
            for batch in loader:
                batch, share = _slice_for_process(batch, rank, processes, accelerator.device)
                out = module(**batch)
                loss = out.get("loss")
                if embedder is not None:
                    with torch.no_grad():
                        teacher_out = teacher_module(**batch)
                    loss = embedder.distillation_loss(out, teacher_out, batch, config.kd_temperature)
                elif loss is None:
                    raise ValueError(f"finetune: the batches of {data_name(train_data)} carry no targets for the loss")
                elif teacher_module is not None:
                    inputs = {k: v for k, v in batch.items() if k not in targets}
                    with torch.no_grad():
                        teacher_out = teacher_module(**inputs)
                    if float_head is not None and batch["labels"].dtype.is_floating_point:
                        # multi-label and regression: a softmax over the outputs would be wrong (independent labels) or
                        # constant (one output); the task distils each label's sigmoid, or the value itself
                        kd = float_head.distillation_loss(out, teacher_out, batch, config.kd_temperature)
                        loss = (1 - config.kd_weight) * loss + config.kd_weight * kd
                    else:
                        loss = distillation_loss(out, teacher_out, loss, config.kd_temperature, config.kd_weight, batch.get("attention_mask"))
                for callback in callbacks:
                    term = callback.extra_loss(graph, batch, result.steps, total) if hasattr(callback, "extra_loss") else None
                    if term is not None:
                        loss = loss + term
                # Each process's loss is a mean over its slice; weighted by the slice's share of the
                # batch's loss terms, the gradients DDP averages are those of the global batch's mean.
                weight = share * processes / accelerator.reduce(share.clone(), reduction="sum") if processes > 1 else 1.0
                accelerator.backward(loss * weight)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                step_loss = accelerator.reduce((loss * weight).detach(), reduction="mean").item()
                result.steps += 1
                result.losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                for callback in callbacks:
                    if hasattr(callback, "on_step_end"):
                        callback.on_step_end(graph, result.steps, total)
                if result.steps % steps_per_epoch == 0 or result.steps == total:
                    if eval_data is not None:  # every process evaluates the whole set: the same numbers
                        metrics = evaluate(
                            graph, eval_data, tokenizer, batch_size=config.eval_batch_size, max_length=config.max_length,
                            collate_fn=collate_fn, progress=False, reference=teacher if embedder is not None else None,
                        )
                        result.evaluations.append({"step": result.steps, **metrics})
                        if main:
                            bar.write(f"step {result.steps}: {data_name(eval_data)} {_progress_line(graph, eval_data, metrics)}")
                    module.train()
                if result.steps >= total:
                    break
    finally:
        bar.close()
    recorded = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "eval_batch_size")}
    graph.history.append(
        {"pass": "finetune", "config": {**recorded, "dataset": data_name(train_data), "steps": result.steps, "teacher": teacher is not None}}
    )
    return result


def _embedder(graph: Graph) -> FeatureExtraction | None:
    """The graph's feature-extraction task if it is a headless encoder, else None."""
    call = model_call_of(graph.module)
    if call is None or call.task is not None:
        return None
    return task_for(graph, "finetune")


def _progress_line(graph: Graph, data, metrics: dict) -> str:
    """``<main metric> 0.8331 loss 0.3646``: what a fine-tune prints after each epoch."""
    name = main_metric(graph, data) if task_for_data(data) is not None else "accuracy"
    value = metrics.get(name)
    line = f"{name} {'-' if value is None else f'{value:.4f}'}"
    return line + (f" loss {metrics['loss']:.4f}" if metrics.get("loss") is not None else "")

