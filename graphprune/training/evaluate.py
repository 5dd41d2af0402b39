"""Evaluation of a traced graph with its own loss, for every task head graphprune supports."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..ir.calls import model_call_of
from ..ir.graph import Graph
from ..ir.losses import TARGETS, TASKS
from .batches import data_name, make_batches, on_device


def task_of(graph: Graph, caller: str) -> str:
    """The graph's task (``sequence_classification``, ...), or a clear error if it has no task loss."""
    call = model_call_of(graph.module)
    if call is None or call.task not in TASKS:
        what = call.model_class if call is not None else graph.source.get("model_class", "this graph")
        raise ValueError(
            f"{caller} needs a graph traced from a HF task head (...ForSequenceClassification, "
            f"...ForTokenClassification, ...ForQuestionAnswering, ...ForMaskedLM); {what} has no loss it can compute"
        )
    return call.task


def batch_score(task: str, out, batch) -> tuple[int, float | None, int]:
    """``(units, correct, examples)`` of one batch.

    Units are what the loss averages over and what accuracy counts: examples for
    sequence classification and question answering (an answer is right when both
    its start and end are), labelled tokens (label != -100) for token
    classification and masked LM. ``correct`` is None where accuracy has no
    meaning (regression).
    """
    if task == "question_answering":
        start, end = batch["start_positions"].view(-1), batch["end_positions"].view(-1)
        right = (out["start_logits"].argmax(-1) == start) & (out["end_logits"].argmax(-1) == end)
        return len(start), int(right.sum()), len(start)
    labels, logits = batch["labels"], out["logits"]
    if task in ("token_classification", "masked_lm"):
        labelled = labels != -100
        return int(labelled.sum()), int((logits.argmax(-1) == labels)[labelled].sum()), len(labels)
    if labels.dtype.is_floating_point:
        if labels.dim() == 2 and logits.size(-1) > 1:  # multi-label: the share of right (example, label) decisions
            return len(labels), float(((logits > 0).float() == labels).float().mean(-1).sum()), len(labels)
        return len(labels), None, len(labels)  # regression
    return len(labels), int((logits.argmax(-1) == labels.view(-1)).sum()), len(labels)


@torch.no_grad()
def evaluate(
    graph: Graph,
    data,
    tokenizer=None,
    *,
    batch_size: int = 64,
    max_length: int = 64,
    collate_fn=None,
    progress: bool = True,
) -> dict:
    """Accuracy and mean loss of ``graph`` on ``data``, using the graph's own task loss.

    ``data`` is a ``TextDataset`` (with ``tokenizer``), a list of example dicts with
    targets, or a DataLoader (see ``graphprune.training.batches``). Accuracy is over
    examples for sequence classification, over labelled tokens for token
    classification and masked LM, and exact start-and-end match for question
    answering; it is None for regression. Runs in eval mode under no_grad and
    restores the graph's mode afterwards.

    Returns ``{"accuracy", "loss", "examples"}``.

    Example:
        >>> graphprune.evaluate(graph, splits["test"], tokenizer)
        {'accuracy': 0.8331, 'loss': 0.3646, 'examples': 1252}
    """
    task = task_of(graph, "evaluate")
    module = graph.module
    was_training = module.training
    module.eval()
    units = correct = examples = 0
    loss_sum, scored = 0.0, True
    try:
        batches = make_batches(data, tokenizer, batch_size=batch_size, max_length=max_length, collate_fn=collate_fn)
        device = graph.device  # batches are collated on the CPU; the graph may be on a GPU
        for batch in tqdm(batches, desc=f"evaluate {data_name(data)}", disable=not progress, leave=False):
            batch = on_device(batch, device)
            out = module(**batch)
            if out.get("loss") is None:
                raise ValueError(f"evaluate: the batches of {data_name(data)} carry no {' and '.join(TARGETS[task])}")
            n, right, rows = batch_score(task, out, batch)
            loss_sum += out["loss"].item() * n
            units += n
            examples += rows
            if right is None:
                scored = False
            else:
                correct += right
    finally:
        module.train(was_training)
    if units == 0:
        raise ValueError(f"evaluate: dataset {data_name(data)!r} is empty (or has no labelled tokens)")
    return {"accuracy": correct / units if scored else None, "loss": loss_sum / units, "examples": examples}
