"""l0_structured and commit_gates: hard-concrete gates against their formulas, the gated graph against the
dense one and the committed one against the gated one, the size formula, save/reload, summary and errors."""

import math

import pytest
import torch
import transformers as tf
from torch import nn

import graphprune
from graphprune.training.calibration import CalibrationData
from graphprune.ir.gates import GATES, HardConcreteGate, gate_method, gate_modules
from tests.models import TINY, make_biased, make_model, max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

T = 2 / 3  # the default temperature
CLOSED, OPEN, SOFT, HALF = -10.0, 10.0, 3.0, 1.0  # SOFT and HALF stay open at evaluation with soft values < 1
SIZES = [(3, 11), (1, 5)]  # neither is the traced size
HIDDEN, HEADS, HEAD_SIZE, WIDTH = 32, 4, 8, 64

# The modules each family's structure lives in, written out here (not found by the code under test).
BERT_LAYER = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value", out="attention.output.dense",
                  up="intermediate.dense", down="output.dense")
FAMILIES = {
    "BertForSequenceClassification": ("bert.encoder.layer.{}.", BERT_LAYER, ["bert.pooler.dense"]),
    "DistilBertForSequenceClassification": (
        "distilbert.transformer.layer.{}.",
        dict(q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", out="attention.out_lin", up="ffn.lin1", down="ffn.lin2"),
        ["pre_classifier"],
    ),
    "RobertaForSequenceClassification": ("roberta.encoder.layer.{}.", BERT_LAYER, ["classifier.dense"]),
    "BertModel": ("encoder.layer.{}.", BERT_LAYER, ["pooler.dense"]),
}


def gated(name="BertForSequenceClassification", **config):
    model = make_biased(name)
    dense = trace_once(model)
    graph, info = graphprune.run_pass(dense, "l0_structured", config)
    return model, dense, graph, info


def outputs(graph, inputs):
    with torch.no_grad():
        return graph.module(**inputs)


def pattern(size: int, phase: int) -> torch.Tensor:
    """Closed, soft and open units mixed (a quarter closed); ``phase`` shifts the pattern.

    Few HALF units: their open probability (0.93) is far enough below 1 that many would round E[L0] down."""
    la = torch.full((size,), OPEN)
    for i in range(size):
        kind = (i + phase) % 4
        la[i] = CLOSED if kind == 0 else SOFT if kind == 1 else HALF if kind == 2 and i < 8 else OPEN
    return la


def our_open_probability(la, temperature=T):
    return torch.sigmoid(la - temperature * math.log(0.1 / 1.1))


def our_deterministic(la, temperature=T):
    """The evaluation gate as the docstring states it, written here: round(E[L0]) largest keep sigmoid(0.8 la / T)."""
    keep = round(float(our_open_probability(la, temperature).sum()))
    soft = torch.sigmoid(0.8 * la / temperature)
    z = torch.zeros_like(la)
    index = soft.argsort(descending=True)[:keep]
    z[index] = soft[index]
    return z


def set_mixed(graph, *, closed_attention=1, closed_ffn=0):
    """Mixed log_alpha on every gate; one layer's attention and one layer's FFN shut whole. Returns our gate values."""
    gm, record = graph.module, graph.meta[GATES]
    values = {}
    with torch.no_grad():
        for layer in record["layers"]:
            i = layer["index"]
            for unit, target in layer["gates"].items():
                gate = gm.get_submodule(target)
                if unit in ("heads", "neurons"):
                    la = pattern(gate.size, i)
                elif unit == "attention":
                    la = torch.tensor([CLOSED if i == closed_attention else SOFT])
                else:
                    la = torch.tensor([CLOSED if i == closed_ffn else HALF])
                gate.log_alpha.copy_(la)
                values[(i, unit)] = our_deterministic(la)
        if record["hidden"]:
            la = pattern(record["hidden"]["size"], 3)
            gm.get_submodule(record["hidden"]["gate"]).log_alpha.copy_(la)
            values["hidden"] = our_deterministic(la)
    for key, z in values.items():  # the test's own values: what is closed is exactly the -10 units
        la = gm.get_submodule(record["hidden"]["gate"] if key == "hidden" else record["layers"][key[0]]["gates"][key[1]]).log_alpha
        assert torch.equal(z == 0, la.detach() == CLOSED), key
    return values


def expected_kept(record, values):
    """Per layer, the heads and neurons that stay, and the hidden dimensions that stay."""
    layers = []
    for layer in record["layers"]:
        i = layer["index"]
        heads = list(range(layer["heads"]))
        if (i, "heads") in values:
            heads = [h for h in heads if values[(i, "heads")][h] > 0]
        if (i, "attention") in values and values[(i, "attention")].item() == 0:
            heads = []
        neurons = list(range(layer["ffn_width"]))
        if (i, "neurons") in values:
            neurons = [n for n in neurons if values[(i, "neurons")][n] > 0]
        if (i, "ffn") in values and values[(i, "ffn")].item() == 0:
            neurons = []
        layers.append((heads, neurons))
    hidden = (values["hidden"] > 0).nonzero().flatten().tolist() if "hidden" in values else list(range(HIDDEN))
    return layers, hidden


def assert_shapes(name, graph, layers, hidden):
    """Every Linear, Embedding and LayerNorm has the shape the kept units give it."""
    prefix, names, readers = FAMILIES[name]
    modules = dict(graph.module.named_modules())
    d = len(hidden)
    for i, (heads, neurons) in enumerate(layers):
        p = prefix.format(i)
        for proj in ("q", "k", "v"):
            m = modules.get(p + names[proj])
            if heads:
                assert (m.in_features, m.out_features) == (d, len(heads) * HEAD_SIZE), (p + names[proj], m)
            else:  # an emptied attention computes no query, key or value: gone, or empty
                assert m is None or m.out_features == 0, m
        out = modules[p + names["out"]]
        assert (out.in_features, out.out_features) == (len(heads) * HEAD_SIZE, d)
        up, down = modules.get(p + names["up"]), modules[p + names["down"]]
        assert (down.in_features, down.out_features) == (len(neurons), d)
        if neurons:
            assert (up.in_features, up.out_features) == (d, len(neurons))
        else:
            assert up is None or up.out_features == 0, up
    for reader in readers:
        assert modules[reader].in_features == d, reader
    tables = [m for m in modules.values() if isinstance(m, nn.Embedding)]
    norms = [m for m in modules.values() if isinstance(m, nn.LayerNorm)]
    assert len(tables) >= 2 and all(t.embedding_dim == d for t in tables)
    assert len(norms) == 1 + 2 * len(layers) and all(tuple(n.normalized_shape) == (d,) for n in norms)
    assert all(type(n) is nn.LayerNorm for n in norms)  # plain again
    assert not any(isinstance(m, HardConcreteGate) for m in modules.values())


# --- HardConcreteGate against its formulas -------------------------------------------------------------------


def test_open_probability_and_expected_l0_are_the_formula():
    gate = HardConcreteGate(5, temperature=0.5)
    la = torch.tensor([-3.0, -0.5, 0.0, 1.25, 4.0])
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    expected = [1 / (1 + math.exp(-(a - 0.5 * math.log(0.1 / 1.1)))) for a in la.tolist()]
    assert gate.open_probability().tolist() == pytest.approx(expected, abs=1e-6)
    assert float(gate.expected_l0()) == pytest.approx(sum(expected), abs=1e-5)
    gate.expected_l0().backward()  # differentiable: d sigmoid = p (1 - p)
    assert gate.log_alpha.grad.tolist() == pytest.approx([p * (1 - p) for p in expected], abs=1e-6)


def test_samples_are_in_the_unit_interval_with_exact_ends_at_the_stated_rates():
    n = 20000
    values = [-2.0, 0.0, 1.0, 3.0]
    gate = HardConcreteGate(n * len(values))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(values).repeat_interleave(n))
    torch.manual_seed(0)
    z = gate.sample().view(len(values), n)
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()  # a unit is exactly shut or exactly open with positive probability
    assert ((z > 0) & (z < 1)).any()
    p_open = our_open_probability(torch.tensor(values))
    # z = 1 exactly when the stretched sample reaches 1: s >= 11/12, P = sigmoid(la - T log 11)
    p_one = torch.sigmoid(torch.tensor(values) - T * math.log(11.0))
    # 20000 draws: a standard error below 0.0036, so 0.02 is over 5 of them
    assert (z > 0).float().mean(1).tolist() == pytest.approx(p_open.tolist(), abs=0.02)
    assert (z == 1).float().mean(1).tolist() == pytest.approx(p_one.tolist(), abs=0.02)


