"""factorize: against the dense Linear, an independent truncated SVD, the gated graph, and the size formula."""

import json
import math

import pytest
import torch
from torch import nn

import transformers as tf

import graphprune
from graphprune.ir.gates import GATES, HardConcreteGate, gate_method, gate_modules
from graphprune.ir.metadata import common
from tests.models import TINY, make_model, max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

SIZES = [(1, 5), (3, 17)]
Q0 = "bert.encoder.layer.0.attention.self.query"
UP0 = "bert.encoder.layer.0.intermediate.dense"
V1 = "bert.encoder.layer.1.attention.self.value"


def traced(seed=0):
    model = make_model(seed=seed)
    graph, _ = graphprune.run_pipeline(trace_once(model), [("init_metadata", {}), ("add_common_metadata", {})])
    return model, graph


def assert_same_outputs(model, a, b, tol=1e-5):
    for batch, length in SIZES:
        inputs = padded_inputs(model, batch, length)
        with torch.no_grad():
            assert max_diff(a.module(**inputs), b.module(**inputs)) <= tol


def set_gates(graph, values: dict[str, torch.Tensor] | float):
    """Set each factored Linear's log_alpha (by original name), or all of them to one value."""
    gm = graph.module
    with torch.no_grad():
        for record in graph.meta[GATES]["linears"]:
            gate = gm.get_submodule(record["gate"])
            value = values if isinstance(values, float) else values.get(record["target"])
            if value is not None:
                gate.log_alpha.copy_(torch.as_tensor(value, dtype=gate.log_alpha.dtype).expand_as(gate.log_alpha))


def test_full_rank_pairs_are_the_dense_linears_and_keep_their_metadata():
    model, graph = traced()
    factored, info = graphprune.run_pass(graph, "factorize", {"target": 0.4})
    gm, dense = factored.module, graph.module
    records = factored.meta[GATES]["linears"]
    assert info["linears"] == len(records) == 12  # q, k, v, attention output, up, down in 2 layers
    for record in records:
        first, second = gm.get_submodule(record["first"]), gm.get_submodule(record["second"])
        old = dense.get_submodule(record["target"])
        assert isinstance(gm.get_submodule(record["gate"]), HardConcreteGate)
        assert first.bias is None and record["rank"] == min(old.in_features, old.out_features)
        assert (second.weight @ first.weight - old.weight).abs().max() <= 1e-5
        assert torch.equal(second.bias, old.bias)
    # gates exactly 1 (sigmoid(120) is 1.0 in float32): the gated graph is the dense one
    set_gates(factored, 100.0)
    assert_same_outputs(model, factored, graph)
    roles = {common(n)["target"]: common(n) for n in gm.graph.nodes if n.op == "call_module"}
    assert roles[Q0]["role"] == "query" and roles[UP0]["role"] == "ffn_up"  # the second half keeps the name
    assert roles[f"{Q0}_first"]["layer"] == roles[f"{Q0}_rank_gate"]["layer"] == 0
    assert [row["ffn_width"] for row in factored.meta["common"]["layers"]] == [64, 64]
    json.dumps(factored.meta)  # the record is JSON-able: checkpoints carry it
    assert "rank" not in str(graph.summary()) and factored.summary().rows
    assert gate_method(factored).describe(factored) == {"0": {"rank": "192/192"}, "1": {"rank": "192/192"}}
    assert GATES not in graph.meta and factored.edits[-1]["pass"] == "factorize"


def test_rank_r_is_the_truncated_svd():
    model, graph = traced()
    r = 3
    factored, _ = graphprune.run_pass(graph, "factorize", {"target": 0.3, "rank": r})
    set_gates(factored, 100.0)
    reference = graph.copy()
    for record in factored.meta[GATES]["linears"]:
        linear = reference.module.get_submodule(record["target"])
        u, s, vh = torch.linalg.svd(linear.weight.detach().double())
        truncated = (u[:, :r] * s[:r]) @ vh[:r]
        pair = factored.module.get_submodule(record["second"]).weight @ factored.module.get_submodule(record["first"]).weight
        assert (pair.double() - truncated).abs().max() <= 1e-5
        with torch.no_grad():
            linear.weight.copy_(truncated.float())
    assert_same_outputs(model, factored, reference)


