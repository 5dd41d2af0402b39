"""remove_heads, remove_ffn_neurons, remove_layers: against zeroed columns, the eager model, and formulas."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir.layers import layer_spans
from graphprune.ir.masks import unmasked_weight
from graphprune.passes.structured.blocks import attention_blocks, ffn_blocks
from graphprune.passes.structured.selection import lowest_scores
from tests.models import make_model, max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

FAMILIES = [
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "DistilBertForSequenceClassification",
    "ElectraForSequenceClassification",
]
SIZES = [(1, 5), (3, 17), (4, 40)]
HEAD_SIZE = 8  # hidden 32 over 4 heads
# The modules each family's structure lives in, written out here (not found by the code under test).
BERT_LAYER = dict(q="attention.self.query", out="attention.output.dense", down="output.dense")
LAYERS = {
    "BertForSequenceClassification": ("bert.encoder.layer.{}.", BERT_LAYER),
    "RobertaForSequenceClassification": ("roberta.encoder.layer.{}.", BERT_LAYER),
    "XLMRobertaForSequenceClassification": ("roberta.encoder.layer.{}.", BERT_LAYER),
    "DistilBertForSequenceClassification": ("distilbert.transformer.layer.{}.", dict(q="attention.q_lin", out="attention.out_lin", down="ffn.lin2")),
    "ElectraForSequenceClassification": ("electra.encoder.layer.{}.", BERT_LAYER),
    "DebertaV2ForSequenceClassification": ("deberta.encoder.layer.{}.", BERT_LAYER),
}


def module_path(name, layer, part):
    prefix, parts = LAYERS[name]
    return prefix.format(layer) + parts[part]


def traced(name="BertForSequenceClassification", seed=0):
    model = make_model(name, seed)
    graph, _ = graphprune.run_pipeline(trace_once(model), [("init_metadata", {}), ("add_common_metadata", {})])
    return model, graph


def zeroed(graph, heads=None, neurons=None, name="BertForSequenceClassification"):
    """The unpruned graph with the removed heads' output columns / neurons' down columns set to zero."""
    ref = graph.copy()
    gm = ref.module
    with torch.no_grad():
        for layer, gone in (heads or {}).items():
            w = unmasked_weight(gm.get_submodule(module_path(name, layer, "out")))
            for h in gone:
                w[:, h * HEAD_SIZE : (h + 1) * HEAD_SIZE] = 0
        for layer, gone in (neurons or {}).items():
            unmasked_weight(gm.get_submodule(module_path(name, layer, "down")))[:, gone] = 0
    return ref


def assert_same_outputs(model, a, b, tol=1e-5):
    for batch, length in SIZES:
        inputs = padded_inputs(model, batch, length)
        with torch.no_grad():
            assert max_diff(a.module(**inputs), b.module(**inputs)) <= tol


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_heads_equals_zeroing_their_output_columns(name):
    model, graph = traced(name)
    heads = {0: [1, 3], 1: [0, 1, 2, 3]}  # layer 1's attention emptied: only its output bias is left
    pruned, info = graphprune.run_pass(graph, "remove_heads", {"heads": heads, "min_heads": 0})
    assert info["heads_per_layer"] == [2, 0]
    assert [row["heads"] for row in pruned.meta["common"]["layers"]] == [2, 0]
    assert_same_outputs(model, pruned, zeroed(graph, heads=heads, name=name))
    q = pruned.module.get_submodule(module_path(name, 0, "q"))
    assert q.out_features == 2 * HEAD_SIZE  # really sliced, not masked
    assert pruned.meta["common"]["totals"]["flops"] < graph.meta["common"]["totals"]["flops"]


@pytest.mark.parametrize("name", FAMILIES + ["DebertaV2ForSequenceClassification"])
def test_removing_ffn_neurons_equals_zeroing_their_down_columns(name):
    model, graph = traced(name)
    neurons = {0: list(range(0, 64, 3)), 1: list(range(64))}  # layer 1's FFN emptied
    pruned, info = graphprune.run_pass(graph, "remove_ffn_neurons", {"neurons": neurons, "min_neurons": 0})
    assert info["ffn_width_per_layer"] == [64 - 22, 0]
    assert [row["ffn_width"] for row in pruned.meta["common"]["layers"]] == [42, 0]
    assert_same_outputs(model, pruned, zeroed(graph, neurons=neurons, name=name))


def test_an_emptied_block_is_its_output_bias_plus_residual():
    model, graph = traced()
    pruned, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {0: [0, 1, 2, 3]}, "min_heads": 0})
    out = pruned.module.get_submodule("bert.encoder.layer.0.attention.output.dense")
    assert out.in_features == 0
    inputs = padded_inputs(model, 2, 7)
    captured = {}
    out.register_forward_hook(lambda m, a, o: captured.setdefault("out", o))
    with torch.no_grad():
        pruned.module(**inputs)
    assert torch.equal(captured["out"], model.bert.encoder.layer[0].attention.output.dense.bias.expand(2, 7, 32))


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "DistilBertForSequenceClassification", "RobertaForSequenceClassification"])
def test_removing_layers_equals_the_eager_model_without_them(name):
    graph = trace_once(_three_layers(name))
    eager = _three_layers(name)
    pruned, info = graphprune.run_pass(graph, "remove_layers", {"layers": [0, 2]})
    assert info["num_layers"] == 1
    stack = eager.distilbert.transformer if name.startswith("DistilBert") else getattr(eager, eager.base_model_prefix).encoder
    stack.layer = nn.ModuleList([stack.layer[1]])
    for batch, length in SIZES:
        inputs = padded_inputs(eager, batch, length)
        with torch.no_grad():
            assert max_diff(pruned.module(**inputs), eager(**inputs)) <= 1e-5


def _three_layers(name):
    torch.manual_seed(0)
    model = make_model(name)
    config = model.config
    if hasattr(config, "n_layers"):
        config.n_layers = 3
    else:
        config.num_hidden_layers = 3
    torch.manual_seed(0)
    return type(model)(config).eval()


def test_similarity_criterion_removes_the_layer_closest_to_identity():
    model = _three_layers("BertForSequenceClassification")
    graph = trace_once(model)
    inputs = padded_inputs(model, 4, 12)
    batch = {**inputs, "labels": torch.tensor([0, 1, 0, 1])}
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
    real = inputs["attention_mask"].bool()
    cosine = [float(torch.nn.functional.cosine_similarity(states[i][real], states[i + 1][real], dim=-1).mean()) for i in range(3)]
    pruned, info = graphprune.run_pass(graph, "remove_layers", {"count": 1}, data=[batch])
    assert info["similarity"] == pytest.approx(cosine, abs=1e-5)
    assert info["removed"] == [max(range(3), key=cosine.__getitem__)]


def test_l1_head_scores_equal_the_weight_formula():
    from graphprune.passes.structured.importance import l1_head_scores

    model, graph = traced()
    (block, _) = attention_blocks(graph, "test")
    attn = model.bert.encoder.layer[0].attention
    expected = torch.stack([
        sum(m.weight[h * 8 : (h + 1) * 8].abs().sum() for m in (attn.self.query, attn.self.key, attn.self.value))
        + attn.output.dense.weight[:, h * 8 : (h + 1) * 8].abs().sum()
        for h in range(4)
    ])
    torch.testing.assert_close(l1_head_scores(graph, [block])[0], expected.detach())


def _per_example_loss(model, inputs, labels, scale_columns):
    with torch.no_grad():
        for module, cols, factor in scale_columns:
            module.weight[:, cols] *= factor
        logits = model(**inputs).logits
        for module, cols, factor in scale_columns:
            module.weight[:, cols] /= factor
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def test_mask_gradients_equal_finite_differences_per_example():
    """dL(x)/dmask of a head (neuron) = the derivative of scaling its output-projection (down) columns."""
    from graphprune.passes.structured.importance import mask_gradients

    model, graph = traced()
    model.double()
    graph.module.double()
    inputs = padded_inputs(model, 3, 9)
    labels = torch.tensor([0, 1, 1])
    heads, ffns = attention_blocks(graph, "test"), ffn_blocks(graph, "test")
    (head_grads,), (ffn_grads,) = mask_gradients(graph, heads, ffns, [{**inputs, "labels": labels}])
    eps = 1e-6
    layer1 = model.bert.encoder.layer[1]
    for h in range(4):
        cols = list(range(h * 8, (h + 1) * 8))
        up = _per_example_loss(model, inputs, labels, [(layer1.attention.output.dense, cols, 1 + eps)])
        down = _per_example_loss(model, inputs, labels, [(layer1.attention.output.dense, cols, 1 - eps)])
        torch.testing.assert_close(head_grads[1][:, h].double(), (up - down) / (2 * eps), rtol=1e-4, atol=1e-6)
    for j in (0, 17, 63):
        up = _per_example_loss(model, inputs, labels, [(model.bert.encoder.layer[0].output.dense, [j], 1 + eps)])
        down = _per_example_loss(model, inputs, labels, [(model.bert.encoder.layer[0].output.dense, [j], 1 - eps)])
        torch.testing.assert_close(ffn_grads[0][:, j].double(), (up - down) / (2 * eps), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["l1", "taylor", "fisher"])
def test_criteria_remove_the_requested_share_and_keep_min_heads(method):
    model, graph = traced()
    data = [{**padded_inputs(model, 4, 10), "labels": torch.tensor([0, 1, 0, 1])}]
    pruned, info = graphprune.run_pass(graph, "remove_heads", {"method": method, "fraction": 0.75, "min_heads": 1}, data=data)
    assert info["heads_removed"] == 6 and min(info["heads_per_layer"]) >= 1
    pruned, info = graphprune.run_pass(graph, "remove_ffn_neurons", {"method": method, "fraction": 0.5, "scope": "local"}, data=data)
    assert info["ffn_width_per_layer"] == [32, 32]


def test_lowest_scores_global_normalises_layers_and_respects_min_keep():
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([100.0, 300.0, 200.0])]
    # normalised: layer 0 [.27 .53 .80], layer 1 [.27 .80 .53]: the two lowest are one per layer
    assert lowest_scores(scores, 2 / 6, "global", 1) == [[0], [0]]
    assert lowest_scores(scores, 5 / 6, "global", 1) == [[0, 1], [0, 2]]  # only 4 can go with min_keep 1
    assert lowest_scores(scores, 0.5, "local", 0) == [[0, 1], [0, 2]]


def test_masks_are_sliced_with_their_weights():
    model, graph = traced()
    masked, _ = graphprune.run_pass(graph, "prune_weight", {"method": "l1", "sparsity": 0.5})
    pruned, _ = graphprune.run_pass(masked, "remove_heads", {"heads": {0: [2]}})
    assert_same_outputs(model, pruned, zeroed(masked, heads={0: [2]}))
    q = pruned.module.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert torch.nn.utils.parametrize.is_parametrized(q) and q.weight.shape == (24, 32)
    assert (q.weight == 0).sum() >= 0.4 * q.weight.numel()


def test_bad_requests_are_clear_errors_and_leave_the_graph_alone():
    model, graph = traced()
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    with pytest.raises(ValueError, match=r"remove_heads.*heads\.1.*min_heads = 0"):
        graphprune.run_pass(graph, "remove_heads", {"heads": {1: [0, 1, 2, 3]}})
    with pytest.raises(ValueError, match=r"remove_heads.*head indices in 0\.\.3"):
        graphprune.run_pass(graph, "remove_heads", {"heads": {"0": [7]}})
    with pytest.raises(ValueError, match=r"remove_ffn_neurons.*method"):
        graphprune.run_pass(graph, "remove_ffn_neurons", {"method": "magic"})
    with pytest.raises(ValueError, match=r"remove_heads.*needs calibration data"):
        graphprune.run_pass(graph, "remove_heads", {"method": "fisher"})
    with pytest.raises(ValueError, match=r"remove_layers.*at most 1 of the 2"):
        graphprune.run_pass(graph, "remove_layers", {"layers": [0, 1]})
    after = graph.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)


@pytest.mark.parametrize("name,message", [("AlbertForSequenceClassification", "ALBERT's shared layer"), ("DebertaV2ForSequenceClassification", "DeBERTa-v2")])
def test_unsupported_families_are_refused_clearly(name, message):
    graph = trace_once(make_model(name))
    with pytest.raises(ValueError, match=message):
        graphprune.run_pass(graph, "remove_heads", {"heads": {0: [0]}})


def test_uneven_layers_reload_bit_identically_in_a_fresh_process(tmp_path):
    model, graph = traced()
    pruned, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {0: [0, 2, 3], 1: [1]}})
    pruned, _ = graphprune.run_pass(pruned, "remove_ffn_neurons", {"neurons": {0: list(range(40)), 1: [3]}})
    pruned.save(tmp_path / "ckpt")
    inputs = padded_inputs(model, 3, 11)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(pruned.module(**inputs).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, graphprune
        graph = graphprune.load({str(tmp_path / 'ckpt')!r})
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            out = graph.module(**inputs).logits
        assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r})), "outputs differ"
        print([r["heads"] for r in graph.meta["common"]["layers"]], [r["ffn_width"] for r in graph.meta["common"]["layers"]])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[1, 3] [24, 63]" in result.stdout


def test_analyze_heads_against_eager_attention_and_zeroed_columns(tmp_path):
    model, graph = traced()
    inputs = padded_inputs(model, 6, 10)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    analysed, info = graphprune.run_pass(graph, "analyze_heads", {"plot": str(tmp_path / "heads.png")}, data=[{**inputs, "labels": labels}])
    meta = analysed.meta["heads"]
    # entropy: the eager model's own attention probabilities, over real query tokens
    eager = make_model()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    real = inputs["attention_mask"].bool()
    for layer, probs in enumerate(attentions):
        h = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # (batch, heads, queries)
        expected = (h * real[:, None, :]).sum((0, 2)) / real.sum()
        torch.testing.assert_close(torch.tensor(meta["entropy"][layer], dtype=torch.float64), expected.double(), atol=1e-5, rtol=1e-5)
    # accuracy drop and loss increase: the graph with that head's output columns zeroed
    with torch.no_grad():
        base = graph.module(**inputs, labels=labels)
        for layer, head in [(0, 2), (1, 3)]:
            out = zeroed(graph, heads={layer: [head]}).module(**inputs, labels=labels)
            drop = 100 * float((base.logits.argmax(-1) == labels).float().mean() - (out.logits.argmax(-1) == labels).float().mean())
            assert meta["accuracy_drop_points"][layer][head] == pytest.approx(drop, abs=1e-3)
            assert meta["loss_increase"][layer][head] == pytest.approx(float(out.loss - base.loss), abs=1e-5)
    assert all(abs(float(torch.tensor(row).norm()) - 1) < 1e-5 for row in meta["importance"])
    assert "accuracy drop when masked alone" in info["table"] and (tmp_path / "heads.png").stat().st_size > 1000


def test_shapes_refreshed_after_surgery_equal_a_full_propagation():
    """Only the edited nodes' shapes are recomputed (shared between equal layers): they must be what a full pass gives."""
    from graphprune.ir.shapes import dim_names, refresh_shapes, shape_list

    _, graph = traced()
    graph, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {0: [1, 2], 1: [1, 3]}})  # equal widths: shared values
    graph, _ = graphprune.run_pass(graph, "remove_ffn_neurons", {"neurons": {0: [0, 5, 9]}})  # uneven widths
    gm = graph.module
    names = dim_names(gm)
    incremental = {n.name: shape_list(n.meta["val"], names) for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    refresh_shapes(gm)
    names = dim_names(gm)
    full = {n.name: shape_list(n.meta["val"], names) for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert incremental == full


def test_a_layer_without_attention_keeps_its_place_in_the_stack():
    """Every head of layer 0 removed: it is still layer 0 to remove_layers (a layer was found by its query projection,
    so "layer 1" named the third layer here), and removing layers commutes with removing heads."""
    graph = trace_once(_three_layers("BertForSequenceClassification"))
    all_heads = {"heads": {0: [0, 1, 2, 3]}, "min_heads": 0}
    headless, _ = graphprune.run_pass(graph, "remove_heads", all_heads)
    pruned, info = graphprune.run_pass(headless, "remove_layers", {"layers": [1]})
    assert info["num_layers"] == 2
    reference, _ = graphprune.run_pass(graphprune.run_pass(graph, "remove_layers", {"layers": [1]})[0], "remove_heads", all_heads)
    inputs = padded_inputs(_three_layers("BertForSequenceClassification"), 2, 9)
    with torch.no_grad():
        assert max_diff(pruned.module(**inputs), reference.module(**inputs)) <= 1e-5
    spans = layer_spans(headless, "test")
    assert [s.index for s in spans] == [0, 1, 2]
    assert spans[0].input.name == "bert_embeddings_dropout" and spans[1].input is spans[0].output


def test_a_graph_with_no_attention_left_still_has_its_layers_for_hidden_distillation():
    graph = trace_once(_three_layers("BertForSequenceClassification"))
    headless, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {i: [0, 1, 2, 3] for i in range(3)}, "min_heads": 0})
    assert len(layer_spans(headless, "test")) == 3
    data = sentiment_data(16)
    result = graphprune.finetune(headless, data, tiny_tokenizer(), teacher=graph, kd_hidden_weight=1.0, max_steps=2,
                                 batch_size=8, progress=False)
    assert result.steps == 2
