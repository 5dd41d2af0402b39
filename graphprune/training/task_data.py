"""Examples of the tasks beyond text classification: words with tags, questions with answers, texts to embed.

Each holds raw text (words, questions and contexts, sentences) and is tokenised on
demand by its task (``graphprune.training.tasks``), as ``TextDataset`` is for text
classification. Every one has ``name``, ``label_names`` (empty where there are no
classes), ``groups`` (optional: values kept apart when splitting), ``len`` and a
seeded ``subset``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace

import torch


class _Rows:
    """``len``, indexing and a seeded ``subset`` over a dataclass whose list fields are aligned rows."""

    _row_fields: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(getattr(self, self._row_fields[0]))

    def __getitem__(self, index: int) -> dict:
        return {name: getattr(self, name)[index] for name in self._row_fields if getattr(self, name)}

    def subset(self, n: int | None, seed: int = 0):
        """A seeded random subset of ``n`` rows (all of them if n is None or larger)."""
        if n is None or n >= len(self):
            return self
        order = random.Random(seed).sample(range(len(self)), n)
        picked = {name: [getattr(self, name)[i] for i in order] for name in self._row_fields if getattr(self, name)}
        if getattr(self, "groups", None):
            picked["groups"] = [self.groups[i] for i in order]
        return replace(self, **picked, name=f"{self.name}[:{n}]")

    def select(self, indices, name: str) -> "_Rows":
        """The rows at ``indices``, in that order, under a new name."""
        picked = {f.name: [getattr(self, f.name)[i] for i in indices]
                  for f in fields(self) if f.name in self._row_fields + ("groups",) and getattr(self, f.name)}
        return replace(self, **picked, name=name)


@dataclass
class TokenDataset(_Rows, torch.utils.data.Dataset):
    """Sentences as lists of words, each word tagged with a class id (``label_names[id]``, IOB2 names for NER)."""

    words: list[list[str]]
    tags: list[list[int]]
    label_names: tuple[str, ...]
    groups: list[str] = field(default_factory=list)
    name: str = ""
    _row_fields = ("words", "tags")


@dataclass
class QADataset(_Rows, torch.utils.data.Dataset):
    """Extractive questions: each context holds the answer; ``answers[i]`` is SQuAD's ``{"text": [...], "answer_start": [...]}``.

    The first answer is the training target; every answer counts as gold when scoring.
    """

    questions: list[str]
    contexts: list[str]
    answers: list[dict]
    groups: list[str] = field(default_factory=list)
    name: str = ""
    label_names: tuple[str, ...] = ()
    _row_fields = ("questions", "contexts", "answers")


@dataclass
class EmbeddingDataset(_Rows, torch.utils.data.Dataset):
    """Texts to embed, unlabelled; optionally aligned ``queries`` and ``documents`` (query i matches document i).

    ``texts`` are what calibration and distillation read; the pairs are for retrieval
    metrics. When a file has only pairs, ``texts`` are the queries then the documents.
    """

    texts: list[str]
    queries: list[str] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    name: str = ""
    label_names: tuple[str, ...] = ()
    _row_fields = ("texts",)

    def subset(self, n: int | None, seed: int = 0) -> "EmbeddingDataset":
        """A seeded subset of ``n`` texts, and of ``n`` query/document pairs (pairs stay matched)."""
        if n is None:
            return self
        rng = random.Random(seed)
        texts = self.texts if n >= len(self.texts) else [self.texts[i] for i in rng.sample(range(len(self.texts)), n)]
        pairs = list(range(len(self.queries)))
        if n < len(pairs):
            pairs = rng.sample(pairs, n)
        return replace(self, texts=texts, queries=[self.queries[i] for i in pairs], documents=[self.documents[i] for i in pairs],
                       groups=[], name=f"{self.name}[:{n}]")
