"""Iterative pruning with retraining: prune a step, fine-tune, prune again until the target.

The sparsity of step ``i`` of ``n`` follows Zhu & Gupta's cubic schedule from 0 to the
target, so early steps remove more and later steps, on a sparser model, less. Each
step fine-tunes the pruned graph (optionally distilled from a teacher, usually the
dense graph) and records the accuracy after pruning and after fine-tuning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..infra.pipeline import run_pass
from ..ir.graph import Graph
from ..ir.summary import Summary
from .evaluate import evaluate
from .finetune import finetune
from .schedule import cubic_sparsity

COLUMNS = ["step", "sparsity", "accuracy_pruned", "accuracy_finetuned", "loss_finetuned", "seconds"]


@dataclass
class IterativeResult:
    """The pruned and fine-tuned graph, and one row per step (``table`` prints them)."""

    graph: Graph
    rows: list[dict] = field(default_factory=list)

    @property
    def table(self) -> Summary:
        return Summary(title="iterative pruning", columns=COLUMNS, rows=self.rows, total_row=False)


def step_sparsities(target: float, steps: int) -> list[float]:
    """The sparsity reached after each of ``steps`` steps (cubic, ending at ``target``)."""
    return [cubic_sparsity(i, initial=0.0, final=target, start=0, end=steps) for i in range(1, steps + 1)]


def iterative_prune(
    graph: Graph,
    pass_name: str = "prune_weight",
    config: dict | None = None,
    *,
    target_sparsity: float,
    steps: int,
    train_data,
    tokenizer=None,
    eval_data=None,
    teacher: Graph | None = None,
    data=None,
    config_key: str = "sparsity",
    collate_fn=None,
    progress: bool = True,
    log=print,
    **finetune_options,
) -> IterativeResult:
    """Prune ``graph`` (a copy) to ``target_sparsity`` in ``steps`` rounds of pruning and fine-tuning.

    Args:
        pass_name: the pruning pass; its field ``config_key`` (the sparsity) is set for each step.
        config: the pass's other fields.
        train_data: the fine-tuning data (as for ``finetune``).
        tokenizer: tokenizes ``train_data`` and ``eval_data``.
        collate_fn: batches already tokenised examples instead (as for ``finetune``).
        eval_data: scored after every pruning and every fine-tuning (as for ``evaluate``).
        teacher: distil from this graph (usually the dense one) while fine-tuning.
        data: calibration data for the pass (Wanda, SparseGPT...).
        finetune_options: ``finetune`` options for each round (``max_steps``, ``epochs``...).

    Example:
        >>> result = graphprune.iterative_prune(graph, "prune_weight", {"method": "l1"}, target_sparsity=0.9, steps=3,
        ...                                     train_data=splits["train"], tokenizer=tokenizer,
        ...                                     eval_data=splits["validation"], teacher=graph, max_steps=200)
        >>> print(result.table)
    """
    if not 0 < target_sparsity < 1:
        raise ValueError(f"iterative_prune: target_sparsity = {target_sparsity!r} is not allowed; expected a number in (0, 1)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"iterative_prune: steps = {steps!r} is not allowed; expected an integer >= 1")
    config = dict(config or {})
    work = graph.copy()
    result = IterativeResult(work)
    for step, sparsity in enumerate(step_sparsities(target_sparsity, steps), start=1):
        start = time.perf_counter()
        run_pass(work, pass_name, {**config, config_key: sparsity}, inplace=True, data=data)
        row = {"step": step, "sparsity": round(sparsity, 4)}
        if eval_data is not None:
            row["accuracy_pruned"] = evaluate(work, eval_data, tokenizer, collate_fn=collate_fn, progress=False)["accuracy"]
        finetune(work, train_data, tokenizer, teacher=teacher, collate_fn=collate_fn, progress=progress, **finetune_options)
        if eval_data is not None:
            metrics = evaluate(work, eval_data, tokenizer, collate_fn=collate_fn, progress=False)
            row["accuracy_finetuned"], row["loss_finetuned"] = metrics["accuracy"], metrics["loss"]
        row["seconds"] = round(time.perf_counter() - start, 1)
        result.rows.append(row)
        log(f"iterative step {step}/{steps}: sparsity {sparsity:.3f} " + " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("accuracy", "loss")) and v is not None))
    return result
