"""lower: int8 weights against the symmetric per-channel formula written out here, outputs against the
float eager model, compiled kernels against the lowered graph's own reference arithmetic, checkpoints,
pruned and quantized inputs, and the errors a machine without the kernels must get."""

import pytest
import torch

import graphprune
from graphprune.ir import cpu
from graphprune.ir.cpu import SCHEMES
from graphprune.ir.fx_utils import fetch_attr
from graphprune.passes.quantization import lower as lower_module

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


@pytest.mark.parametrize("scheme", ["auto", *SCHEMES])
def test_int8_weights_are_the_symmetric_per_channel_formula(model, scheme, recwarn):
    graph = trace_once(model)
    low, info = lowered(graph, scheme=scheme)
    assert info["scheme"] == (cpu.int8_scheme() if scheme == "auto" else scheme)
    found = quantized_weights(low)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"}
    assert info["lowered_linears"] == ENCODER_LINEARS == len(found)
    assert set(found) == set(linears)  # pooler and classifier kept in float (skip)
    low_q, high_q = SCHEMES[info["scheme"]]["weights"]  # -128..127, or -64..63 for u8s7
    for path, (q, scale) in found.items():
        w = linears[path].weight.detach()
        expected_scale = w.abs().amax(dim=1) / ((high_q - low_q) / 2)  # symmetric: max |w| over half the range
        assert q.dtype == torch.int8
        torch.testing.assert_close(scale.float(), expected_scale, rtol=1e-6, atol=0)
        exact = w / expected_scale[:, None]
        expected_q = torch.clamp(torch.round(exact), low_q, high_q)
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


needs_compiler = pytest.mark.skipif(lower_module.cxx_compiler() is None, reason="torch.compile's inductor needs a C++ compiler (g++)")


