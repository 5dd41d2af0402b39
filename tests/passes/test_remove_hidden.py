"""remove_hidden and GatedLayerNorm: against the hidden-gated graph, F.layer_norm over the kept dimensions,
the L1 formula written here, and the shapes each family's modules must get."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune.ir.gates import GATES
from graphprune.passes.structured.hidden import GatedLayerNorm
from tests.models import make_biased, make_model, max_diff, padded_inputs, trace_once

HIDDEN = 32
SIZES = [(3, 11), (1, 5)]
BERT_LAYER = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value", out="attention.output.dense",
                  up="intermediate.dense", down="output.dense")
# Per family, written out here: the layer modules, and the head's Linears that read the residual stream itself.
FAMILIES = {
    "BertForSequenceClassification": ("bert.encoder.layer.{}.", BERT_LAYER, ["bert.pooler.dense"]),
    "BertModel": ("encoder.layer.{}.", BERT_LAYER, ["pooler.dense"]),
    "BertForQuestionAnswering": ("bert.encoder.layer.{}.", BERT_LAYER, ["qa_outputs"]),
    "RobertaForSequenceClassification": ("roberta.encoder.layer.{}.", BERT_LAYER, ["classifier.dense"]),
    "DistilBertForSequenceClassification": (
        "distilbert.transformer.layer.{}.",
        dict(q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", out="attention.out_lin", up="ffn.lin1", down="ffn.lin2"),
        ["pre_classifier"],
    ),
}
DIMS = [0, 5, 6, 17, 31]


def outputs(graph, inputs):
    with torch.no_grad():
        return graph.module(**inputs)


def hidden_gated(dense, removed):
    """The independent oracle: hidden gates only, the removed dimensions shut, the rest open with a soft value of exactly 1."""
    graph, _ = graphprune.run_pass(dense, "l0_structured", {"units": ["hidden"]})
    gate = graph.module.get_submodule(graph.meta[GATES]["hidden"]["gate"])
    la = torch.full((HIDDEN,), 100.0)
    la[removed] = -10.0
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    z = gate.deterministic()
    assert torch.equal(z, (la > 0).float())  # sigmoid(0.8 * 100 / T) is 1.0 in float32: no scaling left over
    return graph


def assert_same(name, out, ref, kept):
    if name == "BertModel":  # the headless encoder's states are narrower
        removed = [d for d in range(HIDDEN) if d not in kept]
        assert ref["last_hidden_state"][..., removed].abs().max() == 0
        assert (out["last_hidden_state"] - ref["last_hidden_state"][..., kept]).abs().max() <= 1e-5
        assert (out["pooler_output"] - ref["pooler_output"]).abs().max() <= 1e-5
    else:
        assert max_diff(out, ref) <= 1e-5


def assert_shapes(name, dense, pruned, kept):
    prefix, names, readers = FAMILIES[name]
    before, after = dict(dense.module.named_modules()), dict(pruned.module.named_modules())
    d = len(kept)
    for i in range(2):
        p = prefix.format(i)
        for proj in ("q", "k", "v", "up"):  # read the stream: lose input columns
            m, old = after[p + names[proj]], before[p + names[proj]]
            assert (m.in_features, m.out_features) == (d, old.out_features)
            assert torch.equal(m.weight, old.weight[:, kept]) and torch.equal(m.bias, old.bias)
        for proj in ("out", "down"):  # added into the stream: lose rows
            m, old = after[p + names[proj]], before[p + names[proj]]
            assert (m.in_features, m.out_features) == (old.in_features, d)
            assert torch.equal(m.weight, old.weight[kept]) and torch.equal(m.bias, old.bias[kept])
    for reader in readers:
        assert after[reader].in_features == d and after[reader].out_features == before[reader].out_features
        assert torch.equal(after[reader].weight, before[reader].weight[:, kept])
    for key, old in before.items():
        if isinstance(old, nn.Embedding):
            assert after[key].embedding_dim == d and torch.equal(after[key].weight, old.weight[:, kept]), key
            assert after[key].padding_idx == old.padding_idx
        elif isinstance(old, nn.LayerNorm):
            assert type(after[key]) is nn.LayerNorm and tuple(after[key].normalized_shape) == (d,), key
            assert torch.equal(after[key].weight, old.weight[kept]) and torch.equal(after[key].bias, old.bias[kept])
            assert after[key].eps == old.eps
        elif isinstance(old, nn.Linear) and key not in readers and not any(key == prefix.format(i) + n for i in range(2) for n in names.values()):
            assert (after[key].in_features, after[key].out_features) == (old.in_features, old.out_features), key


def assert_equals_hidden_gated(name, model, dense, pruned, removed, kept):
    """The narrower graph has the kept shapes and computes what the graph gated shut on ``removed`` computes."""
    assert_shapes(name, dense, pruned, kept)
    oracle = hidden_gated(dense, removed)
    for size in SIZES:
        inputs = padded_inputs(model, *size)
        assert_same(name, outputs(pruned, inputs), outputs(oracle, inputs), kept)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_removing_explicit_dims_equals_the_hidden_gated_graph(name):
    model = make_biased(name)
    dense = trace_once(model)
    kept = [d for d in range(HIDDEN) if d not in DIMS]
    pruned, info = graphprune.run_pass(dense, "remove_hidden", {"dims": DIMS})
    assert info == {"removed": DIMS, "hidden_size": HIDDEN - len(DIMS)}
    assert pruned.edits[-1] == {"pass": "remove_hidden", "removed": len(DIMS), "hidden_before": HIDDEN}
    assert_equals_hidden_gated(name, model, dense, pruned, DIMS, kept)


def test_removed_dims_are_taken_as_a_set_and_the_graph_is_unchanged():
    model = make_model()
    dense = trace_once(model)
    a, info = graphprune.run_pass(dense, "remove_hidden", {"dims": [17, 5, 17, 0]})
    b, _ = graphprune.run_pass(dense, "remove_hidden", {"dims": [0, 5, 17]})
    assert info["removed"] == [0, 5, 17] and info["hidden_size"] == 29
    inputs = padded_inputs(model, 3, 11)
    assert max_diff(outputs(a, inputs), outputs(b, inputs)) == 0.0
    assert dense.module.bert.embeddings.word_embeddings.embedding_dim == HIDDEN  # run_pass worked on a copy
    with torch.no_grad():
        assert max_diff(outputs(dense, inputs), model(**inputs)) <= 1e-5


def our_l1_scores(name, dense):
    """Each dimension's L1 norm over every matrix it touches, from the module list written in FAMILIES."""
    prefix, names, readers = FAMILIES[name]
    modules = dict(dense.module.named_modules())
    total = torch.zeros(HIDDEN)
    for m in modules.values():
        if isinstance(m, nn.Embedding):
            total += m.weight.detach().abs().sum(0)
    for i in range(2):
        p = prefix.format(i)
        for proj in ("q", "k", "v", "up"):
            total += modules[p + names[proj]].weight.detach().abs().sum(0)
        for proj in ("out", "down"):
            total += modules[p + names[proj]].weight.detach().abs().sum(1)
    for reader in readers:
        total += modules[reader].weight.detach().abs().sum(0)
    return total


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "DistilBertForSequenceClassification", "RobertaForSequenceClassification"])
@pytest.mark.parametrize("fraction", [0.25, 0.1])
def test_the_l1_criterion_removes_the_lowest_l1_dims(name, fraction):
    model = make_biased(name)
    dense = trace_once(model)
    scores = our_l1_scores(name, dense)
    count = round(fraction * HIDDEN)
    order = scores.argsort()
    assert scores[order[count]] - scores[order[count - 1]] > 1e-3  # no near-tie at the cut: the choice is well defined
    expected = sorted(order[:count].tolist())
    pruned, info = graphprune.run_pass(dense, "remove_hidden", {"method": "l1", "fraction": fraction})
    assert info["removed"] == expected and info["hidden_size"] == HIDDEN - count
    kept = [d for d in range(HIDDEN) if d not in expected]
    assert_equals_hidden_gated(name, model, dense, pruned, expected, kept)


