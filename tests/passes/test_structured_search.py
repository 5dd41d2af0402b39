"""structured_search (kwon, kprune): budget, search, rearrangement and repair against formulas, brute force and
least squares solved here."""

import copy
import functools

import pytest
import torch
import transformers as tf

import graphprune
import graphprune.passes.structured.structured_search as search_module
from graphprune.passes.structured.costs import head_flops, neuron_flops
from graphprune.passes.structured.search_methods import Budget, rearrange, search_counts
from tests.models import max_diff, padded_inputs, trace_once

CONFIG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
FAST = {"progress": False, "num_samples": 64, "score_samples": 32, "reconstruct_samples": 64, "seq_len": 16}
LAYERS, HIDDEN, HEADS, HEAD_SIZE, WIDTH, CLASSES, SEQ = 2, 32, 4, 8, 64, 2, 16
# Written out here, not found by the code under test.
LAYER = "bert.encoder.layer.{}."
QUERY, ATTN_OUT, UP, DOWN = "attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"


def head_cost(s=SEQ, d=HIDDEN, dh=HEAD_SIZE):
    # 2 FLOPs per multiply-accumulate: q, k, v rows and output columns (4 s d dh MACs), QK^T and AV (2 s^2 dh MACs)
    return 2 * (4 * s * d * dh + 2 * s * s * dh)


def neuron_cost(s=SEQ, d=HIDDEN):
    return 2 * (2 * s * d)  # an up row and a down column


def model_flops(heads, widths, s=SEQ, d=HIDDEN):
    """At batch 1: the layers' units, plus the pooler and classifier on the first token (embeddings are lookups)."""
    return sum(h * head_cost(s) + n * neuron_cost(s) for h, n in zip(heads, widths)) + 2 * d * d + 2 * d * CLASSES


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**CONFIG)).eval()
    graph = trace_once(model)
    data = [{**padded_inputs(model, 16, 12, seed=i), "labels": torch.randint(0, 2, (16,))} for i in range(4)]
    return model, graph, data


@pytest.fixture(scope="module")
def searched(setup):
    """One search per method and budget, shared by the tests that check it from different sides."""
    _, graph, data = setup

    @functools.cache
    def run(method, keep):
        return graphprune.run_pass(graph, "structured_search", {"method": method, "flops": keep, **FAST}, data=data)

    return run


def weight_or_empty(graph, path, shape):
    """An emptied block's q/k/v and up projections are dropped from the module: read them as zero rows."""
    module = dict(graph.module.named_modules()).get(path)
    return module.weight if module is not None else torch.zeros(0, shape)


