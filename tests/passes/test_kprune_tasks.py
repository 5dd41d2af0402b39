"""K-prune against magnitude head and neuron removal on tiny token-classification and QA models trained here.

On tiny NER and extractive-QA models trained on generated data, ``structured_search``
with ``method = "kprune"`` (scored with each task's own output distributions) and
magnitude (L1) removal of heads and FFN neurons are compared at FLOPs 0.5 and 0.3 on the
task's metric (entity F1; SQuAD F1), mean of 3 seeds. Neither method is retrained;
K-prune keeps its own least-squares repair (part of the method), magnitude gets none.

What is asserted is what these models show: K-prune keeps each task's metric within 2
points of dense, and is never more than a point behind magnitude removal. The goal of a
2-point lead over magnitude is not met here, and not for K-prune's want: these generated
tasks are easy enough that magnitude removal itself loses at most 1.5 points on average
(QA stays at F1 1.000 for both), so neither method has room to lead; the table (``-s``)
shows the numbers.

The magnitude baseline is the one ``bench/structured.py`` compares against: the same
number of heads and neurons in every layer as K-prune kept (so exactly the same FLOPs),
chosen within each layer by the L1 norm of their weights (a head's q, k, v rows and
output columns; a neuron's up row and down column: ``importance.l1_*_scores``) and
removed by ``remove_heads`` / ``remove_ffn_neurons``. It gets K-prune's per-layer
allocation for free, and the two compare at exactly the same FLOPs (the library's own
``scope = "global"`` L1 removes a share of units, which misses the budget by whole heads).

Models: BERT, 2 layers, hidden 64, 4 heads of 16, FFN 128; ``initializer_range = 0.07``,
BERT-base's 0.02 at width 768 scaled to width 64 (0.02 * sqrt(768 / 64)), close to
PyTorch's default Linear init at fan-in 64. At HF's 0.02 a width-64 model starts
near zero, and QA on ``qa_data`` sits at its 50 % plateau for hundreds of steps.
Each seed draws its own initial weights, training, validation and test data, and
fine-tuning order. Nothing here is tuned on the test split, and K-prune runs with its
defaults apart from the number of calibration examples and ``seq_len`` (calibrated on
the training split, as the method prescribes).

Run with ``-s`` to see the table.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch
import transformers as tf

import graphprune
from graphprune.training.calibration import CalibrationData
from graphprune.passes.structured.blocks import attention_blocks, ffn_blocks
from graphprune.passes.structured.importance import l1_head_scores, l1_neuron_scores
from tests.models import NER_TAGS, TINY, ner_data, qa_data, tiny_tokenizer

SEEDS = (0, 1, 2)
FLOPS = (0.5, 0.3)
KEPT = 0.02  # K-prune's mean drop from dense at most (two points of the task's metric)
BEHIND = 0.01  # K-prune's mean gap to magnitude removal at least -1 point
MAX_LENGTH = 32  # every generated example fits; FLOPs are counted at this length too
CONFIG = {**TINY, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "initializer_range": 0.07}
SEARCH = {"method": "kprune", "num_samples": 128, "score_samples": 64, "reconstruct_samples": 128, "seq_len": MAX_LENGTH, "progress": False}

TASKS = {
    "token-classification": dict(
        model=lambda: tf.BertForTokenClassification(tf.BertConfig(**CONFIG, num_labels=len(NER_TAGS))),
        data=ner_data, train=256, epochs=20, learning_rate=3e-3, metric="entity F1",
    ),
    "question-answering": dict(
        model=lambda: tf.BertForQuestionAnswering(tf.BertConfig(**CONFIG)),
        data=qa_data, train=256, epochs=12, learning_rate=3e-3, metric="SQuAD F1",
    ),
}


def f1(graph, data, tokenizer) -> float:
    return graphprune.evaluate(graph, data, tokenizer, max_length=MAX_LENGTH, progress=False)["f1"]


def flops(graph) -> float:
    graph, _ = graphprune.run_pass(graph, "add_common_metadata", {"seq_len": MAX_LENGTH})
    return graph.meta["common"]["totals"]["flops"]


@functools.cache
def traced(task: str):
    """One trace per task; each seed loads its own initial weights into a copy (tracing costs seconds)."""
    torch.manual_seed(0)
    return graphprune.trace(TASKS[task]["model"]().eval())


@functools.cache
def dense_model(task: str, seed: int):
    """A model trained on generated data: (graph, train, validation, test), cached for the module's tests."""
    spec, tokenizer = TASKS[task], tiny_tokenizer()
    train, val, test = spec["data"](spec["train"], seed=100 + seed), spec["data"](64, seed=200 + seed), spec["data"](128, seed=300 + seed)
    graph = traced(task).copy()  # before seeding: the first call's own seeded model must not shift this seed's draws
    torch.manual_seed(seed)
    graph.module.load_state_dict(spec["model"]().state_dict())
    graphprune.finetune(graph, train, tokenizer, epochs=spec["epochs"], batch_size=16, learning_rate=spec["learning_rate"],
                        max_length=MAX_LENGTH, seed=seed, progress=False)
    return graph, train, val, test


