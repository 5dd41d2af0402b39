"""lower: int8 weights against the symmetric per-channel formula written out here, outputs against the
float eager model, compiled kernels against the lowered graph's own reference arithmetic, checkpoints,
pruned and quantized inputs, and the errors a machine without the kernels must get."""

import pytest
import torch

import graphprune
from graphprune.ir.fx_utils import fetch_attr
from passes.quantization import lower as lower_module

from ..models import make_model, padded_inputs, sentiment_data, tiny_tokenizer, trace_once, widened_model

pytest.importorskip("torchao", reason="the lower pass needs torchao (make install provides it)")

ENCODER_LINEARS = 2 * 6  # TINY: 2 layers of q, k, v, attention output, FFN up, FFN down


def calibration(n=32):
    from graphprune.training.calibration import CalibrationData

    return CalibrationData(sentiment_data(n), tiny_tokenizer(), max_length=16, batch_size=8)


@pytest.fixture(scope="module")
def model():
    return widened_model(3)


def lowered(graph, **config):
    config = {"compile": False, **config}
    data = calibration() if config.get("precision", "int8") == "int8" and config.get("activations", "static") == "static" else None
    return graphprune.run_pass(graph, "lower", config, data=data)


def logits(graph_or_model, inputs):
    with torch.no_grad():
        return graph_or_model(**inputs).logits


def quantized_weights(graph) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (int8 weight, per-channel scale) read off the lowered graph's linear nodes."""
    found = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            weight = node.args[1]
            if weight.op == "call_function" and "dequantize_per_channel" in str(weight.target):
                q, scale = (fetch_attr(graph.module, a.target) for a in weight.args[:2])
                path = list(node.meta["nn_module_stack"].values())[-1][0]
                found[path] = (q, scale)
    return found


def test_int8_weights_are_the_symmetric_per_channel_formula(model):
    graph = trace_once(model)
    low, info = lowered(graph)
    found = quantized_weights(low)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"}
    assert info["lowered_linears"] == ENCODER_LINEARS == len(found)
    assert set(found) == set(linears)  # pooler and classifier kept in float (skip)
    for path, (q, scale) in found.items():
        w = linears[path].weight.detach()
        expected_scale = w.abs().amax(dim=1) / 127.5  # symmetric int8: max |w| over (127 - (-128)) / 2
        assert q.dtype == torch.int8
        torch.testing.assert_close(scale.float(), expected_scale, rtol=1e-6, atol=0)
        exact = w / expected_scale[:, None]
        expected_q = torch.clamp(torch.round(exact), -128, 127)
        off = q.float() != expected_q
        # torch rounds w * (1 / scale): only values within float error of a tie may land on the other side
        assert (q.float() - expected_q).abs().max() <= 1
        assert ((exact[off] - exact[off].floor() - 0.5).abs() < 1e-4).all()


def test_lowered_outputs_follow_the_float_model_and_the_callers_graph_is_untouched(model):
    graph = trace_once(model)
    before = graph.module.code
    inputs = padded_inputs(model, 3, 12)
    for activations in ("static", "dynamic"):
        low, _ = lowered(graph, activations=activations)
        out, ref = logits(low.module, inputs), logits(model, inputs)
        scale = ref.abs().max().item()
        assert (out - ref).abs().max().item() < 0.05 * scale, activations
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert graph.module.code == before and "attention_self_query" in before


@pytest.mark.skipif(lower_module._cxx_compiler() is None, reason="torch.compile's inductor needs a C++ compiler (g++)")
def test_compiled_kernels_equal_the_lowered_reference_arithmetic(model):
    graph = trace_once(model)
    reference, _ = lowered(graph)
    fast, info = graphprune.run_pass(graph, "lower", {"compile": True}, data=calibration())
    assert info["compiled"] and fast.module._compiled_call_impl is not None
    for batch, seq in ((4, 16), (2, 9)):  # a second shape runs on the same (dynamic) compilation
        inputs = padded_inputs(model, batch, seq)
        out, ref = logits(fast.module, inputs), logits(reference.module, inputs)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    out = fast.module(**inputs)  # gradients on: the lowered graph still runs, without them
    assert not out.logits.requires_grad
    with pytest.raises(RuntimeError, match="lowered .* cannot be trained"):
        fast.train()


def test_checkpoint_stores_int8_weights_and_reloads_bit_identical(model, tmp_path, capsys):
    low, info = lowered(trace_once(model))
    low.save(tmp_path / "int8")
    import safetensors.torch

    stored = safetensors.torch.load_file(tmp_path / "int8" / "model.safetensors")
    int8 = [t for t in stored.values() if t.dtype == torch.int8]
    assert len(int8) == ENCODER_LINEARS
    back = graphprune.load(tmp_path / "int8")
    assert back.meta["lowered"]["precision"] == "int8" and back.meta["runtime"]["inference_only"]
    inputs = padded_inputs(model, 2, 10)
    assert torch.equal(logits(back.module, inputs), logits(low.module, inputs))
    assert info["weight_bytes"] < info["float_weight_bytes"]
    assert "lowered: 12 Linears on int8 kernels" in str(back.summary())
    from graphprune.app.cli import main

    assert main(["info", str(tmp_path / "int8")]) == 0
    assert "lowered: 12 Linears on int8 kernels (static activation scales)" in capsys.readouterr().out


