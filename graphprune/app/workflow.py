"""The seeds' workflow: measure, compress, measure, recover, measure, tabulate, on any task."""

from __future__ import annotations

from ..ir.graph import Graph
from ..ir.masks import count_parameters
from ..ir.summary import Summary
from ..training.evaluate import evaluate, main_metric
from ..training.tasks import task_for_data
from ..training.timing import compare_latency

COLUMNS = ["stage", "accuracy", "loss", "params", "nonzero_params", "latency_vs_dense"]


def check_labels(graph: Graph, data) -> None:
    """Refuse to score a classifier on a dataset with a different number of classes."""
    labels = len((graph.source.get("config") or {}).get("id2label") or {})
    names = getattr(data, "label_names", ())
    if labels and names and labels != len(names):
        raise ValueError(f"the model has {labels} labels but {data.name} has {len(names)} ({', '.join(names)})")


def latency_batch(data, tokenizer, *, batch_size: int = 32, max_length: int = 64) -> dict:
    """A fixed batch of real examples for latency comparisons (targets dropped)."""
    task = task_for_data(data)
    batch = task.collate([data[i] for i in range(min(batch_size, len(data)))], tokenizer, max_length)
    return {k: v for k, v in batch.items() if k not in task.targets}


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def shape_batch(data, tokenizer, *, batch_size: int, length: int) -> dict:
    """Exactly ``batch_size`` x ``length`` tokens of real examples (repeated where there are fewer, padded where
    shorter): what a latency at a shape times, whatever the data's own lengths."""
    import torch

    task = task_for_data(data)
    batch = task.collate([data[i % len(data)] for i in range(batch_size)], tokenizer, length)
    out = {}
    for key in MODEL_INPUTS:
        if key in batch:
            value = batch[key][:, :length]
            pad = (tokenizer.pad_token_id or 0) if key == "input_ids" else 0
            out[key] = torch.nn.functional.pad(value, (0, length - value.shape[1]), value=pad)
    return out


def stage_row(name: str, graph: Graph, dense: Graph, data, tokenizer, latency_inputs: dict, *, progress: bool = True, max_length: int = 64) -> dict:
    """One row of a results table: the task's main metric (and loss) on ``data``, sizes, latency against ``dense``."""
    metric = main_metric(graph, data)
    metrics = evaluate(graph, data, tokenizer, max_length=max_length, progress=progress, reference=dense)
    params, nonzero = count_parameters(graph)
    ratio = 1.0 if graph is dense else compare_latency(graph.module, dense.module, latency_inputs)["ratio"]
    loss = metrics.get("loss")
    return {
        "stage": name,
        metric: round(metrics[metric], 4),
        "loss": None if loss is None else round(loss, 4),
        "params": params,
        "nonzero_params": nonzero,
        "latency_vs_dense": round(ratio, 3),
    }


def results_table(title: str, rows: list[dict]) -> Summary:
    """The stages' rows, under the metric they carry (``accuracy`` for classifiers, ``f1``, ``mrr@10``, ...)."""
    metric = next((k for k in rows[0] if k not in COLUMNS), "accuracy") if rows else "accuracy"
    columns = ["stage", metric] + COLUMNS[2:]
    return Summary(title=title, columns=columns, rows=rows, total_row=False)
