"""quantize against models quantized by hand here: MASE's integer formula written out,
forward pre-hooks on the eager model, a hand-written quantized attention; pruning,
checkpoints, fine-tuning, metadata, and configs that must fail before anything changes."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import graphprune
from graphprune.app.cli import main
from graphprune.ir.masks import WeightMask, mask_of
from graphprune.ir.modules import AttentionCore
from graphprune.passes.quantization.quantizers import QuantizedAttentionCore, Quantizer

from ..models import max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once, widened_model


def int_q(x, width, frac):
    """MASE's integer quantizer: clamp(round(x * 2^f), -2^(w-1), 2^(w-1) - 1) / 2^f."""
    return torch.clamp(torch.round(x * 2.0**frac), -(2 ** (width - 1)), 2 ** (width - 1) - 1) / 2.0**frac


def integer(**widths):
    """An integer entry: integer(data_in=(8, 5), weight=(8, 6)) -> MASE keys."""
    entry = {"name": "integer"}
    for prefix, (width, frac) in widths.items():
        entry[f"{prefix}_width"], entry[f"{prefix}_frac_width"] = width, frac
    return {"config": entry}


LINEAR = integer(data_in=(8, 5), weight=(8, 6), bias=(8, 5))
EVERYTHING = integer(data_in=(8, 5), weight=(8, 6), bias=(8, 5))  # data_in for every op, weight/bias where there are some
MASE_TUTORIAL = {  # MASE tutorial 3, as written
    "by": "type",
    "default": {"config": {"name": None}},
    "linear": {
        "config": {
            "name": "integer",
            # data
            "data_in_width": 8,
            "data_in_frac_width": 4,
            # weight
            "weight_width": 8,
            "weight_frac_width": 4,
            # bias
            "bias_width": 8,
            "bias_frac_width": 4,
        }
    },
}


@pytest.fixture(scope="module")
def model():
    """The tiny BERT with weights large enough for 4-7 fraction bits to matter, and non-zero biases."""
    return widened_model(5, layer_norms=True)


@pytest.fixture(scope="module")
def graph(model):
    return trace_once(model)


@pytest.fixture(scope="module")
def inputs(model):
    return padded_inputs(model, 3, 11)


def quantize(graph, config, **kwargs):
    return graphprune.run_pass(graph, "quantize", config, **kwargs)


def quantized_nodes(graph) -> set:
    return {n.name for n in graph.nodes if "graphprune.quantize" in n.meta}


def quantizer_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_module" and isinstance(graph.module.get_submodule(n.target), Quantizer)]


def chain(module, tensor="weight") -> list:
    return [type(p) for p in module.parametrizations[tensor]] if parametrize.is_parametrized(module, tensor) else []


def snapshot(graph):
    return (
        {k: v.clone() for k, v in graph.module.state_dict().items()},
        graph.module.code,
        repr(graph.meta),
        repr(graph.history),
        {n.name: repr({k: v for k, v in n.meta.items() if k.startswith("graphprune.")}) for n in graph.nodes},
    )


def same(a, b) -> bool:
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[0].keys() == b[0].keys() and a[1:] == b[1:]


def hand_quantized_linears(model, data_in, weight, bias):
    """A copy of the eager model whose Linear weights and biases are quantized by hand and whose
    Linear inputs are quantized by forward pre-hooks."""
    eager = copy.deepcopy(model)
    with torch.no_grad():
        for module in eager.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(int_q(module.weight, *weight))
                module.bias.copy_(int_q(module.bias, *bias))
                module.register_forward_pre_hook(lambda m, args: (int_q(args[0], *data_in),))
    return eager


def hand_attention(query, key, value, mask, data_in, weight):
    """softmax(q k^T / sqrt(d) + mask) v with q and probs on the data_in grid, k and v on the weight grid."""
    scores = int_q(query, *data_in) @ int_q(key, *weight).transpose(-1, -2) * (1 / math.sqrt(query.shape[-1]))
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return int_q(torch.softmax(scores, dim=-1), *data_in) @ int_q(value, *weight)


# ---- numerics -------------------------------------------------------------------------