def kept_units(model, pruned):
    """Per layer, the heads and neurons the graph kept, found by matching its query and up rows to the dense ones
    (the search leaves those rows as they were and only rewrites output projections)."""
    heads, neurons = [], []
    for i in range(LAYERS):
        q, dq = weight_or_empty(pruned, LAYER.format(i) + QUERY, HIDDEN), model.get_submodule(LAYER.format(i) + QUERY).weight
        blocks = [dq[h * HEAD_SIZE : (h + 1) * HEAD_SIZE] for h in range(HEADS)]
        found = [next((h for h in range(HEADS) if torch.equal(q[k * HEAD_SIZE : (k + 1) * HEAD_SIZE], blocks[h])), None) for k in range(len(q) // HEAD_SIZE)]
        up, dup = weight_or_empty(pruned, LAYER.format(i) + UP, HIDDEN), model.get_submodule(LAYER.format(i) + UP).weight
        rows = [next((j for j in range(WIDTH) if torch.equal(r, dup[j])), None) for r in up]
        assert None not in found and None not in rows, f"layer {i}: query or up rows that are no dense unit's"
        assert found == sorted(set(found)) and rows == sorted(set(rows))  # kept in order, none twice
        heads.append(found)
        neurons.append(rows)
    return heads, neurons


def columns(name, units):
    size = HEAD_SIZE if name == ATTN_OUT else 1
    return [u * size + j for u in units for j in range(size)]


@torch.no_grad()
def inputs_of(model, path, data):
    """The module's inputs over the real (unpadded) calibration tokens, in float64."""
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        for batch in data:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    return torch.cat([x[batch["attention_mask"].bool()] for x, batch in zip(seen, data)]).double()


def ridge_lstsq(design, target, dampening, towards):
    """``argmin ||A x - y||^2 + lam ||x - towards||^2``, lam = dampening * mean(diag(A^T A)), as stacked rows for lstsq."""
    lam = dampening * float((design * design).sum(0).mean())
    prior = torch.full((design.shape[1], target.shape[1]), lam**0.5 * towards, dtype=design.dtype)
    eye = lam**0.5 * torch.eye(design.shape[1], dtype=design.dtype)
    return torch.linalg.lstsq(torch.cat([design, eye]), torch.cat([target, prior]), driver="gelsd").solution


@torch.no_grad()
def repaired_by_hand(model, data, heads, neurons, method, dampening=0.01):
    """The eager model with the removed units' output columns zeroed and, bottom-up, each output projection
    re-fitted against the dense model's on the inputs of the model repaired so far: per-unit scales of the kept
    columns (kwon, ridge towards 1) or the whole weight and bias (kprune, ridge towards 0)."""
    ref = copy.deepcopy(model)
    for i in range(LAYERS):
        for name, kept in ((ATTN_OUT, heads[i]), (DOWN, neurons[i])):
            path = LAYER.format(i) + name
            x, x_dense = inputs_of(ref, path, data), inputs_of(model, path, data)
            dense, linear = model.get_submodule(path), ref.get_submodule(path)
            w = dense.weight.double()
            target = x_dense @ w.T  # the bias is the dense one on both sides
            new, bias = torch.zeros_like(w), dense.bias.double()
            if method == "kwon" and kept:
                groups = [columns(name, [u]) for u in kept]
                design = torch.stack([(x[:, c] @ w[:, c].T).flatten() for c in groups], 1)
                scales = ridge_lstsq(design, target.flatten()[:, None], dampening, towards=1.0)
                for c, m in zip(groups, scales[:, 0]):
                    new[:, c] = w[:, c] * m
            elif method == "kprune":
                c = columns(name, kept)
                design = torch.cat([x[:, c], torch.ones(len(x), 1, dtype=torch.float64)], 1)
                solved = ridge_lstsq(design, target + bias, dampening, towards=0.0)
                new[:, c], bias = solved[:-1].T, solved[-1]
            linear.weight.copy_(new)
            linear.bias.copy_(bias)
    return ref


def removed_explicitly(graph, heads, neurons):
    """The dense graph with every unit not kept removed by remove_heads and remove_ffn_neurons: no repair."""
    gone_heads = {i: [h for h in range(HEADS) if h not in heads[i]] for i in range(LAYERS)}
    gone_neurons = {i: [j for j in range(WIDTH) if j not in neurons[i]] for i in range(LAYERS)}
    graph, _ = graphprune.run_pass(graph, "remove_heads", {"heads": gone_heads, "min_heads": 0})
    graph, _ = graphprune.run_pass(graph, "remove_ffn_neurons", {"neurons": gone_neurons, "min_neurons": 0})
    return graph


def test_unit_costs_add_up_to_the_metadata_flops(setup):
    _, graph, _ = setup
    assert head_flops(HIDDEN, HEAD_SIZE, SEQ) == head_cost() and neuron_flops(HIDDEN, SEQ) == neuron_cost()
    graph, _ = graphprune.run_pass(graph, "add_common_metadata", {"seq_len": SEQ})
    for row in graph.meta["common"]["layers"]:
        assert row["flops"] == row["heads"] * head_cost() + row["ffn_width"] * neuron_cost()
    assert graph.meta["common"]["totals"]["flops"] == model_flops([HEADS] * LAYERS, [WIDTH] * LAYERS)


@pytest.mark.parametrize("method", ["kwon", "kprune"])
@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_search_meets_the_flops_budget_by_the_unit_formula(setup, searched, method, keep):
    model, graph, _ = setup
    pruned, info = searched(method, keep)
    heads, neurons = kept_units(model, pruned)
    counts, widths = [len(h) for h in heads], [len(n) for n in neurons]
    assert info["heads_per_layer"] == counts and info["ffn_width_per_layer"] == widths
    assert [r["heads"] for r in pruned.meta["common"]["layers"]] == counts
    assert [r["ffn_width"] for r in pruned.meta["common"]["layers"]] == widths
    dense = model_flops([HEADS] * LAYERS, [WIDTH] * LAYERS)
    achieved = model_flops(counts, widths) / dense
    assert achieved == pytest.approx(info["flops_ratio"])
    assert keep - 0.05 <= achieved <= keep
    if method == "kwon":  # one global search: the head count chosen, neurons fill the rest of the budget
        assert sum(widths) == LAYERS * WIDTH or model_flops(counts, widths) + neuron_cost() > keep * dense


@pytest.mark.parametrize("method", ["kwon", "kprune"])
def test_repaired_projections_equal_least_squares_solved_here(setup, searched, method):
    model, _, data = setup
    pruned, _ = searched(method, 0.4)
    heads, neurons = kept_units(model, pruned)
    ref = repaired_by_hand(model, data, heads, neurons, method)
    for i in range(LAYERS):
        for name, kept in ((ATTN_OUT, heads[i]), (DOWN, neurons[i])):
            path = LAYER.format(i) + name
            got, want = pruned.module.get_submodule(path), ref.get_submodule(path)
            torch.testing.assert_close(got.weight, want.weight[:, columns(name, kept)], atol=1e-6, rtol=1e-4, msg=lambda m: f"{path}: {m}")
            torch.testing.assert_close(got.bias, want.bias, atol=1e-6, rtol=1e-4, msg=lambda m: f"{path} bias: {m}")


@pytest.mark.parametrize("method", ["kwon", "kprune"])
def test_searched_graph_is_the_explicit_removal_with_the_weights_solved_here(setup, searched, method):
    model, graph, data = setup
    pruned, _ = searched(method, 0.4)
    heads, neurons = kept_units(model, pruned)
    repaired = removed_explicitly(graph, heads, neurons)
    ref = repaired_by_hand(model, data, heads, neurons, method)
    with torch.no_grad():
        for i in range(LAYERS):
            for name, kept in ((ATTN_OUT, heads[i]), (DOWN, neurons[i])):
                path = LAYER.format(i) + name
                repaired.module.get_submodule(path).weight.copy_(ref.get_submodule(path).weight[:, columns(name, kept)])
                repaired.module.get_submodule(path).bias.copy_(ref.get_submodule(path).bias)
    for batch, length in [(3, 9), (1, 5)]:
        inputs = padded_inputs(model, batch, length)
        with torch.no_grad():
            assert max_diff(pruned.module(**inputs), repaired.module(**inputs)) <= 1e-6  # the logits are ~1e-2


@pytest.mark.parametrize("method", ["kwon", "kprune"])
def test_repair_brings_the_logits_closer_to_the_dense_graph(setup, searched, method):
    """Over the calibration tokens the repair fits, by a clear margin over removing the same units without it."""
    model, graph, data = setup
    pruned, _ = searched(method, 0.4)
    unrepaired = removed_explicitly(graph, *kept_units(model, pruned))
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in data]
    with torch.no_grad():
        error = {
            name: sum(float((g.module(**b).logits - graph.module(**b).logits).pow(2).sum()) for b in inputs)
            for name, g in (("repaired", pruned), ("unrepaired", unrepaired))
        }
    assert error["repaired"] < 0.85 * error["unrepaired"], error


@pytest.mark.parametrize("method", ["kwon", "kprune"])
def test_speedup_budget_is_spent_on_the_latency_table_costs(setup, monkeypatch, method):
    """The clock is replaced by fixed costs (binary fractions, exact in floating point), so the budget is known here:
    the kept units' ms plus what does not shrink must fit in the dense ms over the speed-up."""
    model, graph, data = setup
    per_head, per_neuron, dense_ms, speedup = 1.0, 0.0625, 20.0, 1.6
    asked = {}

    def table(hidden, heads, head_size, width, *, batch, seq, device="cpu", reps=5):
        asked.update(hidden=hidden, heads=heads, head_size=head_size, width=width, batch=batch, seq=seq)
        return {"per_head_ms": per_head, "per_neuron_ms": per_neuron}

    def clock(fn, reps, device="cpu"):
        fn()  # the timed call must still run on the graph
        return dense_ms

    monkeypatch.setattr(search_module, "latency_table", table)
    monkeypatch.setattr(search_module, "median_ms", clock)
    config = {**FAST, "method": method, "speedup": speedup, "batch_size": 2}
    pruned, info = graphprune.run_pass(graph, "structured_search", config, data=data)
    assert asked == dict(hidden=HIDDEN, heads=HEADS, head_size=HEAD_SIZE, width=WIDTH, batch=2, seq=SEQ)
    heads, neurons = kept_units(model, pruned)
    h, n = sum(map(len, heads)), sum(map(len, neurons))
    fixed = dense_ms - LAYERS * (HEADS * per_head + WIDTH * per_neuron)
    assert info["budget"]["kind"] == "latency" and info["budget"]["fixed_ms"] == pytest.approx(fixed)
    assert fixed + h * per_head + n * per_neuron <= dense_ms / speedup
    if method == "kwon":  # neurons fill what the chosen heads leave
        assert n == LAYERS * WIDTH or fixed + h * per_head + (n + 1) * per_neuron > dense_ms / speedup
    assert h < LAYERS * HEADS or n < LAYERS * WIDTH  # something was removed


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