def onednn_int8_linear(x_q: torch.Tensor, x_scale: float, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """oneDNN's u8 x s8 Linear, the kernel inductor fuses a lowered Linear into (fp32 out)."""
    packed = torch.ops.onednn.qlinear_prepack(w_q, list(x_q.shape))
    zero_points = torch.zeros(len(w_q), dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(x_q, x_scale, 0, packed, w_scale, zero_points, None, 1.0, 0, torch.float32, "none", [], "")


def test_the_chosen_scheme_is_exact_on_this_cpus_int8_kernels():
    """The scheme ``lower`` picks for the ISA oneDNN dispatches to, on the worst case for int16 pair sums.

    Oracle: the integer products summed exactly (float64 holds them), times the scales. An
    exact kernel is off by fp32 rounding alone; a saturating one by a large fraction of the output.
    """
    scheme = cpu.int8_scheme()
    top = SCHEMES[scheme]["activations"][1]
    low_q, high_q = SCHEMES[scheme]["weights"]
    assert lower_module._int8_scheme(lower_module.LowerConfig(), cpu.onednn_isa()) == scheme
    torch.manual_seed(0)
    x_q = torch.randint(top - 8, top + 1, (16, 256), dtype=torch.uint8)  # activations at the top of the scheme's range
    w_q = torch.full((64, 256), high_q, dtype=torch.int8)  # weights at both ends of it
    w_q[32:] = low_q
    w_scale = 0.001 + 0.01 * torch.rand(64)
    out = onednn_int8_linear(x_q, 0.05, w_q, w_scale).double()
    exact = (x_q.double() @ w_q.double().T) * 0.05 * w_scale.double()
    assert (out - exact).abs().max() <= 4 * torch.finfo(torch.float32).eps * exact.abs().max()


def test_eight_bit_values_saturate_without_vnni_and_seven_bit_ones_do_not(tmp_path):
    """Why the scheme matters: under ONEDNN_MAX_CPU_ISA=AVX2 (a fresh process) the kernel on u8 x s8 is far off,
    on u7 x s8 and u8 x s7 exact."""
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "saturate.py"
    script.write_text(textwrap.dedent('''
        import torch
        from graphprune.ir import cpu
        torch.manual_seed(0)
        rows = []
        for name, scheme in cpu.SCHEMES.items():
            top, low = scheme["activations"][1], scheme["weights"][0]
            x_q = torch.full((4, 64), top, dtype=torch.uint8)
            w_q = torch.full((8, 64), low, dtype=torch.int8)
            packed = torch.ops.onednn.qlinear_prepack(w_q, [4, 64])
            out = torch.ops.onednn.qlinear_pointwise(x_q, 1.0, 0, packed, torch.ones(8), torch.zeros(8, dtype=torch.long),
                                                     None, 1.0, 0, torch.float32, "none", [], "")
            rows.append(f"{name}={out.double().min().item() / (top * low * 64)}")
        print(cpu.onednn_isa(), cpu.int8_scheme(), *rows)
    '''))
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True)
    isa, scheme, *rows = done.stdout.split()
    ratios = {name: float(value) for name, value in (row.split("=") for row in rows)}
    assert (isa, scheme) == ("avx2", cpu.NON_VNNI_SCHEME)
    assert ratios["u7s8"] == pytest.approx(1.0, abs=1e-6)  # 127 * 128 * 2 fits int16
    assert ratios["u8s7"] == pytest.approx(1.0, abs=1e-6)  # 255 * 64 * 2 fits int16
    assert ratios["u8s8"] < 0.6  # 255 * 128 * 2 does not: pair sums clamp at -32768
    assert {name for name in SCHEMES if cpu.pair_sum_bound(name) <= cpu.INT16_MAX} == {"u7s8", "u8s7"}


@needs_compiler
def test_compiled_kernels_equal_the_lowered_reference_arithmetic(model):
    """The compiled int8 graph adds less error to the reference arithmetic than the scheme's own rounding does.

    Where the kernels are exact (the scheme suits the ISA) the two agree to fp32 rounding,
    except where that rounding moves a value across a rounding boundary of the next
    quantizer: one step of one activation. Saturating kernels move every output by more
    than the whole quantization error (reference against fp32).
    """
    graph = trace_once(model)
    reference, _ = lowered(graph)
    fast, info = graphprune.run_pass(graph, "lower", {"compile": True}, data=calibration())
    assert info["compiled"] and fast.module._compiled_call_impl is not None
    for batch, seq in ((4, 16), (2, 9)):  # a second shape runs on the same (dynamic) compilation
        inputs = padded_inputs(model, batch, seq)
        out, ref, fp32 = logits(fast.module, inputs), logits(reference.module, inputs), logits(model, inputs)
        assert (out - ref).abs().max() <= 0.5 * (ref - fp32).abs().max(), (batch, seq)
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


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_a_layer_with_every_head_removed_lowers_and_compiles(model, activations):
    """Its attention output projection has no inputs (it only adds its bias): compiled int8 and freezing
    cannot pre-pack an empty weight, so lower replaces the call by the bias it computes."""
    graph = trace_once(model)
    heads = model.config.num_attention_heads
    pruned, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {0: list(range(heads))}, "min_heads": 0})
    assert fetch_attr(pruned.module, "bert.encoder.layer.0.attention.output.dense").in_features == 0
    low, info = lowered(pruned, compile=True, activations=activations)
    assert info["lowered_linears"] == ENCODER_LINEARS - 4  # layer 0's q, k, v and output projection are gone
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
    low_q, high_q = SCHEMES[info["scheme"]]["weights"]
    torch.testing.assert_close(scale, query.weight.detach().abs().amax(dim=1) / ((high_q - low_q) / 2), rtol=1e-6, atol=0)


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
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "avx512f"})
    # what the machine lacks: a LowerError, which run_pass reports as the pass failing
    with pytest.raises(graphprune.PassError, match="pass 'lower' failed: LowerError: .*native bf16.*avx512_bf16") as missing:
        graphprune.run_pass(graph, "lower", {"precision": "bf16"})
    assert type(missing.value.__cause__) is lower_module.LowerError
    monkeypatch.setattr(lower_module, "cxx_compiler", lambda: None)
    with pytest.raises(graphprune.PassError, match="pass 'lower' failed: LowerError: .*C\\+\\+ compiler.*compile = false") as missing:
        graphprune.run_pass(graph, "lower", {"compile": True}, data=calibration())
    assert type(missing.value.__cause__) is lower_module.LowerError
    # what the caller left out: a ValueError, as for a bad config
    with pytest.raises(ValueError, match=r"^lower \(static int8\) needs calibration data: pass data=") as missing:
        graphprune.run_pass(graph, "lower", {"compile": False})
    assert type(missing.value) is ValueError
    assert graph.module.code == before


@pytest.mark.parametrize(
    "config, field",
    [({"precision": "int4"}, "precision"), ({"activations": "weekly"}, "activations"),
     ({"precision": "bf16", "activations": "dynamic"}, "activations"), ({"num_samples": 0}, "num_samples"),
     ({"scheme": "u4s4"}, "scheme"), ({"precision": "bf16", "scheme": "u8s8"}, "scheme")],
)
def test_bad_configs_name_the_field(model, config, field):
    with pytest.raises(ValueError, match=f"lower.*{field}"):
        graphprune.run_pass(trace_once(model), "lower", config)


def test_lowered_graph_records_its_scheme_and_warns_when_loaded_where_another_is_needed(model, tmp_path, monkeypatch, capsys):
    low, info = lowered(trace_once(model), scheme="u8s8")
    assert low.meta["lowered"]["scheme"] == info["scheme"] == "u8s8" and low.meta["lowered"]["isa"] == cpu.onednn_isa()
    low.save(tmp_path / "int8")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # as loaded on an AVX2-only CPU (read again on every call)
    with pytest.warns(graphprune.LoweredForAnotherCPU, match="without VNNI or AMX.*re-lower.*picks scheme (u7s8|u8s7)"):
        back = graphprune.load(tmp_path / "int8")
    inputs = padded_inputs(model, 2, 10)
    assert torch.equal(logits(back.module, inputs), logits(low.module, inputs))  # eager reference arithmetic: same numbers
    from graphprune.app.cli import main

    assert main(["info", str(tmp_path / "int8")]) == 0
    assert "int8 scheme: u8s8, chosen for oneDNN ISA" in capsys.readouterr().out
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    if cpu.int8_scheme() == "u8s8":  # loaded back where it was made: no warning
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", graphprune.LoweredForAnotherCPU)
            graphprune.load(tmp_path / "int8")