def test_deterministic_keeps_the_rounded_expected_count_of_largest_gates_at_their_soft_value():
    la = torch.tensor([4.0, -6.0, -0.8, 2.0, -3.0, -1.2, 5.0, 0.2])
    gate = HardConcreteGate(8)
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    p = our_open_probability(la)
    keep = round(float(p.sum()))
    assert keep == 5 and int((p > 0.5).sum()) == 6  # the count is E[L0] rounded, not the units more likely open than not
    z = gate.deterministic()
    order = sorted(range(8), key=lambda i: -la[i].item())
    expected = torch.zeros(8)
    for i in order[:keep]:
        expected[i] = 1 / (1 + math.exp(-0.8 * la[i].item() / T))
    assert torch.allclose(z, expected, atol=1e-6, rtol=0)
    assert (z > 0).sum() == keep and z.max() < 1


def test_forward_is_the_deterministic_gate_in_eval_and_a_sample_in_training():
    gate = HardConcreteGate(6, shape=(1, 6, 1, 1))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0, -3.0]))
    gate.eval()
    assert gate().shape == (1, 6, 1, 1)
    assert torch.equal(gate().flatten(), gate.deterministic())
    assert torch.equal(gate(), gate())
    gate.train()
    torch.manual_seed(3)
    first = gate()
    torch.manual_seed(3)
    assert torch.equal(first.flatten(), gate.sample())
    assert not torch.equal(gate(), gate())  # a fresh draw each call
    with pytest.raises(ValueError, match="shape"):
        HardConcreteGate(6, shape=(2, 2))


