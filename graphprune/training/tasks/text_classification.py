"""``text-classification``: one label per text or text pair; single-label, multi-label or regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        """Single-label: the softmax over classes. Multi-label: each label's own Bernoulli (its sigmoid), one position per label."""
        logits = outputs["logits"]
        if _float_targets(batch) and logits.shape[-1] > 1:
            z = logits[..., None]
            return [(torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], -1), torch.ones(logits.shape, dtype=torch.bool, device=logits.device))]
        return [(torch.log_softmax(logits, -1)[:, None, :], torch.ones(len(logits), 1, dtype=torch.bool, device=logits.device))]

    def fisher_terms(self, outputs, batch, teacher, samples, generator):
        if outputs["logits"].shape[-1] == 1:  # regression: the Fisher of a unit-variance Gaussian's mean is (d mean)^2
            return [outputs["logits"].sum()]
        return super().fisher_terms(outputs, batch, teacher, samples, generator)

    def teacher_probabilities(self, outputs, batch):
        if outputs["logits"].shape[-1] == 1:
            return []  # regression needs no teacher probabilities (see fisher_terms)
        return super().teacher_probabilities(outputs, batch)

    def distillation_loss(self, student, teacher, batch, temperature):
        """Regression: the squared difference of the outputs; otherwise the KL of the distributions at ``temperature``."""
        if student["logits"].shape[-1] == 1:
            return F.mse_loss(student["logits"], teacher["logits"].detach())
        return super().distillation_loss(student, teacher, batch, temperature)


def _float_targets(batch) -> bool:
    labels = batch.get("labels")
    return isinstance(labels, torch.Tensor) and labels.dtype.is_floating_point


def problem_of(data) -> str:
    """single_label, multi_label or regression, from the first label's type."""
    first = data.labels[0] if len(data.labels) else 0
    if isinstance(first, (list, tuple)):
        return "multi_label"
    if isinstance(first, float):
        return "regression"
    return "single_label"