def magnitude_at(dense, heads_per_layer: list[int], widths: list[int]):
    """``dense`` with, in every layer, the heads and neurons of lowest L1 norm removed down to the given counts; no repair."""
    heads, ffns = attention_blocks(dense, "test"), ffn_blocks(dense, "test")
    lowest = lambda scores, drop: sorted(torch.argsort(scores, stable=True)[:drop].tolist())  # noqa: E731
    gone_heads = {i: lowest(s, b.heads - k) for i, (s, b, k) in enumerate(zip(l1_head_scores(dense, heads), heads, heads_per_layer))}
    gone_neurons = {i: lowest(s, b.width - k) for i, (s, b, k) in enumerate(zip(l1_neuron_scores(dense, ffns), ffns, widths))}
    graph, _ = graphprune.run_pass(dense, "remove_heads", {"heads": gone_heads, "min_heads": 0})
    graph, _ = graphprune.run_pass(graph, "remove_ffn_neurons", {"neurons": gone_neurons, "min_neurons": 0})
    return graph


def compare(task: str) -> list[dict]:
    tokenizer, rows = tiny_tokenizer(), []
    for seed in SEEDS:
        dense, train, val, test = dense_model(task, seed)
        dense_test, dense_val = f1(dense, test, tokenizer), f1(dense, val, tokenizer)
        assert dense_test > 0.8 and dense_val > 0.8, f"{task} seed {seed}: dense F1 {dense_test:.3f} (test), {dense_val:.3f} (validation)"
        dense_flops = flops(dense)
        calibration = CalibrationData(train, tokenizer, max_length=MAX_LENGTH)
        for keep in FLOPS:
            kprune, info = graphprune.run_pass(dense, "structured_search", {**SEARCH, "flops": keep}, data=calibration)
            magnitude = magnitude_at(dense, info["heads_per_layer"], info["ffn_width_per_layer"])
            kept = flops(magnitude) / dense_flops
            assert kept == pytest.approx(info["flops_ratio"]) and keep - 0.02 <= kept <= keep  # the same FLOPs, on budget
            rows.append({"seed": seed, "flops": keep, "kept": kept, "dense": dense_test, "kprune": f1(kprune, test, tokenizer),
                         "magnitude": f1(magnitude, test, tokenizer), "heads": info["heads_per_layer"], "widths": info["ffn_width_per_layer"]})
    print(f"\n{task} ({TASKS[task]['metric']} on {len(test)} held-out examples; magnitude: L1 at K-prune's per-layer counts)")
    print(f"{'seed':>4} {'flops':>5} {'kept':>6} {'dense':>6} {'kprune':>6} {'magnitude':>9} {'gap':>6}  heads / FFN widths per layer")
    for r in rows:
        print(f"{r['seed']:>4} {r['flops']:>5} {r['kept']:>6.3f} {r['dense']:>6.3f} {r['kprune']:>6.3f} {r['magnitude']:>9.3f} "
              f"{r['kprune'] - r['magnitude']:>+6.3f}  {r['heads']} / {r['widths']}")
    for keep in FLOPS:
        at = [r for r in rows if r["flops"] == keep]
        print(f"mean {keep:>5} {'':>6} {statistics.mean(r['dense'] for r in at):>6.3f} {statistics.mean(r['kprune'] for r in at):>6.3f} "
              f"{statistics.mean(r['magnitude'] for r in at):>9.3f} {statistics.mean(r['kprune'] - r['magnitude'] for r in at):>+6.3f}")
    return rows


@pytest.mark.parametrize("task", list(TASKS))
def test_kprune_keeps_each_tasks_metric_and_stays_level_with_magnitude_removal(task):
    rows = compare(task)
    for keep in FLOPS:
        at = [r for r in rows if r["flops"] == keep]
        drop = statistics.mean(r["dense"] - r["kprune"] for r in at)
        gap = statistics.mean(r["kprune"] - r["magnitude"] for r in at)
        assert drop <= KEPT, f"{task} at FLOPs {keep}: K-prune loses {drop:.3f} of dense's metric on average (at most {KEPT})"
        assert gap >= -BEHIND, f"{task} at FLOPs {keep}: K-prune trails magnitude removal by {-gap:.3f} on average (at most {BEHIND})"


def test_kprune_energy_leaves_padding_out_so_batching_does_not_change_scores():
    from graphprune.passes.structured.search_methods import _output_energy
    from tests.models import make_model, trace_once

    graph = trace_once(make_model())
    heads, ffns = attention_blocks(graph, "test"), ffn_blocks(graph, "test")
    short = {"input_ids": torch.tensor([[2, 10, 20, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    long_ = {"input_ids": torch.tensor([[2, 11, 21, 31, 41, 51, 3]]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    padded = {"input_ids": torch.tensor([[2, 10, 20, 3, 0, 0, 0], [2, 11, 21, 31, 41, 51, 3]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7])}
    apart, together = _output_energy(graph, heads, ffns, [short, long_]), _output_energy(graph, heads, ffns, [padded])
    for kind in (0, 1):  # heads, neurons
        for a, b in zip(apart[kind], together[kind]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