# --- the gated graph -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_open_gates_compute_the_dense_graph(name):
    model, dense, graph, info = gated(name, init=10.0)  # open: evaluation value sigmoid(12) = 1 in float32
    record = graph.meta[GATES]
    assert info["gates"] == len(gate_modules(graph)) == 1 + 4 * 2
    assert info["units"] == ["heads", "attention", "neurons", "ffn", "hidden"]
    assert info["target_fraction"] == pytest.approx(0.5) and record["target"] == pytest.approx(0.5)
    assert [(l["heads"], l["head_size"], l["ffn_width"]) for l in record["layers"]] == [(HEADS, HEAD_SIZE, WIDTH)] * 2
    assert record["hidden"]["size"] == HIDDEN and len(record["hidden"]["norms"]) == 5
    for batch, length in SIZES:
        inputs = padded_inputs(model, batch, length)
        assert max_diff(outputs(graph, inputs), outputs(dense, inputs)) <= 1e-5
        with torch.no_grad():
            assert max_diff(outputs(graph, inputs), model(**inputs)) <= 1e-5


def test_gates_follow_the_graph_mode_and_an_evaluating_gated_graph_is_deterministic():
    model, dense, graph, _ = gated(init=0.5)  # gates far from saturated: a sample would differ from the eval gate
    assert not graph.module.training
    assert all(not g.training for g in gate_modules(graph).values())
    inputs = padded_inputs(model, 3, 11)
    first = outputs(graph, inputs)
    torch.manual_seed(7)
    assert max_diff(outputs(graph, inputs), first) == 0.0
    graph.module.train()
    assert all(g.training for g in gate_modules(graph).values())


def test_the_caller_graph_is_unchanged_by_gating_and_committing():
    model, dense, graph, _ = gated()
    assert GATES not in dense.meta and not gate_modules(dense)
    set_mixed(graph)
    nodes, state = [n.name for n in graph.module.graph.nodes], {k: v.clone() for k, v in graph.module.state_dict().items()}
    committed, _ = graphprune.run_pass(graph, "commit_gates")
    assert GATES in graph.meta and gate_modules(graph) and GATES not in committed.meta
    assert [n.name for n in graph.module.graph.nodes] == nodes
    after = graph.module.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())


