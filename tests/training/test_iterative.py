"""Iterative pruning with retraining on the cubic schedule."""

import pytest
import torch
import torch.nn.functional as F

import graphprune
from graphprune.ir.masks import mask_of
from graphprune.training.iterative import step_sparsities

from ..models import make_model, sentiment_data, tiny_tokenizer, trace_once


def test_step_sparsities_follow_the_cubic_schedule():
    steps = step_sparsities(0.9, 3)
    assert steps == pytest.approx([0.9 * (1 - (1 - i / 3) ** 3) for i in (1, 2, 3)])
    assert steps[-1] == 0.9 and steps[0] > steps[1] - steps[0] > steps[2] - steps[1]  # early steps remove more


def test_iterative_prune_reaches_the_target_and_reports_every_step():
    tokenizer = tiny_tokenizer()
    train, val = sentiment_data(64), sentiment_data(48, seed=1)
    graph = trace_once(make_model())
    # a dense graph that reads the snippets, so that pruning and fine-tuning move its accuracy
    graphprune.finetune(graph, sentiment_data(96), tokenizer, epochs=10, batch_size=16, learning_rate=3e-3, progress=False)
    options = dict(max_steps=3, batch_size=16, learning_rate=3e-3, progress=False)
    lines = []
    result = graphprune.iterative_prune(
        graph, "prune_weight", {"method": "l1"}, target_sparsity=0.9, steps=2,
        train_data=train, tokenizer=tokenizer, eval_data=val, teacher=graph, log=lines.append, **options,
    )
    assert [row["step"] for row in result.rows] == [1, 2]
    assert [row["sparsity"] for row in result.rows] == pytest.approx([round(s, 4) for s in step_sparsities(0.9, 2)])

    # oracle: the same rounds replayed by hand, each stage scored by hand (argmax and cross-entropy of its logits)
    batch = tokenizer(val.texts, padding=True, return_tensors="pt")
    labels = torch.tensor(val.labels)

    def scores(g):
        with torch.no_grad():
            logits = g.module.eval()(**batch).logits
        return (logits.argmax(-1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()

    work, expected = graph, []
    for sparsity in step_sparsities(0.9, 2):
        work, _ = graphprune.run_pass(work, "prune_weight", {"method": "l1", "sparsity": sparsity})
        pruned = scores(work)
        graphprune.finetune(work, train, tokenizer, teacher=graph, **options)
        expected.append((pruned[0], *scores(work)))
    reported = [(row["accuracy_pruned"], row["accuracy_finetuned"], row["loss_finetuned"]) for row in result.rows]
    assert reported == [pytest.approx(e, abs=1e-6) for e in expected]
    # here pruning costs accuracy and fine-tuning wins some back (1.0; 0.875, 0.958; 0.5, 0.75): every stage scores apart
    assert scores(graph)[0] > expected[0][0] and all(pruned < finetuned for pruned, finetuned, _ in expected)
    final, replayed = result.graph.module.state_dict(), work.module.state_dict()
    assert final.keys() == replayed.keys() and all(torch.equal(final[k], replayed[k]) for k in final)

    masks = [mask_of(m) for m in result.graph.module.modules() if mask_of(m) is not None]
    assert len(masks) == 12 and all(abs(int((~m.mask).sum()) - 0.9 * m.mask.numel()) <= 1 for m in masks)
    assert [h["pass"] for h in result.graph.history] == [h["pass"] for h in graph.history] + ["prune_weight", "finetune"] * 2
    assert all(mask_of(m) is None for m in graph.module.modules())  # the input graph is untouched
    assert "accuracy_finetuned" in str(result.table) and len(lines) == 2


def test_iterative_prune_checks_its_arguments():
    graph = trace_once(make_model())
    with pytest.raises(ValueError, match="target_sparsity = 1.2"):
        graphprune.iterative_prune(graph, target_sparsity=1.2, steps=2, train_data=sentiment_data(8))
    with pytest.raises(ValueError, match="steps = 0"):
        graphprune.iterative_prune(graph, target_sparsity=0.5, steps=0, train_data=sentiment_data(8))