def test_commit_equals_the_gated_graph_and_shrinks_or_merges():
    model, graph = traced()
    factored, _ = graphprune.run_pass(graph, "factorize", {"target": 0.3})
    torch.manual_seed(0)

    def open_first(n, size=32):  # the first n ranks open with soft values below 1 (folded in), the rest closed
        return torch.cat([4 + 2 * torch.rand(n), torch.full((size - n,), -100.0)])

    # q (32 -> 32) keeps 5: a 5-rank pair is cheaper; up (32 -> 64) keeps 22: (32 + 64) * 22 >= 32 * 64, merged back;
    # v keeps none: its output is its bias
    set_gates(factored, {Q0: open_first(5), UP0: open_first(22), V1: open_first(0)})
    gated = factored.copy()
    info = gate_method(factored).commit(factored)
    assert_same_outputs(model, factored, gated)
    gm = factored.module
    assert gm.get_submodule(f"{Q0}_first").weight.shape == (5, 32) and gm.get_submodule(Q0).weight.shape == (32, 5)
    assert gm.get_submodule(UP0).weight.shape == (64, 32) and not hasattr(gm.get_submodule(UP0.rsplit(".", 1)[0]), "dense_first")
    assert gm.get_submodule(V1).weight.shape == (32, 0)
    assert info["ranks"][Q0] == 5 and info["ranks"][UP0] == 22 and info["ranks"][V1] == 0
    # the Linears left at full rank are not cheaper either: merged back with UP0
    assert set(info["merged"]) == {r["target"] for r in gated.meta[GATES]["linears"]} - {Q0, V1}
    assert not gate_modules(factored) and GATES not in factored.meta
    assert not any(n.meta.get("graphprune.gate_product") for n in gm.graph.nodes)
    after = sum(
        r["d_out"] + (r["d_in"] * r["d_out"] if r["target"] in info["merged"] else (r["d_in"] + r["d_out"]) * info["ranks"][r["target"]])
        for r in gated.meta[GATES]["linears"]
    )  # weights and biases
    assert info["params_after"] == after < info["params_dense"] < info["params_before"]
    assert factored.summary().rows and factored.edits[-1]["method"] == "factorize"


def test_expected_fraction_is_the_formula_and_differentiable():
    _, graph = traced()
    factored, _ = graphprune.run_pass(graph, "factorize", {"target": 0.5, "temperature": 0.5, "names": r"layer\.1\.(intermediate|output)\.dense$"})
    records = factored.meta[GATES]["linears"]
    assert sorted(r["target"] for r in records) == ["bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"]
    torch.manual_seed(1)
    set_gates(factored, {r["target"]: 3 * torch.randn(r["rank"]) for r in records})
    expected, dense = 0.0, 0
    for r in records:
        la = factored.module.get_submodule(r["gate"]).log_alpha.detach()
        expected += (r["d_in"] + r["d_out"]) * torch.sigmoid(la - 0.5 * math.log(0.1 / 1.1)).sum().item()
        dense += r["d_in"] * r["d_out"]
    fraction = gate_method(factored).expected_fraction(factored)
    assert abs(fraction.item() - expected / dense) <= 1e-6
    fraction.backward()
    assert all(factored.module.get_submodule(r["gate"]).log_alpha.grad.abs().sum() > 0 for r in records)