# --- commit: the committed graph computes what the gated one does at evaluation -------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_commit_equals_the_gated_graph_and_has_the_smaller_shapes(name):
    model, dense, graph, _ = gated(name)
    values = set_mixed(graph)
    layers, hidden = expected_kept(graph.meta[GATES], values)
    assert layers[1][0] == [] and layers[0][1] == []  # layer 1's attention and layer 0's FFN shut whole
    refs = {size: outputs(graph, padded_inputs(model, *size)) for size in SIZES}
    committed, info = graphprune.run_pass(graph, "commit_gates")
    assert info["method"] == "l0_structured"
    assert info["heads_removed"] == {i: HEADS - len(h) for i, (h, _) in enumerate(layers) if len(h) < HEADS}
    assert info["neurons_removed"] == {i: WIDTH - len(n) for i, (_, n) in enumerate(layers) if len(n) < WIDTH}
    assert info["hidden_removed"] == HIDDEN - len(hidden) == 8
    assert_shapes(name, committed, layers, hidden)
    assert GATES not in committed.meta
    assert not any(n.meta.get("graphprune.gate_product") for n in committed.module.graph.nodes)
    for size, ref in refs.items():
        out = outputs(committed, padded_inputs(model, *size))
        if name == "BertModel":  # the headless encoder's states are narrower: compare the kept dimensions
            closed = [d for d in range(HIDDEN) if d not in hidden]
            assert out["last_hidden_state"].shape[-1] == len(hidden)
            assert ref["last_hidden_state"][..., closed].abs().max() == 0
            assert (out["last_hidden_state"] - ref["last_hidden_state"][..., hidden]).abs().max() <= 1e-5
            assert (out["pooler_output"] - ref["pooler_output"]).abs().max() <= 1e-5
        else:
            assert max_diff(out, ref) <= 1e-5
    dense_params = sum(p.numel() for p in dense.module.parameters())
    assert sum(p.numel() for p in committed.module.parameters()) < dense_params


@pytest.mark.parametrize(
    "units",
    [["heads"], ["neurons", "hidden"], ["attention", "ffn"], ["heads", "ffn", "hidden"]],
    ids=lambda u: "+".join(u),
)
def test_commit_of_a_subset_of_units(units):
    name = "BertForSequenceClassification"
    model, dense, graph, info = gated(name, units=units)
    record = graph.meta[GATES]
    assert info["units"] == units
    assert all(set(layer["gates"]) == set(units) - {"hidden"} for layer in record["layers"])
    assert (record["hidden"] is not None) == ("hidden" in units)
    values = set_mixed(graph)
    layers, hidden = expected_kept(record, values)
    refs = {size: outputs(graph, padded_inputs(model, *size)) for size in SIZES}
    committed, info = graphprune.run_pass(graph, "commit_gates")
    assert_shapes(name, committed, layers, hidden)
    if units == ["heads"]:  # Voita et al.: only heads go, the FFNs and the hidden size stay
        assert info["neurons_removed"] == {} and info["hidden_removed"] == 0
        assert [len(h) for h, _ in layers] == [3, 3]
    for size, ref in refs.items():
        assert max_diff(outputs(committed, padded_inputs(model, *size)), ref) <= 1e-5


def test_all_open_gates_commit_to_the_dense_shapes():
    model, dense, graph, _ = gated(init=10.0)
    committed, info = graphprune.run_pass(graph, "commit_gates")
    assert info["heads_removed"] == {} and info["neurons_removed"] == {} and info["hidden_removed"] == 0
    assert_shapes("BertForSequenceClassification", committed, [(list(range(HEADS)), list(range(WIDTH)))] * 2, list(range(HIDDEN)))
    inputs = padded_inputs(model, 3, 11)
    assert max_diff(outputs(committed, inputs), outputs(dense, inputs)) <= 1e-5


# --- expected size ---------------------------------------------------------------------------------------------