def test_quantized_linears_equal_an_eager_model_quantized_by_hand(model, graph, inputs):
    before = snapshot(graph)
    config = copy.deepcopy({"by": "type", "linear": LINEAR})
    quantized, info = quantize(graph, config)
    assert same(before, snapshot(graph)) and config == {"by": "type", "linear": LINEAR}  # nothing of the caller's changed
    assert info["quantized"] == 14 and info["by_type"] == {"linear": 14}  # 12 encoder Linears, pooler, classifier
    eager = hand_quantized_linears(model, data_in=(8, 5), weight=(8, 6), bias=(8, 5))
    with torch.no_grad():
        assert max_diff(quantized.module(**inputs), eager(**inputs)) <= 1e-5
        assert max_diff(graph.module(**inputs), eager(**inputs)) > 1e-3  # the quantization is not a no-op
    # structure: one quantizer node per Linear, in the generated code; weight and bias parametrized
    code = quantized.module.code
    assert len(quantizer_nodes(quantized)) == 14 and "self.bert_encoder_layer_0_attention_self_query_data_in_0_quantizer(" in code
    query = quantized.module.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert chain(query) == [Quantizer] and chain(query, "bias") == [Quantizer]
    assert torch.equal(query.weight, int_q(query.parametrizations.weight.original, 8, 6))
    meta = quantized.node("bert_encoder_layer_0_attention_self_query").meta["graphprune.quantize"]
    assert meta["type"] == "linear" and meta["format"] == "integer" and meta["selected_by"] == "linear"
    assert meta["bits"] == {"data_in_0": 8.0, "weight": 8.0, "bias": 8.0}
    assert meta["config"] == {"name": "integer", **LINEAR["config"]}


def test_the_mase_tutorial_config_runs_as_written(graph, inputs, tmp_path):
    config = copy.deepcopy(MASE_TUTORIAL)
    quantized, info = quantize(graph, config)
    assert config == MASE_TUTORIAL and info["quantized"] == 14
    bare, _ = quantize(graph, {"by": "type", "default": {"name": None}, "linear": MASE_TUTORIAL["linear"]["config"]})
    job = tmp_path / "quantize.toml"  # MASE's TOML spelling of None is "NA"
    job.write_text(
        '[[passes]]\nname = "quantize"\nby = "type"\n[passes.default.config]\nname = "NA"\n[passes.linear.config]\n'
        'name = "integer"\ndata_in_width = 8\ndata_in_frac_width = 4\nweight_width = 8\nweight_frac_width = 4\n'
        "bias_width = 8\nbias_frac_width = 4\n"
    )
    from_toml, _ = graphprune.run_pipeline(graph, job)
    with torch.no_grad():
        expected = quantized.module(**inputs)
        assert max_diff(bare.module(**inputs), expected) == 0.0
        assert max_diff(from_toml.module(**inputs), expected) == 0.0


def test_selection_by_name_by_regex_and_none_skips(graph):
    by_name, _ = quantize(graph, {"by": "name", "bert_encoder_layer_0_attention_self_query": LINEAR, "bert.encoder.layer.1.output.dense": LINEAR})
    assert quantized_nodes(by_name) == {"bert_encoder_layer_0_attention_self_query", "bert_encoder_layer_1_output_dense"}

    by_regex, _ = quantize(graph, {
        "by": "regex",
        r".*attention_self_(query|key)": {"config": {"name": None}},  # the first matching pattern wins
        r"bert_encoder_layer_1_.*": EVERYTHING,
    })
    layer_1 = ("attention_self_value", "attention_self_attention_core", "attention_output_dense",
               "attention_output_layer_norm", "intermediate_dense", "output_dense", "output_layer_norm")
    assert quantized_nodes(by_regex) == {f"bert_encoder_layer_1_{n}" for n in layer_1}
    norm = by_regex.module.get_submodule("bert.encoder.layer.1.output.LayerNorm")
    assert chain(norm) == [Quantizer] and chain(norm, "bias") == [Quantizer]  # layer_norm: weight_ and bias_ keys given
    assert isinstance(by_regex.module.get_submodule("bert.encoder.layer.1.attention.self.attention_core"), QuantizedAttentionCore)

    everything_but_linear, info = quantize(graph, {"by": "type", "default": EVERYTHING, "linear": {"config": {"name": None}}})
    assert info["by_type"] == {"add": 6, "layer_norm": 5, "matmul": 2, "gelu": 2, "tanh": 1}  # index arithmetic left alone
    assert not any(everything_but_linear.node(n).meta.get("graphprune.quantize", {}).get("type") == "linear" for n in quantized_nodes(everything_but_linear))
    assert len(quantizer_nodes(everything_but_linear)) == 6 * 2 + 5 + 2 + 1  # adds have two inputs


