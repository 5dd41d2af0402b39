"""The training losses of HF task heads, computed from a traced graph's outputs.

``torch.export`` traces one call without labels, so the loss, which HF computes
inside ``forward`` when labels are given, is rebuilt here from the head's logits.
Each function follows the transformers 5 source of the heads graphprune supports
(``Bert/Roberta/XLMRoberta/Camembert/DistilBert/Albert/Electra/DebertaV2`` ``For``
``SequenceClassification``, ``TokenClassification``, ``QuestionAnswering``,
``MaskedLM``); the tests compare every one with the eager model's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("sequence_classification", "token_classification", "question_answering", "masked_lm")

# The call inputs that carry each task's targets.
TARGETS = {
    "sequence_classification": ("labels",),
    "token_classification": ("labels",),
    "question_answering": ("start_positions", "end_positions"),
    "masked_lm": ("labels",),
}


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """HF's rule when ``config.problem_type`` is unset: one label regresses, integer labels classify."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    labels = labels.to(logits.device)
    num_labels = logits.size(-1)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"unknown problem_type {problem_type!r}; expected regression, single_label_classification or multi_label_classification")


def deberta_v2_unset_problem_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeBERTa-v2's own rule when ``problem_type`` is unset (it does not record one).

    Regression for one label, where DeBERTa also returns the logits flattened to
    (batch,) in the labels' dtype; negative class labels are ignored; soft labels of
    shape (batch, classes) get the cross-entropy against their distribution.
    Returns ``(loss, logits)``.
    """
    num_labels = logits.size(-1)
    if num_labels == 1:
        logits = logits.view(-1).to(labels.dtype)
        return F.mse_loss(logits, labels.view(-1)), logits
    if labels.dim() == 1 or labels.size(-1) == 1:
        label_index = (labels >= 0).nonzero()
        labels = labels.long()
        if label_index.size(0) == 0:
            return torch.tensor(0).to(logits), logits
        labeled_logits = torch.gather(logits, 0, label_index.expand(label_index.size(0), num_labels))
        labels = torch.gather(labels, 0, label_index.view(-1))
        return F.cross_entropy(labeled_logits.view(-1, num_labels).float(), labels.view(-1)), logits
    return -((F.log_softmax(logits, -1) * labels).sum(-1)).mean(), logits


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Positions labelled -100 (padding, sub-word continuations) are ignored, as in HF.
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.to(logits.device).view(-1))


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.to(logits.device).view(-1))


def question_answering_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    # Answers outside the (possibly truncated) input are clamped to an ignored index.
    ignored_index = start_logits.size(1)
    start_positions = start_positions.to(start_logits.device).clamp(0, ignored_index)
    end_positions = end_positions.to(end_logits.device).clamp(0, ignored_index)
    start_loss = F.cross_entropy(start_logits, start_positions, ignore_index=ignored_index)
    end_loss = F.cross_entropy(end_logits, end_positions, ignore_index=ignored_index)
    return (start_loss + end_loss) / 2