def our_fraction(graph, metric, seq, hidden_size=HIDDEN):
    """CoFi's formulas from the gates' open probabilities, written here: per head 8 s d dh + 4 s^2 dh, per neuron
    4 s d (FLOPs); per head 4 d dh, per neuron 2 d (params); d the hidden size times its expected open fraction."""
    gm, record = graph.module, graph.meta[GATES]

    def count(layer, unit, full):
        target = layer["gates"].get(unit)
        return our_open_probability(gm.get_submodule(target).log_alpha).sum() if target else torch.tensor(float(full))

    rho = our_open_probability(gm.get_submodule(record["hidden"]["gate"]).log_alpha).sum() / hidden_size if record["hidden"] else 1.0
    d = hidden_size * rho
    expected, dense = 0.0, 0.0
    for layer in record["layers"]:
        dh, heads, width = layer["head_size"], layer["heads"], layer["ffn_width"]
        h, a, n, f = count(layer, "heads", heads), count(layer, "attention", 1), count(layer, "neurons", width), count(layer, "ffn", 1)
        if metric == "flops":
            expected = expected + a * h * (8 * seq * d * dh + 4 * seq**2 * dh) + f * n * 4 * seq * d
            dense += heads * (8 * seq * hidden_size * dh + 4 * seq**2 * dh) + width * 4 * seq * hidden_size
        else:
            expected = expected + a * h * 4 * d * dh + f * n * 2 * d
            dense += heads * 4 * hidden_size * dh + width * 2 * hidden_size
    return expected / dense


@pytest.mark.parametrize("metric, seq", [("flops", 128), ("flops", 16), ("params", 128)])
@pytest.mark.parametrize("units", [None, ["heads", "neurons"], ["attention", "hidden"]], ids=["all", "heads+neurons", "attention+hidden"])
def test_expected_fraction_is_the_size_formula_and_its_gradient_reaches_every_gate(metric, seq, units):
    config = {"metric": metric, "seq_len": seq, **({"units": units} if units else {})}
    _, _, graph, info = gated(**config)
    assert info["expected_fraction"] == pytest.approx(float(our_fraction(graph, metric, seq)), abs=1e-6)
    torch.manual_seed(0)
    gates = gate_modules(graph)
    with torch.no_grad():
        for gate in gates.values():
            gate.log_alpha.copy_(3 * torch.randn(gate.size))
    fraction = gate_method(graph).expected_fraction(graph)
    ours = our_fraction(graph, metric, seq)
    assert float(fraction) == pytest.approx(float(ours), rel=1e-5)
    assert 0 < float(fraction) < 1
    params = [g.log_alpha for g in gates.values()]
    grads = torch.autograd.grad(fraction, params)
    theirs = torch.autograd.grad(ours, params)
    for name, g, t in zip(gates, grads, theirs):
        assert (g != 0).all(), name  # every log_alpha gets a gradient
        assert torch.allclose(g, t, rtol=1e-4, atol=1e-9), name


def test_expected_fraction_uses_the_layers_width_under_a_factorised_embedding():
    model = make_model("ElectraForSequenceClassification")  # embeddings 16 wide, projected to the layers' 32
    graph, _ = graphprune.run_pass(trace_once(model), "l0_structured", {"units": ["heads", "neurons"], "seq_len": 16})
    torch.manual_seed(0)
    with torch.no_grad():
        for gate in gate_modules(graph).values():
            gate.log_alpha.copy_(3 * torch.randn(gate.size))
    assert float(gate_method(graph).expected_fraction(graph)) == pytest.approx(float(our_fraction(graph, "flops", 16, 32)), rel=1e-5)
    with pytest.raises(ValueError, match="hidden"):  # the hidden gates cannot apply there: a clear error, not a shape clash
        graphprune.run_pass(trace_once(model), "l0_structured", {})


# --- save, reload, summary --------------------------------------------------------------------------------------


def test_gated_and_committed_graphs_save_and_reload(tmp_path):
    model, _, graph, _ = gated()
    set_mixed(graph)
    graph.save(tmp_path / "gated")
    loaded = graphprune.load(tmp_path / "gated")
    assert loaded.meta[GATES] == graph.meta[GATES]
    assert set(gate_modules(loaded)) == set(gate_modules(graph))
    for size in SIZES:
        inputs = padded_inputs(model, *size)
        assert max_diff(outputs(loaded, inputs), outputs(graph, inputs)) == 0.0
    committed, _ = graphprune.run_pass(graph, "commit_gates")
    from_loaded, _ = graphprune.run_pass(loaded, "commit_gates")
    committed.save(tmp_path / "committed")
    again = graphprune.load(tmp_path / "committed")
    assert GATES not in again.meta
    for size in SIZES:
        inputs = padded_inputs(model, *size)
        ref = outputs(committed, inputs)
        assert max_diff(outputs(again, inputs), ref) == 0.0
        assert max_diff(outputs(from_loaded, inputs), ref) == 0.0


