"""``graphprune demo``: the main job on the shipped model and data, end to end.

Baseline MiniLM fine-tuned on the Rotten Tomatoes snippets (built and cached on
first use), then one-shot unstructured pruning of the encoder's Linear weights with
the best criterion measured in ``bench/unstructured.py`` (SparseGPT with error
correction, 50%, calibrated on 128 training snippets), and structured pruning with
the best search measured in ``bench/structured.py`` (K-prune, half the FLOPs kept,
heads and neurons really removed); each followed by a short distilled recovery
fine-tune, with test accuracy, parameters, non-zero parameters and latency vs dense
after each step.
"""

from __future__ import annotations

import time

from ..infra.pipeline import run_pass
from ..ir.masks import commit_masks
from ..training.baseline import baseline_path, load_baseline
from ..training.calibration import CalibrationData
from ..training.data import load_rotten_tomatoes
from ..training.finetune import finetune
from ..training.models import load_tokenizer
from .workflow import latency_batch, results_table, stage_row

UNSTRUCTURED = ("prune_weight", {"method": "sparsegpt", "sparsity": 0.5})
# 1024 calibration examples (the pass takes 2048 by default) keep `make demo` under 20 minutes on 2 cores
STRUCTURED = ("structured_search", {"method": "kprune", "flops": 0.5, "num_samples": 1024})


def run_demo(
    cache=None,
    *,
    recovery_steps: int = 60,
    eval_limit: int | None = None,
    progress: bool = True,
    baseline=None,
    tokenizer=None,
    splits=None,
    stages=(UNSTRUCTURED, STRUCTURED),
    log=print,
):
    """Run the demo and return its results table (also printed through ``log``)."""
    start = time.perf_counter()
    if baseline is None:
        if not (baseline_path(cache) / "manifest.json").exists():
            log(f"building the MiniLM baseline (cached at {baseline_path(cache)}; about 14 minutes on 2 cores)...")
        baseline = load_baseline(cache, progress=progress)
    tokenizer = tokenizer or load_tokenizer(baseline.source.get("tokenizer", "minilm"))
    splits = splits or load_rotten_tomatoes()
    test = splits["test"].subset(eval_limit)
    inputs = latency_batch(test, tokenizer)
    calibration = CalibrationData(splits["train"], tokenizer)

    rows = [stage_row("dense baseline", baseline, baseline, test, tokenizer, inputs, progress=progress)]
    log(f"baseline test accuracy {rows[-1]['accuracy']:.4f}")
    for name, config in stages:
        compressed, info = run_pass(baseline, name, {**config, **({"progress": progress} if name == "structured_search" else {})}, data=calibration)
        rows.append(stage_row(f"{_label(name, config)} (one-shot)", compressed, baseline, test, tokenizer, inputs, progress=progress))
        log(f"after {name} {config}: accuracy {rows[-1]['accuracy']:.4f} ({info['seconds']} s)")
        finetune(compressed, splits["train"], tokenizer, teacher=baseline, max_steps=recovery_steps, learning_rate=5e-5, warmup_ratio=0.1, progress=progress)
        commit_masks(compressed)
        rows.append(stage_row(f"  + recovery ({recovery_steps} steps, KD)", compressed, baseline, test, tokenizer, inputs, progress=progress))
    table = results_table(
        f"graphprune demo: all-MiniLM-L6-v2 on Rotten Tomatoes test ({len(test)} snippets), "
        f"{time.perf_counter() - start:.0f} s",
        rows,
    )
    log(str(table))
    return table


def _label(name: str, config: dict) -> str:
    if name == "prune_weight":
        return f"{config['method']} {config['sparsity']:.0%} weights"
    if name == "structured_search":
        return f"{config['method']} {config['flops']:.0%} FLOPs kept"
    return name