def test_finetune_trains_the_rank_gates():
    _, graph = traced()
    factored, _ = graphprune.run_pass(graph, "factorize", {"target": 0.3, "init": 3.0})
    before = {r["gate"]: factored.module.get_submodule(r["gate"]).log_alpha.detach().clone() for r in factored.meta[GATES]["linears"]}
    result = graphprune.finetune(factored, sentiment_data(32), tiny_tokenizer(), max_steps=3, batch_size=8, max_length=16, progress=False)
    assert result.steps == 3
    for name, old in before.items():
        assert not torch.equal(factored.module.get_submodule(name).log_alpha.detach(), old)
    info = gate_method(factored).commit(factored)  # a trained graph commits
    assert set(info["ranks"]) == {r.removesuffix("_rank_gate") for r in before}


def test_gated_graph_saves_and_reloads(tmp_path):
    model, graph = traced()
    factored, _ = graphprune.run_pass(graph, "factorize", {"target": 0.5, "rank": 7})
    torch.manual_seed(2)
    set_gates(factored, {r["target"]: 4 * torch.randn(r["rank"]) for r in factored.meta[GATES]["linears"]})
    factored.save(tmp_path / "gated")
    loaded = graphprune.load(tmp_path / "gated")
    assert loaded.meta[GATES] == factored.meta[GATES]
    assert_same_outputs(model, loaded, factored, tol=0.0)
    gate_method(loaded).commit(loaded)
    gate_method(factored).commit(factored)
    assert_same_outputs(model, loaded, factored, tol=0.0)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"target": 0.0}, ["target", "0.0"]),
        ({"target": 1.0}, ["target", "1.0"]),
        ({"roles": ["querry"]}, ["roles", "querry"]),
        ({"rank": 0}, ["rank"]),
        ({"init": float("inf")}, ["init", "inf"]),
        ({"names": "("}, ["names", "regular expression"]),
        ({"names": "no_such_linear"}, ["no Linear matches", "no_such_linear"]),
        ({"roles": ["embedding_projection"]}, ["no Linear matches", "embedding_projection", "query"]),
    ],
)
def test_bad_configs_are_clear_errors_that_leave_the_graph_untouched(config, words):
    _, graph = traced()
    nodes, keys = [n.name for n in graph.module.graph.nodes], set(graph.module.state_dict())
    with pytest.raises(ValueError) as error:
        graphprune.run_pass(graph, "factorize", config, inplace=True)
    assert "factorize" in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
    assert [n.name for n in graph.module.graph.nodes] == nodes and set(graph.module.state_dict()) == keys
    assert GATES not in graph.meta and not graph.edits


def test_a_linear_no_rank_makes_cheaper_is_refused_by_name():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**TINY, num_labels=1)).eval()  # a 32 -> 1 regression head
    graph = trace_once(model)
    with pytest.raises(ValueError, match=r"classifier \(32 -> 1\) cannot be factorized: even rank 1 needs 33 weights"):
        graphprune.run_pass(graph, "factorize", {"names": "classifier|query"})


def test_uncommitted_gates_must_be_committed_first():
    _, graph = traced()
    factored, _ = graphprune.run_pass(graph, "factorize", {"names": "query"})
    nodes = [n.name for n in factored.module.graph.nodes]
    with pytest.raises(ValueError, match="commit_gates"):
        graphprune.run_pass(factored, "factorize", {"names": "key"}, inplace=True)
    assert [n.name for n in factored.module.graph.nodes] == nodes
    set_gates(factored, {Q0: torch.cat([torch.full((5,), 10.0), torch.full((27,), -100.0)])})
    gate_method(factored).commit(factored)
    # a committed pair's second half factorizes again, beside the first half of the first factorization
    again, _ = graphprune.run_pass(factored, "factorize", {"names": r"layer\.0\..*query$"})
    (record,) = again.meta[GATES]["linears"]
    assert record["first"] == f"{Q0}_first_2" and (record["d_in"], record["d_out"], record["rank"]) == (5, 32, 5)
    assert isinstance(again.module.get_submodule(f"{Q0}_first"), nn.Linear)