def test_summary_shows_the_gates_while_gated_and_not_after_commit():
    _, dense, graph, _ = gated()
    set_mixed(graph)
    fraction = float(gate_method(graph).expected_fraction(graph))
    summary = graph.summary()
    assert "gates" in summary.columns
    assert f"l0_structured gates: expected {fraction:.3f}" in summary.title and "target 0.500" in summary.title
    rows = {row["layer"]: row.get("gates") for row in summary.rows}
    # layer 0: head 0 closed (pattern phase 0), FFN shut; layer 1: attention shut, neurons of phase 1 closed
    assert rows["0"] == "heads 3/4, ffn 0/64"
    assert rows["1"] == f"heads 0/4, ffn {WIDTH - WIDTH // 4}/64"
    assert rows["embeddings"] == "hidden 24/32"
    assert "gates" in str(summary)
    assert GATES in graph.meta and gate_modules(graph)  # summary() changes nothing
    committed, _ = graphprune.run_pass(graph, "commit_gates")
    after = committed.summary()
    assert "gates" not in after.columns and "gates" not in after.title
    assert [row["heads"] for row in after.rows if row["layer"] in ("0", "1")] == [3, 0]


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, words",
    [
        ({"target": 0.0}, ["target", "0.0"]),
        ({"target": 1.0}, ["target", "1.0"]),
        ({"target": -0.2}, ["target"]),
        ({"units": []}, ["units", "[]"]),
        ({"units": ["head"]}, ["units", "head"]),
        ({"units": ["heads", "heads"]}, ["units", "distinct"]),
        ({"metric": "latency"}, ["metric", "latency"]),
        ({"seq_len": 0}, ["seq_len"]),
        ({"temperature": 0.0}, ["temperature"]),
        ({"temperature": float("nan")}, ["temperature", "nan"]),
        ({"init": 3.4e38}, ["init", "-50.0 <= init <= 50.0"]),
        ({"init_from": "kprune"}, ["init_from", "kprune", "fisher"]),
        ({"init_from": "fisher"}, ["init_from", "needs calibration data"]),
        ({"init_spread": -1.0}, ["init_spread", "0 <= init_spread"]),
        ({"init_spread": 60.0}, ["init_spread", "53.0"]),
    ],
)
def test_bad_configs_are_clear_errors_that_leave_the_graph_untouched(config, words):
    dense = trace_once(make_model())
    nodes, keys = [n.name for n in dense.module.graph.nodes], set(dense.module.state_dict())
    with pytest.raises(ValueError) as error:
        graphprune.run_pass(dense, "l0_structured", config, inplace=True)
    message = str(error.value)
    assert "l0_structured" in message and all(w in message for w in words), message
    assert [n.name for n in dense.module.graph.nodes] == nodes and set(dense.module.state_dict()) == keys
    assert GATES not in dense.meta


def our_ranked_starts(scores: list[torch.Tensor], init=3.0, spread=4.0) -> list[torch.Tensor]:
    """init - spread * rank / (n - 1) over every layer's units, rank 0 the highest score over its layer's L2 norm
    (written here, not imported)."""
    flat = torch.cat([s / s.norm() for s in scores])
    order = sorted(range(len(flat)), key=lambda i: -float(flat[i]))
    start = torch.empty(len(flat))
    for rank, i in enumerate(order):
        start[i] = init - spread * rank / (len(flat) - 1)
    return list(torch.split(start, [len(s) for s in scores]))


