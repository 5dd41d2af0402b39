"""The fine-tuned MiniLM baseline on the Rotten Tomatoes snippets, built once and cached.

The recipe is DESIGN.md's: movie-grouped 80/10/10 split, max length 64 with each
batch trimmed to its longest row, batch 32, AdamW lr 5e-5, weight decay 0.01, 10%
warm-up then linear decay, 2 epochs. It is cached as a graphprune checkpoint under
``$GRAPHPRUNE_CACHE`` (default ``~/.cache/graphprune``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..ir.errors import CheckpointError
from ..ir.graph import Graph, load
from ..ir.tracing import trace
from .data import RT_LABELS, load_rotten_tomatoes
from .evaluate import evaluate
from .finetune import finetune
from .models import load_minilm, load_tokenizer

BASELINE_NAME = "minilm-rotten-tomatoes-v1"
RECIPE = {"learning_rate": 5e-5, "epochs": 2.0, "batch_size": 32, "max_length": 64, "weight_decay": 0.01, "warmup_ratio": 0.1, "seed": 0}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get("GRAPHPRUNE_CACHE"):
        return Path(os.environ["GRAPHPRUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphprune"


def baseline_path(cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "baselines" / BASELINE_NAME


def build_baseline(cache: str | os.PathLike | None = None, *, progress: bool = True) -> Graph:
    """Fine-tune MiniLM on the snippets (about 14 minutes on 2 cores) and save it to the cache."""
    model, tokenizer = load_minilm(num_labels=2, seed=RECIPE["seed"])
    graph = trace(model)
    graph.source["tokenizer"] = "minilm"
    splits = load_rotten_tomatoes()
    start = time.perf_counter()
    result = finetune(graph, splits["train"], tokenizer, eval_data=splits["validation"], progress=progress, **RECIPE)
    test = evaluate(graph, splits["test"], tokenizer, progress=progress)
    graph.meta["baseline"] = {
        "dataset": "rotten_tomatoes",
        "recipe": RECIPE,
        "steps": result.steps,
        "train_seconds": round(time.perf_counter() - start, 1),
        "validation": result.evaluations,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
    }
    graph.save(baseline_path(cache))
    return graph


def load_baseline(cache: str | os.PathLike | None = None, *, build: bool = True, progress: bool = True) -> Graph:
    """The cached baseline graph; built first when missing (and ``build`` is true)."""
    path = baseline_path(cache)
    try:
        graph = load(path)
    except CheckpointError:
        if path.exists() or not build:
            raise
        graph = build_baseline(cache, progress=progress)
    graph.source.setdefault("label_names", list(RT_LABELS))  # its ids are the snippets' (0 rotten, 1 fresh)
    return graph


def baseline_or_pretrained(quick: bool = False):
    """The cached fine-tuned baseline and its tokenizer; with ``quick``, MiniLM with an untrained head.

    What the tutorials start from: ``--quick`` (what the tests run) skips the baseline
    (built once, about 14 minutes) for the pretrained encoder, traced, with a newly
    initialised head (accuracy near chance): the workflow without the numbers.
    """
    if not quick:
        return load_baseline(), load_tokenizer("minilm")
    model, tokenizer = load_minilm(num_labels=2)
    graph = trace(model)
    graph.source["tokenizer"] = "minilm"
    return graph, tokenizer
