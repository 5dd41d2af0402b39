"""Batches of model inputs from any of the data forms graphprune accepts, written once.

Evaluation, fine-tuning and (in passes) calibration all take one of:

- a :class:`~graphprune.training.data.TextDataset` (texts with class labels), tokenised
  with the model's tokenizer, each batch trimmed to its longest row;
- a sequence of examples, each a dict of model inputs and targets as a tokenizer
  gives them (``input_ids``, ``attention_mask``, ``labels``, ``start_positions``...),
  collated by ``collate_fn`` (default: HF's ``DataCollatorWithPadding`` with the
  tokenizer, or plain stacking without one), so token classification, question
  answering and masked LM data work too;
- a ``torch.utils.data.DataLoader`` that already yields batches, used as it is.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from .data import Collator, TextDataset
from .tasks import task_for_data


def data_name(data) -> str:
    return getattr(data, "name", "") or type(data).__name__


def subset(data, n: int | None, seed: int = 0):
    """A seeded random subset of ``n`` examples (all of them if n is None or larger)."""
    if n is None:
        return data
    if hasattr(data, "subset"):  # TextDataset and the other tasks' datasets
        return data.subset(n, seed=seed)
    if isinstance(data, torch.utils.data.DataLoader):
        raise ValueError("subset: a DataLoader yields ready batches; pass the examples instead to take a subset")
    if n >= len(data):
        return data
    return [data[i] for i in random.Random(seed).sample(range(len(data)), n)]


def on_device(batch, device) -> dict:
    """``batch`` (a dict) with its tensors on ``device``: where the graph's weights are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}


class _TaskCollator:
    """A task's own tokenisation as a DataLoader's collate_fn (picklable, unlike a lambda)."""

    def __init__(self, task, tokenizer, max_length: int):
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length

    def __call__(self, rows):
        return self.task.collate(rows, self.tokenizer, self.max_length)


def make_batches(
    data,
    tokenizer=None,
    *,
    batch_size: int = 32,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    collate_fn=None,
):
    """A re-iterable of batches (dicts of tensors) from ``data`` in any accepted form."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    task = task_for_data(data)
    if task is not None:
        if tokenizer is None:
            raise ValueError(f"{data_name(data)} holds raw texts: pass the model's tokenizer to tokenise them")
        if collate_fn is None:
            collate_fn = Collator(tokenizer, max_length) if isinstance(data, TextDataset) else _TaskCollator(task, tokenizer, max_length)
    elif isinstance(data, Sequence) or isinstance(data, torch.utils.data.Dataset):
        if len(data) and not isinstance(data[0], Mapping):
            raise ValueError(
                f"examples must be dicts of model inputs and targets (input_ids, labels, ...); got {type(data[0]).__name__}"
            )
        if collate_fn is None:
            from transformers import DataCollatorWithPadding, default_data_collator

            collate_fn = DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator
    else:
        raise ValueError(
            f"cannot make batches from {type(data).__name__}: pass a TextDataset, a list of example dicts, or a DataLoader"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=generator)