def test_quantized_attention_equals_a_hand_written_quantized_attention(graph, inputs):
    config = {"by": "type", "matmul": integer(data_in=(8, 6), weight=(8, 5))}
    quantized, info = quantize(graph, config)
    assert info["by_type"] == {"matmul": 2}
    reference = graph.copy()
    for module in reference.module.modules():
        if isinstance(module, AttentionCore):
            module.register_forward_hook(
                lambda m, args, kwargs, out: hand_attention(*args, kwargs["attn_mask"], (8, 6), (8, 5)), with_kwargs=True
            )
    with torch.no_grad():
        assert max_diff(quantized.module(**inputs), reference.module(**inputs)) <= 1e-5
        assert max_diff(quantized.module(**inputs), graph.module(**inputs)) > 1e-4
    core = quantized.module.get_submodule("bert.encoder.layer.0.attention.self.attention_core")
    assert [core.query_quantizer.prefix, core.key_quantizer.prefix, core.probs_quantizer.prefix, core.value_quantizer.prefix] == [
        "data_in", "weight", "data_in", "weight"]
    bmm, _ = quantize(graph, {"by": "type", "bmm": config["matmul"]})  # bmm selects the same matmuls
    with torch.no_grad():
        assert max_diff(bmm.module(**inputs), quantized.module(**inputs)) == 0.0


def test_identity_like_quantized_attention_equals_attention_core(graph, inputs):
    wide = {"name": "integer", "data_in_width": 60, "data_in_frac_width": 40, "weight_width": 60, "weight_frac_width": 40}
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    keep = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    keep[0, ..., 5:] = False  # padding keys
    for base in (AttentionCore(), AttentionCore(scale=0.3), AttentionCore(is_causal=True)):
        quantized = QuantizedAttentionCore.replacing(base, {n: Quantizer("integer", p, wide) for n, p in
                                                            (("query", "data_in"), ("key", "weight"), ("probs", "data_in"), ("value", "weight"))})
        masks = [None] if base.is_causal else [keep, torch.where(keep, 0.0, -1e4)]
        for mask in masks:
            assert (quantized(q, k, v, attn_mask=mask) - base(q, k, v, attn_mask=mask)).abs().max() <= 1e-6
    whole, _ = quantize(graph, {"by": "type", "matmul": {"config": wide}})
    with torch.no_grad():
        assert max_diff(whole.module(**inputs), graph.module(**inputs)) <= 1e-6


# ---- pruning, checkpoints, training -------------------------------------------------


def test_pruned_weights_stay_zero_in_either_order_and_commit(graph, inputs):
    prune = {"sparsity": 0.5, "method": "l1"}
    config = {"by": "type", "linear": LINEAR}
    prune_then_quantize, _ = graphprune.run_pipeline(graph, [("prune_weight", prune), ("quantize", config)])
    quantize_then_prune, _ = graphprune.run_pipeline(graph, [("quantize", config), ("prune_weight", prune)])
    path = "bert.encoder.layer.0.intermediate.dense"
    first, second = (g.module.get_submodule(path) for g in (prune_then_quantize, quantize_then_prune))
    assert chain(first) == [WeightMask, Quantizer] and chain(second) == [Quantizer, WeightMask]
    for module in (first, second):
        keep = mask_of(module).mask
        assert torch.all(module.weight[~keep] == 0) and int(keep.sum()) == keep.numel() // 2
        assert torch.equal(module.weight, torch.where(keep, int_q(module.parametrizations.weight.original, 8, 6), 0.0))
    # (the two masks differ: l1 after quantization ranks the quantized magnitudes)
    for pruned in (prune_then_quantize, quantize_then_prune):
        committed, _ = graphprune.run_pass(pruned, "commit_masks")  # folds masks and weight quantizers in
        module = committed.module.get_submodule(path)
        assert not parametrize.is_parametrized(module)
        assert torch.equal(module.weight, int_q(module.weight, 8, 6)) and float((module.weight == 0).float().mean()) >= 0.5
        with torch.no_grad():
            assert max_diff(committed.module(**inputs), pruned.module(**inputs)) == 0.0
    # quantizing again puts the quantizer back after the mask, and only one
    again, _ = quantize(quantize_then_prune, config)
    assert chain(again.module.get_submodule(path)) == [WeightMask, Quantizer]


