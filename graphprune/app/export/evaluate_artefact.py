"""Accuracy of an exported artefact, measured in its own runtime (what ships, not the graph it came from)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ...training.batches import data_name, make_batches
from ...training.evaluate import batch_score
from .artefact import record_accuracy
from .standalone import Artefact


def evaluate_artefact(folder, data, tokenizer=None, *, batch_size: int = 64, max_length: int = 64, threads: int | None = None,
                      progress: bool = True, record: str | None = None) -> dict:
    """Accuracy and mean loss of the artefact in ``folder`` on ``data`` (a TextDataset or example dicts).

    The artefact runs in its own runtime (ONNX Runtime, the AOTInductor package, or
    ``from_pretrained``); the texts are tokenised with the artefact's own tokenizer
    unless ``tokenizer`` is given. With ``record`` (for example
    ``"rotten_tomatoes/test"``) the result is added to the artefact's manifest.

    Returns ``{"accuracy", "loss", "examples"}``, as ``graphprune.evaluate`` does.
    """
    artefact = Artefact(folder, threads=threads)
    task = artefact.manifest.get("task")
    if task != "sequence_classification":
        raise ValueError(f"evaluate artefact: {folder} is a {task or 'headless encoder'} artefact; accuracy is measured for sequence classifiers")
    tokenizer = tokenizer or artefact.tokenizer()
    units = correct = 0
    loss_sum = 0.0
    for batch in tqdm(make_batches(data, tokenizer, batch_size=batch_size, max_length=max_length),
                      desc=f"evaluate {artefact.manifest['artefact']} artefact on {data_name(data)}", disable=not progress, leave=False):
        feeds = {k: v.numpy() for k, v in batch.items() if k in artefact.inputs}
        logits = torch.from_numpy(np.asarray(artefact(feeds)["logits"], dtype=np.float32))
        labels = batch["labels"]
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        n, right, _ = batch_score(task, {"logits": logits}, batch)
        units += n
        correct += right
    if units == 0:
        raise ValueError(f"evaluate artefact: dataset {data_name(data)!r} is empty")
    metrics = {"accuracy": correct / units, "loss": loss_sum / units, "examples": units}
    if record:
        record_accuracy(folder, record, metrics)
    return metrics