def test_common_metadata_is_refreshed():
    dense, _ = graphprune.run_pass(trace_once(make_model()), "add_common_metadata")
    pruned, _ = graphprune.run_pass(dense, "remove_hidden", {"dims": DIMS})
    fresh, _ = graphprune.run_pass(pruned, "add_common_metadata")
    assert pruned.meta["common"]["totals"] == fresh.meta["common"]["totals"]
    assert pruned.meta["common"]["totals"]["params"] == sum(p.numel() for p in pruned.module.parameters())
    assert pruned.meta["common"]["totals"]["params"] < dense.meta["common"]["totals"]["params"]


def test_a_tied_masked_lm_keeps_its_outputs():
    """The decoder reads the head's transform, not the stream: it keeps the dense table (the tie is broken)."""
    name = "BertForMaskedLM"
    model = make_biased(name)
    dense = trace_once(model)
    assert dense.module.cls.predictions.decoder.weight is dense.module.bert.embeddings.word_embeddings.weight
    pruned, info = graphprune.run_pass(dense, "remove_hidden", {"dims": DIMS})
    gm = pruned.module
    assert gm.bert.embeddings.word_embeddings.weight.shape == (120, HIDDEN - len(DIMS))
    assert gm.cls.predictions.transform.dense.in_features == HIDDEN - len(DIMS)
    assert tuple(gm.cls.predictions.transform.LayerNorm.normalized_shape) == (HIDDEN,)  # after the head's own dense: not the stream
    assert torch.equal(gm.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight)
    oracle = hidden_gated(dense, DIMS)
    for size in SIZES:
        inputs = padded_inputs(model, *size)
        ref = outputs(oracle, inputs)
        assert max_diff(outputs(pruned, inputs), ref) <= 1e-5
        with torch.no_grad():
            assert max_diff(ref, model(**inputs)) > 1e-3  # removing dimensions changes the model: the check has teeth


