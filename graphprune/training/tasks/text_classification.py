"""``text-classification``: one label per text or text pair; single-label, multi-label or regression."""

from __future__ import annotations

import torch

from .. import metrics
from ..data import Collator, TextDataset
from .base import Task


class TextClassification(Task):
    name = "text-classification"
    head = "sequence_classification"
    main_metric = "accuracy"
    metrics = ("accuracy", "macro_f1", "micro_f1", "pearson", "spearman")
    targets = ("labels",)
    dataset_type = TextDataset

    def collate(self, rows, tokenizer, max_length):
        return Collator(tokenizer, max_length)(rows)

    def main_metric_for(self, data) -> str:
        """accuracy for single-label data; micro F1 for multi-label; Spearman for regression."""
        kind = problem_of(data)
        return {"multi_label": "micro_f1", "regression": "spearman"}.get(kind, "accuracy")

    def predictions(self, outputs, batch, meta, first_row):
        logits = outputs["logits"].detach().float().cpu()
        labels = batch["labels"]
        if labels.dtype.is_floating_point and labels.dim() == 2:
            return [row.tolist() for row in (logits > 0).long()]  # multi-label: a label is on where its logit is positive
        if labels.dtype.is_floating_point:
            return logits.view(-1).tolist()  # regression
        return logits.argmax(-1).tolist()

    def score(self, predictions, data):
        kind = problem_of(data)
        if kind == "multi_label":
            return metrics.multilabel_metrics(predictions, [[int(v) for v in row] for row in data.labels])
        if kind == "regression":
            return metrics.regression_metrics(predictions, data.labels)
        return metrics.classification_metrics(predictions, data.labels, len(data.label_names) or None)

    def distributions(self, outputs, batch):
        logits = outputs["logits"]
        return [(torch.log_softmax(logits, -1)[:, None, :], torch.ones(len(logits), 1, dtype=torch.bool, device=logits.device))]


def problem_of(data) -> str:
    """single_label, multi_label or regression, from the first label's type."""
    first = data.labels[0] if len(data.labels) else 0
    if isinstance(first, (list, tuple)):
        return "multi_label"
    if isinstance(first, float):
        return "regression"
    return "single_label"