def test_init_from_l1_starts_gates_by_the_units_weight_norms_ranked_over_all_layers():
    model = make_biased()
    dense = trace_once(model)
    graph, info = graphprune.run_pass(dense, "l0_structured", {"init_from": "l1", "init": 4.0, "init_spread": 6.0})
    prefix, names, _ = FAMILIES["BertForSequenceClassification"]
    modules = dict(model.named_modules())
    head_l1, neuron_l1 = [], []
    for i in range(TINY["num_hidden_layers"]):  # each unit's L1 norm over the weights it reads and writes, from the HF model
        w = lambda part: modules[prefix.format(i) + names[part]].weight.detach()  # noqa: E731
        head_l1.append(sum(w(p).reshape(HEADS, -1).abs().sum(1) for p in "qkv") + w("out").reshape(HIDDEN, HEADS, HEAD_SIZE).abs().sum((0, 2)))
        neuron_l1.append(w("up").abs().sum(1) + w("down").abs().sum(0))
    gm, layers = graph.module, graph.meta[GATES]["layers"]
    for unit, scores in (("heads", head_l1), ("neurons", neuron_l1)):
        for layer, expected in zip(layers, our_ranked_starts(scores, 4.0, 6.0)):
            assert torch.allclose(gm.get_submodule(layer["gates"][unit]).log_alpha.detach(), expected, atol=1e-6), unit
    for layer in layers:  # whole sublayers and the hidden dimensions keep the plain start
        assert all(float(gm.get_submodule(layer["gates"][u]).log_alpha) == 4.0 for u in ("attention", "ffn"))
    assert torch.all(gm.get_submodule(graph.meta[GATES]["hidden"]["gate"]).log_alpha == 4.0)
    assert info["expected_fraction"] < graphprune.run_pass(dense, "l0_structured", {"init": 4.0})[1]["expected_fraction"]


def test_init_from_fisher_ranks_the_units_the_fisher_criterion_removes_first_lowest():
    model = make_biased()
    dense = trace_once(model)
    data = CalibrationData(sentiment_data(32), tiny_tokenizer(), max_length=16, batch_size=8)
    graph, _ = graphprune.run_pass(dense, "l0_structured", {"init_from": "fisher", "units": ["heads", "neurons"]}, data=data)
    gm, layers = graph.module, graph.meta[GATES]["layers"]
    starts = torch.cat([gm.get_submodule(layer["gates"]["heads"]).log_alpha.detach() for layer in layers])
    ranks = sorted(((3.0 - float(v)) / 4.0 * (len(starts) - 1)) for v in starts)
    assert ranks == pytest.approx(list(range(len(starts))), abs=1e-4)  # every rank once: a permutation of 0..n-1
    # the two heads remove_heads' Fisher criterion takes out (global scope) are the two that start lowest
    _, info = graphprune.run_pass(dense, "remove_heads", {"method": "fisher", "fraction": 0.25, "min_heads": 0, "num_samples": 512}, data=data)
    removed = sorted((layer, h) for layer, heads in info["removed"].items() for h in heads)
    lowest = sorted(divmod(int(i), HEADS) for i in torch.argsort(starts)[: len(removed)])
    assert removed == lowest


def test_gating_twice_and_committing_without_gates_are_clear_errors():
    _, dense, graph, _ = gated()
    nodes = [n.name for n in graph.module.graph.nodes]
    record = dict(graph.meta[GATES])
    for inplace in (False, True):
        with pytest.raises(ValueError, match="already carries 'l0_structured' gates; run 'commit_gates' first"):
            graphprune.run_pass(graph, "l0_structured", {}, inplace=inplace)
        assert [n.name for n in graph.module.graph.nodes] == nodes and graph.meta[GATES] == record
    dense_nodes = [n.name for n in dense.module.graph.nodes]
    with pytest.raises(ValueError, match="commit_gates.*carries no gates"):
        graphprune.run_pass(dense, "commit_gates", inplace=True)
    assert [n.name for n in dense.module.graph.nodes] == dense_nodes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gates_are_made_on_the_graph_device():
    model = make_biased()
    dense = graphprune.trace(model).to("cuda")
    graph, _ = graphprune.run_pass(dense, "l0_structured", {})
    assert all(g.log_alpha.device.type == "cuda" for g in gate_modules(graph).values())
    set_mixed(graph)
    inputs = {k: v.cuda() for k, v in padded_inputs(model, 3, 11).items()}
    ref = outputs(graph, inputs)
    committed, _ = graphprune.run_pass(graph, "commit_gates")
    assert max_diff(outputs(committed, inputs), ref) <= 1e-4
