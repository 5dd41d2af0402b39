"""structured_search (kwon, kprune): budget, search, rearrangement and repair against formulas and brute force."""

import pytest
import torch
import transformers as tf

import graphprune
from passes.structured.costs import head_flops, neuron_flops
from passes.structured.search_methods import Budget, rearrange, search_counts
from tests.models import max_diff, padded_inputs, trace_once

CONFIG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
FAST = {"progress": False, "num_samples": 64, "score_samples": 32, "reconstruct_samples": 64, "seq_len": 16}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**CONFIG)).eval()
    graph = trace_once(model)
    data = [{**padded_inputs(model, 16, 12, seed=i), "labels": torch.randint(0, 2, (16,))} for i in range(4)]
    return model, graph, data


def test_unit_costs_add_up_to_the_metadata_flops(setup):
    _, graph, _ = setup
    graph, _ = graphprune.run_pass(graph, "add_common_metadata", {"seq_len": 16})
    for row in graph.meta["common"]["layers"]:
        assert row["flops"] == row["heads"] * head_flops(32, 8, 16) + row["ffn_width"] * neuron_flops(32, 16)


@pytest.mark.parametrize("method", ["kwon", "kprune"])
@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_search_meets_the_flops_budget(setup, method, keep):
    model, graph, data = setup
    pruned, info = graphprune.run_pass(graph, "structured_search", {"method": method, "flops": keep, **FAST}, data=data)
    dense, _ = graphprune.run_pass(graph, "add_common_metadata", {"seq_len": 16})
    achieved = pruned.meta["common"]["totals"]["flops"] / dense.meta["common"]["totals"]["flops"]
    assert achieved == pytest.approx(info["flops_ratio"]) and keep - 0.05 <= achieved <= keep
    assert [r["heads"] for r in pruned.meta["common"]["layers"]] == info["heads_per_layer"]
    inputs = padded_inputs(model, 3, 9)
    with torch.no_grad():
        assert pruned.module(**inputs).logits.shape == (3, 2)


def test_kwon_with_the_whole_budget_changes_nothing(setup):
    model, graph, data = setup
    pruned, info = graphprune.run_pass(graph, "structured_search", {"method": "kwon", "flops": 1.0, **FAST}, data=data)
    assert info["heads_per_layer"] == [4, 4] and info["ffn_width_per_layer"] == [64, 64]
    inputs = padded_inputs(model, 2, 10)
    with torch.no_grad():
        assert max_diff(pruned.module(**inputs), graph.module(**inputs)) == 0.0


def test_kprune_repair_without_pruning_or_ridge_reproduces_the_dense_layers(setup):
    """Least squares against the dense outputs, on the dense inputs, gives back the dense weights."""
    model, graph, data = setup
    pruned, _ = graphprune.run_pass(graph, "structured_search", {"method": "kprune", "flops": 1.0, "dampening": 0.0, **FAST}, data=data)
    for name, module in graph.module.named_modules():
        if name.endswith("output.dense"):  # attention output projections and FFN down projections
            torch.testing.assert_close(pruned.module.get_submodule(name).weight, module.weight, atol=1e-4, rtol=1e-3)


def test_search_counts_equal_brute_force():
    torch.manual_seed(3)
    heads, neurons = torch.rand(5), torch.rand(9)
    budget = Budget(head_cost=7.0, neuron_cost=2.0, available=30.0, unit="flops", details={})
    h, n = search_counts(heads, neurons, budget)
    best = max(
        (float(torch.sort(heads, descending=True).values[:a].sum() + torch.sort(neurons, descending=True).values[:b].sum()), a, b)
        for a in range(6) for b in range(10) if a * 7 + b * 2 <= 30
    )
    assert (h, n) == best[1:]


def test_rearrangement_never_worsens_and_ends_at_a_swap_optimum():
    torch.manual_seed(0)
    g = torch.randn(50, 8, dtype=torch.float64)
    g[:, 2] += g[:, 5]  # correlated units, where the diagonal alone misjudges pairs
    fisher = g.T @ g
    start = sorted(torch.argsort(torch.diag(fisher), descending=True)[:4].tolist())

    def cost(keep):
        pruned = torch.ones(8, dtype=torch.float64)
        pruned[keep] = 0
        return float(pruned @ fisher @ pruned)

    result = rearrange(fisher, start)
    assert len(result) == 4 and cost(result) <= cost(start) + 1e-9
    others = [u for u in range(8) if u not in result]
    assert all(cost(sorted(set(result) - {k} | {p})) >= cost(result) - 1e-9 for k in result for p in others)


def test_bad_requests_are_clear(setup):
    _, graph, data = setup
    with pytest.raises(ValueError, match="either flops or speedup"):
        graphprune.run_pass(graph, "structured_search", {"flops": 0.5, "speedup": 2.0})
    with pytest.raises(ValueError, match="structured_search.*needs calibration data"):
        graphprune.run_pass(graph, "structured_search", {"flops": 0.5, "progress": False})
    with pytest.raises(ValueError, match="structured_search.*labelled"):
        graphprune.run_pass(graph, "structured_search", {"flops": 0.5, **FAST}, data=[{k: v for k, v in data[0].items() if k != "labels"}])
    masked, _ = graphprune.run_pass(graph, "prune_weight", {"sparsity": 0.5})
    with pytest.raises(ValueError, match="commit_masks"):
        graphprune.run_pass(masked, "structured_search", {"flops": 0.5, **FAST}, data=data)
