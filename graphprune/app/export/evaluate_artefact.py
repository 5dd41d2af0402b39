"""The task's metrics of an exported artefact, measured in its own runtime (what ships, not the graph it came from)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ...ir import losses
from ...training.batches import data_name, make_batches
from ...training.evaluate import batch_score
from ...training.tasks import TASK_TYPES, FeatureExtraction, task_for_data
from .artefact import record_accuracy
from .standalone import Artefact


class ArtefactModule:
    """An artefact called as a graph's module is: batch tensors in, torch outputs out, with the loss the graph computes.

    What lets every task's evaluation run unchanged on ONNX Runtime, AOTInductor or an HF folder.
    """

    device = torch.device("cpu")

    def __init__(self, artefact: Artefact):
        self.artefact, self.head = artefact, artefact.manifest.get("task")

    def __call__(self, **batch) -> dict:
        feeds = {k: v.numpy() for k, v in batch.items() if k in self.artefact.inputs}
        out = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in self.artefact(feeds).items()}
        out["loss"] = self._loss(out, batch)
        return out

    def _loss(self, out, batch):
        if self.head == "question_answering" and "start_positions" in batch:
            return losses.question_answering_loss(out["start_logits"], out["end_logits"], batch["start_positions"], batch["end_positions"])
        if self.head == "token_classification" and "labels" in batch:
            return losses.token_classification_loss(out["logits"], batch["labels"])
        if self.head == "sequence_classification" and "labels" in batch:
            labels = batch["labels"]
            return losses.sequence_classification_loss(out["logits"], labels, losses.infer_problem_type(out["logits"].shape[-1], labels))
        return None

    def eval(self):
        return self


def evaluate_artefact(folder, data, tokenizer=None, *, batch_size: int = 64, max_length: int = 64, threads: int | None = None,
                      progress: bool = True, record: str | None = None, reference=None) -> dict:
    """The task's metrics of the artefact in ``folder`` on ``data``, as ``graphprune.evaluate`` gives them for a graph.

    ``data`` is a task dataset (``TextDataset``, ``TokenDataset``, ``QADataset``,
    ``EmbeddingDataset``) or, for sequence classifiers, example dicts. The artefact
    runs in its own runtime (ONNX Runtime, the AOTInductor package, or
    ``from_pretrained``); texts are tokenised with the artefact's own tokenizer unless
    ``tokenizer`` is given. ``reference``: the dense graph, for an embedder's mean
    cosine. With ``record`` (for example ``"rotten_tomatoes/test"``) the result is
    added to the artefact's manifest.
    """
    artefact = Artefact(folder, threads=threads)
    head = artefact.manifest.get("task")
    tokenizer = tokenizer or artefact.tokenizer()
    expected = task_for_data(data)
    if expected is None:
        metrics = _example_dicts(artefact, folder, head, data, tokenizer, batch_size, max_length, progress)
    else:
        task = task_of_manifest(artefact.manifest)
        if task.name != expected.name:
            raise ValueError(f"evaluate artefact: {data_name(data)} holds {expected.name} data but {folder} is a {task.name} artefact")
        metrics = task.evaluate(ArtefactModule(artefact), data, tokenizer, batch_size=batch_size, max_length=max_length,
                                reference=reference.module if reference is not None else None, progress=progress,
                                name=f"{data_name(data)} ({artefact.manifest['artefact']} artefact)")
        metrics.setdefault("accuracy", None)
    if record:
        record_accuracy(folder, record, metrics)
    return metrics


def task_of_manifest(manifest: dict):
    """The task of an artefact, from its manifest's head (and pooling, for an embedder)."""
    for task_type in TASK_TYPES.values():
        if task_type.head is not None and task_type.head == manifest.get("task"):
            return task_type()
    if manifest.get("task") is None:
        return FeatureExtraction(manifest.get("embedding_pooling") or manifest.get("pooling") or "mean", bool(manifest.get("normalize", False)))
    raise ValueError(f"evaluate artefact: a {manifest.get('task')} artefact has no task metrics graphprune measures")


def _example_dicts(artefact, folder, head, data, tokenizer, batch_size, max_length, progress) -> dict:
    """Accuracy and loss of a sequence classifier on tokenised example dicts."""
    if head != "sequence_classification":
        raise ValueError(f"evaluate artefact: example dicts are scored for sequence classifiers; {folder} is a {head or 'headless encoder'} "
                         "artefact: pass its task's dataset (TokenDataset, QADataset, EmbeddingDataset)")
    module, units, correct, loss_sum = ArtefactModule(artefact), 0, 0, 0.0
    for batch in tqdm(make_batches(data, tokenizer, batch_size=batch_size, max_length=max_length),
                      desc=f"evaluate {artefact.manifest['artefact']} artefact on {data_name(data)}", disable=not progress, leave=False):
        out = module(**batch)
        n, right, _ = batch_score(head, out, batch)
        loss_sum += out["loss"].item() * n
        units += n
        correct += right
    if units == 0:
        raise ValueError(f"evaluate artefact: dataset {data_name(data)!r} is empty")
    return {"accuracy": correct / units, "loss": loss_sum / units, "examples": units}
