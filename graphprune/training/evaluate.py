"""Evaluation of a traced graph with its own loss, for every task head graphprune supports."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..ir.calls import model_call_of
from ..ir.graph import Graph
from ..ir.losses import TARGETS, TASKS
from .batches import data_name, make_batches, on_device
from .tasks import task_for, task_for_data


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
    reference: Graph | None = None,
) -> dict:
    """The task's metrics on ``data``, and the mean of the graph's own loss where the data has targets.

    ``data`` is one of the tasks' datasets (``TextDataset``, ``TokenDataset``,
    ``QADataset``, ``EmbeddingDataset``, with ``tokenizer``): then the metrics are the
    ones users report for the task (text classification: accuracy and macro F1, or
    micro F1 for multi-label, Pearson and Spearman for regression; token
    classification: entity precision, recall and F1 as seqeval computes them, and
    word accuracy; question answering: SQuAD's exact match and F1; feature
    extraction: mean cosine to ``reference``'s embeddings (the dense graph) and, with
    query/document pairs, recall@1, recall@10 and MRR@10). All are fractions in [0, 1].

    ``data`` may also be a list of example dicts with targets, or a DataLoader (see
    ``graphprune.training.batches``): then accuracy is over examples for sequence
    classification, over labelled tokens for token classification and masked LM,
    and exact start-and-end match for question answering; None for regression.
    Runs in eval mode under no_grad and restores the graph's mode afterwards.

    Example:
        >>> graphprune.evaluate(graph, splits["test"], tokenizer)
        {'accuracy': 0.8331, 'macro_f1': 0.8297, 'loss': 0.3646, 'examples': 1252}
    """
    if task_for_data(data) is not None and collate_fn is None:
        return _evaluate_task(graph, data, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress, reference=reference)
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


def _evaluate_task(graph: Graph, data, tokenizer, *, batch_size: int, max_length: int, progress: bool, reference) -> dict:
    task = task_for(graph, "evaluate")
    expected = task_for_data(data)
    if expected.name != task.name:
        raise ValueError(f"evaluate: {data_name(data)} holds {expected.name} data but the graph is a {task.name} model")
    if tokenizer is None:
        raise ValueError(f"evaluate: {data_name(data)} holds raw text: pass the model's tokenizer to tokenise it")
    modules = [graph.module] + ([reference.module] if reference is not None else [])
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        result = task.evaluate(graph.module, data, tokenizer, batch_size=batch_size, max_length=max_length,
                               reference=reference.module if reference is not None else None, progress=progress, name=data_name(data))
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    result.setdefault("accuracy", None)  # callers that print accuracy keep working on tasks without it
    return result


def main_metric(graph_or_task, data=None) -> str:
    """The metric a task reports first (and searches and drops use): accuracy, f1, mrr@10, ..."""
    task = graph_or_task if hasattr(graph_or_task, "main_metric") else task_for(graph_or_task)
    choose = getattr(task, "main_metric_for", None)
    return choose(data) if choose is not None and data is not None else task.main_metric
