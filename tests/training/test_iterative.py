"""Iterative pruning with retraining on the cubic schedule."""

import pytest

import graphprune
from graphprune.ir.masks import mask_of
from graphprune.training.iterative import step_sparsities

from ..models import make_model, sentiment_data, tiny_tokenizer, trace_once


def test_step_sparsities_follow_the_cubic_schedule():
    steps = step_sparsities(0.9, 3)
    assert steps == pytest.approx([0.9 * (1 - (1 - i / 3) ** 3) for i in (1, 2, 3)])
    assert steps[-1] == 0.9 and steps[0] > steps[1] - steps[0] > steps[2] - steps[1]  # early steps remove more


def test_iterative_prune_reaches_the_target_and_reports_every_step():
    graph = trace_once(make_model())
    tokenizer = tiny_tokenizer()
    lines = []
    result = graphprune.iterative_prune(
        graph, "prune_weight", {"method": "l1"}, target_sparsity=0.7, steps=2,
        train_data=sentiment_data(64), tokenizer=tokenizer, eval_data=sentiment_data(16, seed=1), teacher=graph,
        max_steps=3, batch_size=16, progress=False, log=lines.append,
    )
    assert [row["step"] for row in result.rows] == [1, 2]
    assert [row["sparsity"] for row in result.rows] == pytest.approx([round(s, 4) for s in step_sparsities(0.7, 2)])
    assert all(0 <= row["accuracy_pruned"] <= 1 and 0 <= row["accuracy_finetuned"] <= 1 for row in result.rows)
    masks = [mask_of(m) for m in result.graph.module.modules() if mask_of(m) is not None]
    assert len(masks) == 12 and all(abs(int((~m.mask).sum()) - 0.7 * m.mask.numel()) <= 1 for m in masks)
    assert [h["pass"] for h in result.graph.history] == ["prune_weight", "finetune", "prune_weight", "finetune"]
    assert all(mask_of(m) is None for m in graph.module.modules())  # the input graph is untouched
    assert "accuracy_finetuned" in str(result.table) and len(lines) == 2


def test_iterative_prune_checks_its_arguments():
    graph = trace_once(make_model())
    with pytest.raises(ValueError, match="target_sparsity = 1.2"):
        graphprune.iterative_prune(graph, target_sparsity=1.2, steps=2, train_data=sentiment_data(8))
    with pytest.raises(ValueError, match="steps = 0"):
        graphprune.iterative_prune(graph, target_sparsity=0.5, steps=0, train_data=sentiment_data(8))