def test_int8_checkpoint_loads_in_a_fresh_process(model, tmp_path):
    """The quantized operators are registered by loading, not by an earlier lowering in the process."""
    import subprocess
    import sys

    low, _ = lowered(trace_once(model), activations="dynamic")
    low.save(tmp_path / "int8")
    inputs = padded_inputs(model, 2, 10)
    torch.save({k: v for k, v in inputs.items()}, tmp_path / "inputs.pt")
    expected = logits(low.module, inputs)
    code = (
        "import sys, torch, graphprune; g = graphprune.load(sys.argv[1]); "
        "x = torch.load(sys.argv[2]); torch.save(g.module(**x).logits, sys.argv[3])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "int8"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_masked_pruned_graph_lowers_with_its_zeros_kept(model):
    graph = trace_once(model)
    pruned, _ = graphprune.run_pass(graph, "prune_weight", {"method": "l1", "sparsity": 0.5})
    low, info = lowered(pruned)
    assert info["folded_masks"] > 0
    zeros = 0
    for q, _ in quantized_weights(low).values():
        zeros += (q == 0).sum().item()
        assert (q == 0).float().mean() >= 0.5  # every pruned weight is an int8 zero
    inputs = padded_inputs(model, 2, 10)
    ref = logits(pruned.module, inputs)
    assert (logits(low.module, inputs) - ref).abs().max() < 0.05 * ref.abs().max()


def test_structurally_pruned_graph_lowers(model):
    graph = trace_once(model)
    pruned, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {0: [1, 2]}, "min_heads": 0})
    pruned, _ = graphprune.run_pass(pruned, "remove_ffn_neurons", {"neurons": {1: list(range(0, 64, 2))}, "min_neurons": 0})
    low, _ = lowered(pruned)
    shapes = {path: tuple(q.shape) for path, (q, _) in quantized_weights(low).items()}
    assert shapes["bert.encoder.layer.0.attention.self.query"] == (16, 32)
    assert shapes["bert.encoder.layer.1.intermediate.dense"] == (32, 32)
    inputs = padded_inputs(model, 2, 10)
    ref = logits(pruned.module, inputs)
    assert (logits(low.module, inputs) - ref).abs().max() < 0.05 * ref.abs().max()


def test_simulated_quantization_is_folded_then_replaced(model):
    graph = trace_once(model)
    entry = {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4, "weight_width": 8,
             "weight_frac_width": 4, "bias_width": 8, "bias_frac_width": 4}
    simulated, _ = graphprune.run_pass(graph, "quantize", {"by": "type", "linear": {"config": entry}, "matmul": {"config": entry}})
    low, info = lowered(simulated)
    assert info["removed_simulated_quantizers"] > 0
    assert "quantize" not in low.meta
    # The int8 weights come from the 8-bit fixed-point weights the simulated graph used.
    query = next(m for n, m in simulated.module.named_modules() if n == "bert.encoder.layer.0.attention.self.query")
    q, scale = quantized_weights(low)["bert.encoder.layer.0.attention.self.query"]
    torch.testing.assert_close(scale, query.weight.detach().abs().amax(dim=1) / 127.5, rtol=1e-6, atol=0)


def test_bf16_linears_compute_in_bf16(model):
    graph = trace_once(model)
    low, info = lowered(graph, precision="bf16", allow_emulated_bf16=True)
    assert info["lowered_linears"] == ENCODER_LINEARS
    bf16 = [n for n in low.module.graph.nodes if n.op == "get_attr" and fetch_attr(low.module, n.target).dtype == torch.bfloat16]
    assert len(bf16) >= ENCODER_LINEARS  # weights (and biases) stored in bf16
    inputs = padded_inputs(model, 2, 10)
    ref = logits(model, inputs)
    out = logits(low.module, inputs)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_missing_kernels_are_errors_naming_what_is_missing(model, monkeypatch):
    graph = trace_once(model)
    before = graph.module.code
    monkeypatch.setattr(lower_module, "cpu_flags", lambda: {"avx2", "avx512f"})
    with pytest.raises(Exception, match="avx512_bf16"):
        graphprune.run_pass(graph, "lower", {"precision": "bf16"})
    monkeypatch.setattr(lower_module, "_cxx_compiler", lambda: None)
    with pytest.raises(Exception, match="C\\+\\+ compiler"):
        graphprune.run_pass(graph, "lower", {"compile": True}, data=calibration())
    with pytest.raises(Exception, match="calibration data"):
        graphprune.run_pass(graph, "lower", {"compile": False})
    assert graph.module.code == before


@pytest.mark.parametrize(
    "config, field",
    [({"precision": "int4"}, "precision"), ({"activations": "weekly"}, "activations"),
     ({"precision": "bf16", "activations": "dynamic"}, "activations"), ({"num_samples": 0}, "num_samples")],
)
def test_bad_configs_name_the_field(model, config, field):
    with pytest.raises(ValueError, match=f"lower.*{field}"):
        graphprune.run_pass(trace_once(model), "lower", config)
