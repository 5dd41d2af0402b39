"""prune_activation against a hand-written masked forward; MASE's prune config; sparsity metadata."""

import copy

import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir.metadata import common

from ..models import make_model, max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

ENCODER = ("query", "key", "value", "attention_output", "ffn_up", "ffn_down")


def encoder_linears(model):
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
    return [model.get_submodule(f"bert.encoder.layer.{i}.{n}") for i in range(model.config.num_hidden_layers) for n in names]


def hand_masked(model, sparsity: float, keep_sets=None, ffn_down_sparsity=None):
    """The eager model with each encoder Linear's input masked by hand: per token, keep the k largest |x|."""
    handles = []
    for index, module in enumerate(encoder_linears(model)):
        share = ffn_down_sparsity if ffn_down_sparsity is not None and index % len(ENCODER) == ENCODER.index("ffn_down") else sparsity

        def hook(m, args, index=index, share=share):
            x = args[0]
            d = x.shape[-1]
            k = d - round(share * d)
            if keep_sets is not None:
                return (x * keep_sets[index],)
            kept = torch.zeros_like(x, dtype=torch.bool).scatter(-1, x.abs().topk(k, dim=-1).indices, True)
            return (x * kept,)

        handles.append(module.register_forward_pre_hook(hook))
    return handles


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_l1_output_equals_a_hand_written_masked_forward(sparsity):
    model = make_model()
    graph, info = graphprune.run_pass(trace_once(copy.deepcopy(model)), "prune_activation", {"sparsity": sparsity})
    assert info["rewritten"] == 12
    handles = hand_masked(model, sparsity)
    try:
        for batch, seq in [(1, 5), (3, 11), (4, 32)]:
            inputs = padded_inputs(model, batch, seq)
            with torch.no_grad():
                assert max_diff(graph.module(**inputs), model(**inputs)) <= 1e-5
    finally:
        for h in handles:
            h.remove()


def test_each_token_keeps_exactly_its_share_and_padding_changes_nothing_else():
    model = make_model()
    graph, _ = graphprune.run_pass(trace_once(model), "prune_activation", {"sparsity": 0.5, "ffn_down": {"sparsity": 0.75}})
    seen = {}  # the last input each role's Linear saw (the hooks return None: inputs unchanged)
    for node in graph.nodes:
        if node.op == "call_module" and common(node).get("role") in ("query", "ffn_down"):
            module = graph.module.get_submodule(node.target)
            module.register_forward_pre_hook(lambda m, args, role=common(node)["role"]: seen.update({role: args[0]}))
    inputs = padded_inputs(model, 2, 9)
    with torch.no_grad():
        graph.module(**inputs)
    assert torch.all((seen["query"] != 0).sum(-1) == 16)  # 32 features, half kept per token
    assert torch.all((seen["ffn_down"] != 0).sum(-1) == 16)  # 64 features, a quarter kept
    # a real token's output does not depend on how much padding follows it, and either length is the masked forward
    long = {k: v[1:] for k, v in inputs.items()}
    short = {k: v[1:, :4] for k, v in inputs.items()}
    padded = {k: torch.cat([v[1:, :4], torch.zeros_like(v[1:, :5])], dim=1) for k, v in inputs.items()}
    with torch.no_grad():
        long_out, short_out = graph.module(**long).logits, graph.module(**short).logits
        assert torch.allclose(graph.module(**padded).logits, short_out, atol=1e-5)
    handles = hand_masked(model, 0.5, ffn_down_sparsity=0.75)
    try:
        with torch.no_grad():
            assert torch.allclose(long_out, model(**long).logits, atol=1e-5)
            assert torch.allclose(short_out, model(**short).logits, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_random_keeps_a_fixed_seeded_feature_set():
    model = make_model()
    graph, _ = graphprune.run_pass(trace_once(copy.deepcopy(model)), "prune_activation", {"method": "random", "sparsity": 0.5, "seed": 3})
    buffers = [b for name, b in graph.module.named_buffers() if name.startswith("activation_keep_")]
    assert len(buffers) == 12 and all(int(b.sum()) == len(b) // 2 for b in buffers)
    again, _ = graphprune.run_pass(trace_once(copy.deepcopy(model)), "prune_activation", {"method": "random", "sparsity": 0.5, "seed": 3})
    assert all(torch.equal(a, b) for a, b in zip(buffers, [b for n, b in again.module.named_buffers() if n.startswith("activation_keep_")]))
    handles = hand_masked(model, 0.5, keep_sets=buffers)
    try:
        inputs = padded_inputs(model, 3, 7)
        with torch.no_grad():
            assert max_diff(graph.module(**inputs), model(**inputs)) <= 1e-5
    finally:
        for h in handles:
            h.remove()


def test_the_rewrite_is_visible_saved_reloaded_trained_and_replaceable(tmp_path):
    model = make_model()
    graph, _ = graphprune.run_pass(trace_once(model), "prune_activation", {"sparsity": 0.5})
    code = graph.module.code
    assert code.count("torch.ops.aten.kthvalue.default") == 12 and code.count("torch.ops.aten.gt.Tensor") == 12
    graph.save(tmp_path / "act")
    again = graphprune.load(tmp_path / "act")
    inputs = padded_inputs(model, 2, 7)
    with torch.no_grad():
        assert max_diff(again.module(**inputs), graph.module(**inputs)) == 0.0
    result = graphprune.finetune(again, sentiment_data(32), tiny_tokenizer(), max_steps=3, batch_size=8, progress=False)
    assert result.steps == 3 and all(l == l for l in result.losses)  # trains, no NaN
    replaced, _ = graphprune.run_pass(graph, "prune_activation", {"sparsity": 0.25})
    assert replaced.module.code.count("torch.ops.aten.kthvalue.default") == 12
    removed, _ = graphprune.run_pass(replaced, "prune_activation", {"sparsity": 0.0})
    assert "kthvalue" not in removed.module.code
    with torch.no_grad():
        assert max_diff(removed.module(**inputs), model(**inputs)) <= 1e-6


def test_mase_tutorial_config_runs_as_written():
    model = make_model()
    config = {
        "weight": {"sparsity": 0.5, "method": "l1-norm", "scope": "local"},
        "activation": {"sparsity": 0.5, "method": "l1-norm", "scope": "local"},
    }
    graph, info = graphprune.run_pass(trace_once(copy.deepcopy(model)), "prune", config)
    assert info["weight"]["weight_sparsity"] == 0.5 and info["activation"]["rewritten"] == 12
    both, _ = graphprune.run_pipeline(
        trace_once(copy.deepcopy(model)),
        [("prune_weight", {"sparsity": 0.5, "method": "l1"}), ("prune_activation", {"sparsity": 0.5, "method": "l1"})],
    )
    inputs = padded_inputs(model, 2, 8)
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), both.module(**inputs)) == 0.0