def test_scheme_follows_the_isa_cap(model, monkeypatch):
    zen5 = {"sse4_1", "avx", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
    monkeypatch.setattr(cpu, "cpu_flags", lambda: zen5)
    monkeypatch.setattr(cpu, "is_x86_64", lambda: True)
    expected = {
        None: ("avx512_core_bf16", "u8s8"), "DEFAULT": ("avx512_core_bf16", "u8s8"), "AVX2": ("avx2", cpu.NON_VNNI_SCHEME),
        "AVX2_VNNI": ("avx2_vnni", "u8s8"), "AVX512_CORE": ("avx512_core", cpu.NON_VNNI_SCHEME),
        "avx512_core_vnni": ("avx512_core_vnni", "u8s8"), "AVX512_CORE_AMX": ("avx512_core_bf16", "u8s8"),
    }
    for cap, (isa, scheme) in expected.items():
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert (cpu.onednn_isa(), cpu.int8_scheme()) == (isa, scheme), cap
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"sse4_1", "avx", "avx2", "fma"})  # the Zen 3
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert (cpu.onednn_isa(), cpu.int8_scheme(), cpu.native_bf16()) == ("avx2", cpu.NON_VNNI_SCHEME, False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "SSE41")  # the legacy name
    assert cpu.onednn_isa() == "sse41"
    with pytest.warns(UserWarning, match="scheme 'u8s8' on this CPU.*saturate"):
        low, info = lowered(trace_once(model), scheme="u8s8", activations="dynamic")
    assert info["scheme"] == "u8s8"


def test_a_cpu_that_is_not_x86_gets_a_clear_error_and_the_rest_works(model, monkeypatch):
    import platform

    graph = trace_once(model)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu.onednn_isa() is None and not cpu.is_x86_64()
    with pytest.raises(graphprune.PassError, match="LowerError.*x86-64.*aarch64"):
        graphprune.run_pass(graph, "lower", {"compile": False}, data=calibration())
    pruned, _ = graphprune.run_pass(graph, "prune_weight", {"method": "l1", "sparsity": 0.5})
    assert cpu.cpu_description()["onednn_isa"] is None
    rows = {row["layer"]: row for row in pruned.summary().rows}
    assert [rows[layer]["weight_sparsity"] for layer in ("0", "1", "head")] == [0.5, 0.5, 0.0]
    assert [(rows[layer]["heads"], rows[layer]["ffn_width"]) for layer in ("0", "1")] == [(4, 64), (4, 64)]  # unstructured
    linears = [m for m in pruned.module.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert rows["total"]["weight_sparsity"] == pytest.approx(zeros, abs=1e-4) and zeros > 0.45  # the head's weights are dense
    assert "lowered" not in str(pruned.summary())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_reports_the_isa_we_detect():
    """Our reading of the flags and the cap against oneDNN's own word, asked in a fresh process."""
    said = cpu.dispatched_isa()
    isa = cpu.onednn_isa()
    assert said is not None
    if isa in cpu.ONEDNN_NAMES:  # the levels above these have names that vary between oneDNN versions
        assert said.split(" on Ymm")[0].strip() == cpu.ONEDNN_NAMES[isa], (isa, said)


def test_a_graph_off_the_cpu_is_refused_by_name(model):
    graph = trace_once(model).to("meta")  # the stand-in for a GPU: lower needs the CPU's kernels
    with pytest.raises(graphprune.PassError, match="lowers onto CPU kernels and the graph is on meta.*graph.to\\('cpu'\\)"):
        graphprune.run_pass(graph, "lower", {"compile": False, "activations": "dynamic"})


def test_the_load_warning_says_what_this_cpu_needs(monkeypatch):
    from graphprune.ir.runtime import machine_mismatch

    zen5 = {"sse4_1", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
    monkeypatch.setattr(cpu, "cpu_flags", lambda: zen5)
    monkeypatch.setattr(cpu, "is_x86_64", lambda: True)
    lowered = lambda **kw: {"lowered": {"precision": "int8", "cpu": "a CPU", "isa": "avx2", **kw}}  # noqa: E731
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "saturate" in machine_mismatch(lowered(scheme="u8s8"))
    assert "saturate" in machine_mismatch(lowered())  # written before schemes: 8-bit activations and weights
    assert machine_mismatch(lowered(scheme="u7s8")) is None and machine_mismatch(lowered(scheme="u8s7")) is None  # both exact
    assert "emulated" in machine_mismatch({"lowered": {"precision": "bf16"}})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert machine_mismatch(lowered(scheme="u8s8")) is None
    assert "runs correctly" in machine_mismatch(lowered(scheme="u8s7"))
    assert machine_mismatch({"lowered": {"precision": "bf16"}}) is None and machine_mismatch({}) is None
