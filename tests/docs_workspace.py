"""The folder every documentation snippet runs in: a user's model folder and data files, tiny.

The guides speak to a user with their own model and data, so their snippets load
``my-model`` (a ``save_pretrained`` folder) and ``train.csv`` / ``validation.csv`` /
``test.csv`` (columns ``text`` and ``label``, labels as strings). Here those are a
BERT of 4 layers and 4 heads over a 120-word vocabulary and a few dozen synthetic
snippets, so a page's snippets run in seconds; the guides' numbers (steps, sizes)
are the ones a user would write for a real model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import transformers as tf

from .models import TINY, sentiment_data, tiny_tokenizer

LABELS = ("neg", "pos")
SPLITS = {"train": (0, 64), "validation": (1, 32), "test": (2, 32)}  # split: (seed, rows)


def build_workspace(folder: Path) -> Path:
    """Write ``my-model/`` and the three CSV splits into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = tf.BertConfig(**{**TINY, "num_hidden_layers": 4}, num_labels=2,
                           id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = tf.BertForSequenceClassification(config).eval()
    model.save_pretrained(folder / "my-model")
    tiny_tokenizer().save_pretrained(folder / "my-model")
    for split, (seed, rows) in SPLITS.items():
        data = sentiment_data(rows, seed=seed)
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((text, LABELS[label]) for text, label in zip(data.texts, data.labels))
    return folder