def test_mase_layer_wise_sparsities_and_defaults():
    graph = trace_once(make_model())
    layer = "bert.encoder.layer.0.output.dense"
    pruned, _ = graphprune.run_pass(graph, "prune", {"weight": {"sparsity": {layer: 0.75}, "method": "l1-norm"}})
    for module_path, module in pruned.module.named_modules():
        if isinstance(module, nn.Linear):
            zeros = float((module.weight == 0).float().mean())
            assert zeros == (0.75 if module_path == layer else 0.0), module_path
    with pytest.raises(ValueError, match=r"field 'activation.scope' = 'global'.*per token"):
        graphprune.run_pass(graph, "prune", {"activation": {"sparsity": 0.5, "scope": "global"}})
    with pytest.raises(ValueError, match=r"field 'weight.method' = 'hwpq'"):
        graphprune.run_pass(graph, "prune", {"weight": {"sparsity": 0.5, "method": "hwpq"}})


def test_sparsity_metadata_per_layer_and_in_the_summary():
    graph = trace_once(make_model())
    pruned, _ = graphprune.run_pipeline(
        graph,
        [("prune_weight", {"sparsity": 0.5, "ffn_up": {"sparsity": 0.75}}), ("prune_activation", {"sparsity": 0.25, "query": None})],
    )
    meta = pruned.meta["sparsity"]
    for layer in meta["layers"]:
        modules = [m for m in encoder_linears_of(pruned, layer["index"])]
        zeros = sum(int((m.weight == 0).sum()) for m in modules)
        assert layer["weight_sparsity"] == pytest.approx(zeros / sum(m.weight.numel() for m in modules))
        assert layer["activation_sparsity"] == pytest.approx(0.25 * 5 / 6)  # query is not activation-pruned
    assert meta["totals"]["masked"] and meta["totals"]["activation_pruned_layers"] == 10
    text = str(pruned.summary())
    assert "weight_sparsity" in text and "act_sparsity" in text
    fresh, info = graphprune.run_pass(graph, "add_sparsity_metadata")
    assert info["weight_sparsity"] == 0.0 and fresh.meta["sparsity"]["totals"]["activation_pruned_layers"] == 0


def encoder_linears_of(graph, layer: int):
    return [graph.module.get_submodule(n.target) for n in graph.nodes if n.op == "call_module" and common(n).get("layer") == layer and common(n).get("role") in ENCODER]