def test_save_reload_is_bit_identical_with_masks_and_quantizers(graph, inputs, tmp_path):
    saved = _mixed(graph)
    saved.save(tmp_path / "q")
    loaded = graphprune.load(tmp_path / "q")
    with torch.no_grad():
        assert max_diff(loaded.module(**inputs), saved.module(**inputs)) == 0.0
    assert loaded.module.code == saved.module.code
    for path in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.LayerNorm"):
        assert chain(loaded.module.get_submodule(path)) == chain(saved.module.get_submodule(path))
    assert chain(loaded.module.get_submodule("bert.encoder.layer.0.attention.self.query")) == [WeightMask, Quantizer]
    core = loaded.module.get_submodule("bert.encoder.layer.1.attention.self.attention_core")
    assert isinstance(core, QuantizedAttentionCore) and core.probs_quantizer.format == "integer"
    assert loaded.node("add_5").meta["graphprune.quantize"] == saved.node("add_5").meta["graphprune.quantize"]
    assert loaded.meta["quantize"] == saved.meta["quantize"] and loaded.history[-1]["pass"] == "quantize"


def _mixed(graph):
    """Pruned, then quantized with a different format per op type (block formats included)."""
    graph, _ = graphprune.run_pipeline(graph, [
        ("prune_weight", {"sparsity": 0.5, "method": "l1"}),
        ("quantize", {
            "by": "type",
            "linear": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 5, "weight_width": 8,
                       "weight_frac_width": 6, "bias_width": 8, "bias_frac_width": 5},
            "matmul": integer(data_in=(8, 6), weight=(8, 5)),
            "add": {"config": {"name": "mxint8", "data_in_block_size": 16}},
            "gelu": {"config": {"name": "minifloat_ieee", "data_in_width": 8, "data_in_exponent_width": 4}},
            "layer_norm": {"config": {"name": "log", "data_in_width": 6, "weight_width": 6}},
        }),
    ])
    return graph


def test_finetuning_trains_on_the_grid_and_keeps_masks(graph):
    quantized, _ = graphprune.run_pipeline(graph, [("prune_weight", {"sparsity": 0.5, "method": "l1"}), ("quantize", {"by": "type", "linear": LINEAR})])
    module = quantized.module.get_submodule("bert.encoder.layer.0.intermediate.dense")
    before = module.parametrizations.weight.original.detach().clone()
    result = graphprune.finetune(quantized, sentiment_data(32), tiny_tokenizer(), max_steps=3, batch_size=8, learning_rate=1e-2, progress=False)
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)
    after = module.parametrizations.weight.original.detach()
    assert not torch.equal(after, before)  # straight-through gradients reach the float weights
    weight = module.weight.detach()
    assert torch.equal(weight, int_q(weight, 8, 6))  # what the layer uses is on the format's grid
    assert torch.all(weight[~mask_of(module).mask] == 0)
    assert torch.equal(module.bias.detach(), int_q(module.bias.detach(), 8, 5))


# ---- running again, metadata, summary ---------------------------------------------------


def test_running_again_replaces_and_a_none_default_changes_nothing(graph, inputs):
    eight, _ = quantize(graph, {"by": "type", "default": EVERYTHING})
    six = {"by": "type", "default": integer(data_in=(6, 3), weight=(6, 4), bias=(6, 3))}
    again, _ = quantize(eight, six)
    fresh, _ = quantize(graph, six)
    assert again.module.code == fresh.module.code and len(quantizer_nodes(again)) == len(quantizer_nodes(fresh))
    for name, module in again.module.named_modules():
        for tensor in ("weight", "bias"):
            assert chain(module, tensor).count(Quantizer) <= 1, name
    with torch.no_grad():
        assert max_diff(again.module(**inputs), fresh.module(**inputs)) == 0.0
    untouched, info = quantize(eight, {"default": {"config": {"name": None}}})
    assert info["quantized"] == 0 and same(snapshot(untouched), (*snapshot(eight)[:3], repr(untouched.history), snapshot(eight)[4]))
    one, _ = quantize(eight, {"by": "name", "gelu": six["default"]})  # others keep their quantizers
    changed = {n for n in quantized_nodes(one) if one.node(n).meta["graphprune.quantize"] != eight.node(n).meta["graphprune.quantize"]}
    assert changed == {"gelu"} and one.node("gelu").meta["graphprune.quantize"]["bits"] == {"data_in_0": 6.0}


def test_activation_pruning_and_quantization_compose(graph, inputs):
    config = {"by": "type", "linear": LINEAR}
    quantized, _ = quantize(graph, config)
    # quantize puts a Linear's input quantizer before prune_activation's nodes, so that
    # prune_activation can still replace (here: remove) them afterwards
    steps = [("prune_activation", {"sparsity": 0.5}), ("quantize", config), ("prune_activation", {"sparsity": 0.0})]
    composed, _ = graphprune.run_pipeline(graph, steps)
    assert len(quantizer_nodes(composed)) == 14 and "kthvalue" not in composed.module.code
    with torch.no_grad():
        assert max_diff(composed.module(**inputs), quantized.module(**inputs)) == 0.0


