"""``token-classification``: one tag per word (NER and the like), scored by entities as seqeval does.

Words are tokenised with ``is_split_into_words``; each word's tag sits on its first
sub-token and every other position is ignored (-100), as HF's token-classification
examples align them. A word's prediction is its first sub-token's; words cut off by
``max_length`` count as predicted ``O`` (so they lower recall, never vanish).
"""

from __future__ import annotations

import torch

from .. import metrics
from ..task_data import TokenDataset
from .base import Task

IGNORED = -100


class TokenClassification(Task):
    name = "token-classification"
    head = "token_classification"
    main_metric = "f1"
    metrics = ("f1", "precision", "recall", "accuracy")
    targets = ("labels",)
    dataset_type = TokenDataset

    def _encode(self, rows, tokenizer, max_length):
        words = [row["words"] for row in rows]
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        word_ids = [encoded.word_ids(i) for i in range(len(rows))]
        labels = torch.full(encoded["input_ids"].shape, IGNORED, dtype=torch.long)
        for i, (row, ids) in enumerate(zip(rows, word_ids)):
            previous = None
            for position, word in enumerate(ids):
                if word is not None and word != previous:
                    labels[i, position] = row["tags"][word] if "tags" in row else 0
                previous = word
        batch = {k: v for k, v in encoded.items()}
        batch["labels"] = labels
        return batch, word_ids

    def collate(self, rows, tokenizer, max_length):
        return self._encode(rows, tokenizer, max_length)[0]

    def eval_features(self, rows, tokenizer, max_length):
        batch, word_ids = self._encode(rows, tokenizer, max_length)
        return batch, {"word_ids": word_ids, "words": [len(row["words"]) for row in rows]}

    def predictions(self, outputs, batch, meta, first_row):
        predicted = outputs["logits"].detach().argmax(-1).cpu()
        out = []
        for i, (ids, count) in enumerate(zip(meta["word_ids"], meta["words"])):
            tags = [None] * count
            for position, word in enumerate(ids):
                if word is not None and tags[word] is None:
                    tags[word] = int(predicted[i, position])
            out.append(tags)  # None: a word cut off by max_length
        return out

    def score(self, predictions, data):
        names = data.label_names
        outside = names.index("O") if "O" in names else 0
        true = [[names[t] for t in tags] for tags in data.tags]
        predicted = [[names[outside if t is None else t] for t in tags] for tags in predictions]
        words = sum(len(tags) for tags in data.tags)
        right = sum(p == t for ps, ts in zip(predicted, true) for p, t in zip(ps, ts))
        return {**metrics.entity_metrics(true, predicted), "accuracy": right / max(1, words)}

    def loss_units(self, batch):
        return int((batch["labels"] != IGNORED).sum())

    def distributions(self, outputs, batch):
        log_p = torch.log_softmax(outputs["logits"], -1)
        return [(log_p, batch["labels"].to(log_p.device) != IGNORED)]  # each labelled token's distribution
