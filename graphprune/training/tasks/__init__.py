"""The tasks graphprune compresses models for, by HF pipeline name, and how a graph or a dataset names its task.

    >>> from graphprune.training.tasks import task_for
    >>> task = task_for(graph)            # from the graph's head and recorded pooling
    >>> task.name, task.main_metric
    ('token-classification', 'f1')

A new task is one new module with a :class:`~.base.Task` subclass, added to ``TASK_TYPES``.
"""

from __future__ import annotations

from ...ir.calls import model_call_of
from .base import Task, pool
from .feature_extraction import FeatureExtraction
from .question_answering import QuestionAnswering
from .text_classification import TextClassification
from .token_classification import TokenClassification

TASK_TYPES: dict[str, type[Task]] = {t.name: t for t in (TextClassification, TokenClassification, QuestionAnswering, FeatureExtraction)}
TASK_NAMES = tuple(TASK_TYPES)


def get_task(name: str, **options) -> Task:
    """The task called ``name`` (an HF pipeline name); ``options`` go to its constructor (pooling, normalize)."""
    if name not in TASK_TYPES:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASK_NAMES)}")
    return TASK_TYPES[name](**options)


def task_for(graph, caller: str = "graphprune") -> Task:
    """The task of ``graph``: its head's, or feature extraction for a headless encoder (pooled as its source records)."""
    call = model_call_of(graph.module)
    head = call.task if call is not None else None
    for task_type in TASK_TYPES.values():
        if task_type.head == head and head is not None:
            return task_type()
    if head is None and call is not None:
        return FeatureExtraction(graph.source.get("pooling", "mean"), bool(graph.source.get("normalize", False)))
    what = call.model_class if call is not None else graph.source.get("model_class", "this graph")
    raise ValueError(
        f"{caller}: {what} has no task graphprune can score ({head or 'unknown head'}); supported: "
        "text-classification (...ForSequenceClassification), token-classification, question-answering, "
        "feature-extraction (headless encoders such as BertModel)"
    )


def task_for_data(data) -> Task | None:
    """The task whose dataset type ``data`` is, or None for example dicts and DataLoaders."""
    for task_type in TASK_TYPES.values():
        if isinstance(data, task_type.dataset_type):
            return task_type()
    return None


__all__ = ["FeatureExtraction", "QuestionAnswering", "TASK_NAMES", "TASK_TYPES", "Task", "TextClassification",
           "TokenClassification", "get_task", "pool", "task_for", "task_for_data"]