# --- GatedLayerNorm -------------------------------------------------------------------------------------------


def test_gated_layer_norm_normalises_over_the_open_dims_only():
    torch.manual_seed(0)
    norm = GatedLayerNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(8))
        norm.bias.copy_(0.3 * torch.randn(8))
    x = 3 * torch.randn(2, 3, 8) + 1
    z = torch.tensor([1.0, 0.0, 0.7, 1.0, 0.0, 0.0, 0.2, 1.0])  # soft values count as open
    keep = [0, 2, 3, 6, 7]
    out = norm(x, z)
    ref = F.layer_norm(x[..., keep], (5,), norm.weight[keep], norm.bias[keep], 1e-5)
    assert torch.allclose(out[..., keep], ref, atol=1e-6)
    assert torch.equal(out[..., [1, 4, 5]], torch.zeros(2, 3, 3))
    kept = x[..., keep]  # by hand: the mean and the biased variance over the open dimensions
    mean, var = kept.mean(-1, keepdim=True), kept.var(-1, unbiased=False, keepdim=True)
    by_hand = (kept - mean) / torch.sqrt(var + 1e-5) * norm.weight[keep] + norm.bias[keep]
    assert torch.allclose(out[..., keep], by_hand, atol=1e-5)
    plain = F.layer_norm(x, (8,), norm.weight, norm.bias, 1e-5)
    assert torch.equal(norm(x, torch.full((8,), 0.5)), plain) and torch.equal(norm(x), plain)
    assert not torch.allclose(out[..., keep], plain[..., keep], atol=1e-3)


def test_gated_layer_norm_replacing_shares_the_parameters():
    old = nn.LayerNorm(8, eps=1e-7)
    old.eval()
    gated = GatedLayerNorm.replacing(old)
    assert gated.weight is old.weight and gated.bias is old.bias
    assert gated.eps == 1e-7 and tuple(gated.normalized_shape) == (8,) and not gated.training


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, words",
    [
        ({"dims": [32]}, ["dims", "32", "0..31"]),
        ({"dims": [-1]}, ["dims", "-1"]),
        ({"dims": list(range(HIDDEN))}, ["dims", "fewer than 32"]),
        ({"fraction": 0.0}, ["fraction", "0.0"]),
        ({"fraction": 1.0}, ["fraction", "1.0"]),
        ({"fraction": 1.5}, ["fraction"]),
        ({"method": "taylor"}, ["method", "taylor"]),
    ],
)
def test_bad_configs_are_clear_errors_that_leave_the_graph_untouched(config, words):
    dense = trace_once(make_model())
    nodes, state = [n.name for n in dense.module.graph.nodes], {k: v.shape for k, v in dense.module.state_dict().items()}
    with pytest.raises(ValueError) as error:
        graphprune.run_pass(dense, "remove_hidden", config, inplace=True)
    message = str(error.value)
    assert "remove_hidden" in message and all(w in message for w in words), message
    assert [n.name for n in dense.module.graph.nodes] == nodes
    assert {k: v.shape for k, v in dense.module.state_dict().items()} == state
    assert not dense.edits


@pytest.mark.parametrize(
    "name, words",
    [
        ("DebertaV2ForSequenceClassification", ["remove_hidden", "cannot be narrowed"]),
        ("AlbertForSequenceClassification", ["remove_hidden", "share their weights"]),
    ],
)
def test_unsupported_families_are_refused_by_name(name, words):
    dense = trace_once(make_model(name))
    with pytest.raises(ValueError) as error:
        graphprune.run_pass(dense, "remove_hidden", {"dims": [0]})
    assert all(w in str(error.value) for w in words), str(error.value)
