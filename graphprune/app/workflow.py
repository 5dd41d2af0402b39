"""The seeds' workflow: measure, compress, measure, recover, measure, tabulate."""

from __future__ import annotations

from ..ir.graph import Graph
from ..ir.masks import count_parameters
from ..ir.summary import Summary
from ..training.data import Collator, TextDataset
from ..training.evaluate import evaluate
from ..training.timing import compare_latency

COLUMNS = ["stage", "accuracy", "loss", "params", "nonzero_params", "latency_vs_dense"]


def check_labels(graph: Graph, data: TextDataset) -> None:
    """Refuse to score a classifier on a dataset with a different number of classes."""
    labels = len((graph.source.get("config") or {}).get("id2label") or {})
    if labels and labels != len(data.label_names):
        raise ValueError(f"the model has {labels} labels but {data.name} has {len(data.label_names)} ({', '.join(data.label_names)})")


def latency_batch(data: TextDataset, tokenizer, *, batch_size: int = 32, max_length: int = 64) -> dict:
    """A fixed batch of real examples for latency comparisons (labels dropped)."""
    batch = Collator(tokenizer, max_length)([data[i] for i in range(min(batch_size, len(data)))])
    batch.pop("labels")
    return batch


def stage_row(name: str, graph: Graph, dense: Graph, data: TextDataset, tokenizer, latency_inputs: dict, *, progress: bool = True, max_length: int = 64) -> dict:
    metrics = evaluate(graph, data, tokenizer, max_length=max_length, progress=progress)
    params, nonzero = count_parameters(graph)
    ratio = 1.0 if graph is dense else compare_latency(graph.module, dense.module, latency_inputs)["ratio"]
    return {
        "stage": name,
        "accuracy": round(metrics["accuracy"], 4),
        "loss": round(metrics["loss"], 4),
        "params": params,
        "nonzero_params": nonzero,
        "latency_vs_dense": round(ratio, 3),
    }


def results_table(title: str, rows: list[dict]) -> Summary:
    return Summary(title=title, columns=COLUMNS, rows=rows, total_row=False)
