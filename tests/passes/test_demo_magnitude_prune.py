import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir.metadata import common

from ..models import make_model, max_diff, padded_inputs

ENCODER = ("query", "key", "value", "attention_output", "ffn_up", "ffn_down")


def _linears(graph, roles=ENCODER):
    return {n.target: graph.module.get_submodule(n.target) for n in graph.nodes if n.op == "call_module" and common(n).get("role") in roles}


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_masks_the_smallest_weights_of_each_matrix(sparsity):
    graph, _ = graphprune.run_pass(graphprune.trace(make_model()), "init_metadata")
    dense = {k: m.weight.detach().clone() for k, m in _linears(graph).items()}
    pruned, info = graphprune.run_pass(graph, "demo_magnitude_prune", {"sparsity": sparsity})
    assert info["modules"] == len(dense) == 12
    for name, module in _linears(pruned).items():
        w = dense[name]
        k = round(sparsity * w.numel())
        threshold = w.abs().flatten().kthvalue(k).values  # independent oracle: the k-th smallest |w|
        expected = torch.where(w.abs() > threshold, w, torch.zeros_like(w))
        assert torch.equal(module.weight, expected)
        assert common(pruned.node(name.replace(".", "_")))  # metadata is still there
    assert pruned.meta["sparsity"]["weight_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert all(not hasattr(m, "weight_mask") for m in _linears(graph).values())  # caller's graph untouched


def test_pruning_again_reaches_the_new_total_and_keeps_the_parameter():
    graph = graphprune.trace(make_model())
    once, _ = graphprune.run_pass(graph, "demo_magnitude_prune", {"sparsity": 0.3})
    module = once.module.get_submodule("bert.encoder.layer.0.output.dense")
    original = module.weight_orig
    graphprune.run_pass(once, "demo_magnitude_prune", {"sparsity": 0.6}, inplace=True)
    assert module.weight_orig is original
    assert float((module.weight == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)


def test_commit_then_save_and_reload(tmp_path):
    model = make_model()
    pruned, _ = graphprune.run_pass(graphprune.trace(model), "demo_magnitude_prune", {"sparsity": 0.5})
    with pytest.raises(graphprune.CheckpointError, match="commit_masks"):
        pruned.save(tmp_path / "p")
    committed, info = graphprune.run_pass(pruned, "commit_masks")
    assert info["modules"] == 12
    committed.save(tmp_path / "p")
    loaded = graphprune.load(tmp_path / "p")
    inputs = padded_inputs(model, 2, 9)
    with torch.no_grad():
        assert max_diff(loaded.module(**inputs), pruned.module(**inputs)) == 0.0
    total, nonzero = graphprune.count_parameters(loaded)
    dense_total, dense_nonzero = graphprune.count_parameters(graphprune.trace(model))
    assert total == dense_total == sum(p.numel() for p in model.parameters())
    removed = sum(round(0.5 * m.weight.numel()) for m in _linears(committed).values())
    assert dense_nonzero - nonzero == removed


def test_albert_shared_module_is_pruned_once():
    graph = graphprune.trace(make_model("AlbertForSequenceClassification"))
    pruned, info = graphprune.run_pass(graph, "demo_magnitude_prune", {"sparsity": 0.5})
    assert info["modules"] == 6  # q, k, v, out, ffn, ffn_output of the one shared layer


def test_bad_config():
    graph = graphprune.trace(make_model())
    with pytest.raises(ValueError, match="'demo_magnitude_prune'.*'sparsity' = 1.0"):
        graphprune.run_pass(graph, "demo_magnitude_prune", {"sparsity": 1.0})
    with pytest.raises(ValueError, match="'roles'.*non-empty list"):
        graphprune.run_pass(graph, "demo_magnitude_prune", {"roles": ["embedding"]})