def test_average_bits_metadata_and_summary(model, graph, tmp_path, capsys):
    linear_only, _ = quantize(graph, {"by": "type", "linear": LINEAR})
    params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear))
    totals = linear_only.meta["quantize"]["totals"]
    assert totals["weight_bits"] == pytest.approx((8 * linear + 32 * (params - linear)) / params)
    assert totals["weights"] == params and totals["quantized_nodes"] == 14 and totals["formats"] == ["integer"]
    assert 8 < totals["activation_bits"] < 32
    everything, _ = quantize(graph, {"by": "type", "default": EVERYTHING})
    for row in [*everything.meta["quantize"]["layers"], everything.meta["quantize"]["totals"]]:
        assert row["activation_bits"] == 8.0  # every input of every quantizable op is on an 8-bit grid
    plain, info = graphprune.run_pass(graph, "add_quantization_metadata")
    assert info == {"weight_bits": 32.0, "activation_bits": 32.0}

    text = str(linear_only.summary())
    header, rule, *rows = text.splitlines()[1:]
    assert header.split()[-3:] == ["quant", "w_bits", "act_bits"]
    layer_0 = next(r for r in rows if r.startswith("0 ")).split()
    assert layer_0[-3] == "integer" and float(layer_0[-2]) == pytest.approx(linear_only.meta["quantize"]["layers"][0]["weight_bits"], abs=0.01)
    assert rows[0].split()[-3:] == ["-", "32", "32"]  # embeddings: nothing quantized

    saved = _mixed(graph)
    saved.save(tmp_path / "mixed")
    assert main(["info", str(tmp_path / "mixed")]) == 0
    out = capsys.readouterr().out
    assert "act_bits" in out and "integer+log+minifloat_ieee+mxint8" in out
    assert f"average bits per weight {saved.meta['quantize']['totals']['weight_bits']:.2f}" in out


# ---- bad configs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"linear": {"config": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4, "weight_widht": 8,
                                "weight_frac_width": 4, "bias_width": 8, "bias_frac_width": 4}}},
         r"field 'linear\.config\.weight_widht' = 8 is not allowed; expected a key the format knows; format 'integer' needs weight_width, weight_frac_width"),
        ({"linear": integer(data_in=(8, 4), weight=(8, 4))},
         r"field 'linear\.config\.bias_width' = None .*\(missing\).*for linear node 'bert_encoder_layer_0_attention_self_query'"),
        ({"linear": {"config": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4}}}, r"field 'linear\.config\.weight_width' = None .*\(missing\)"),
        ({"linear": {"config": {"name": "intger"}}}, r"field 'linear\.config\.name' = 'intger' is not allowed; expected one of \['binary', .*'integer'"),
        ({"linear": {"config": {"data_in_width": 8}}}, r"field 'linear\.config\.name' = None .*\(missing\)"),
        ({"by": "types", "linear": LINEAR}, r"field 'by' = 'types' is not allowed; expected one of \['name', 'regex', 'type'\]"),
        ({"linaer": LINEAR}, r"field 'linaer' .*with by = 'type', an op type: linear, matmul"),
        ({"by": "name", "bert_encoder_layer_0_attention_self_qurey": LINEAR}, r"field 'bert_encoder_layer_0_attention_self_qurey' .*a node name or module path"),
        ({"by": "regex", "(": LINEAR}, r"field '\(' .*a regular expression"),
        ({"default": {"config": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4}}},
         r"field 'default\.config\.weight_width' = None .*\(missing\).*for linear node"),
        ({"linear": {"config": {"name": "integer", "data_out_width": 8}}}, r"field 'linear\.config\.data_out_width' = 8 .*data_in_, weight_ or bias_"),
        ({"linear": {"config": {"name": "integer"}, "extra": 1}}, r"field 'linear\.extra' = 1"),
        ({"add": {"config": {"name": "integer", "data_in_width": 0, "data_in_frac_width": 4}}}, r"field 'add\.config\.data_in_width' = 0 .*an integer >= 1"),
        ({"linear": [1, 2]}, r"field 'linear' = \[1, 2\]"),
    ],
)
def test_bad_configs_name_the_field_and_change_nothing(graph, config, message):
    before, given = snapshot(graph), copy.deepcopy(config)
    with pytest.raises(ValueError, match=r"pass 'quantize': " + message):
        quantize(graph, config)
    with pytest.raises(ValueError, match=message):  # checked before anything changes, even in place
        quantize(graph, config, inplace=True)
    assert same(before, snapshot(graph)) and config == given
