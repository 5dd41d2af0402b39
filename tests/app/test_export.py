"""Exports: each format on uneven tiny graphs, checked again here in its own runtime; errors; nothing half-written.

The oracle for every artefact is the graph itself (for the headless encoder's pooled
embedding, a mean computed here by hand; for dynamic int8 ONNX, the int8 arithmetic
written out here in torch, ``int8_reference``), compared on inputs the export's own
check did not use, through the artefact's runtime: onnxruntime's InferenceSession,
``torch._inductor.aoti_load_package`` and ``from_pretrained``, called directly.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers as tf

import graphprune
from graphprune.app.export import artefact as artefact_module
from graphprune.app.export import verify as verify_module
from graphprune.ir.errors import ExportError
from graphprune.ir.runtime import cxx_compiler
from tests.models import TINY, make_model, trace_once

pytest.importorskip("onnxruntime")
needs_compiler = pytest.mark.skipif(cxx_compiler() is None, reason="AOTInductor and lower compile C++ (g++)")


def uneven_graph():
    """3 layers; heads 3, 2 and 4 of 4; FFN widths 54, 64, 60; then the last layer removed."""
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**{**TINY, "num_hidden_layers": 3})).eval()
    graph = graphprune.trace(model)
    graph, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {0: [1], 1: [0, 3]}})
    graph, _ = graphprune.run_pass(graph, "remove_ffn_neurons", {"neurons": {0: list(range(10)), 2: [1, 2, 3, 4]}})
    graph, _ = graphprune.run_pass(graph, "remove_layers", {"layers": [2]})
    return graph


@pytest.fixture(scope="module")
def uneven():
    return uneven_graph()


def fresh_inputs(rows=3, length=21, seed=7, with_types=True):
    generator = np.random.default_rng(seed)
    ids = generator.integers(1, TINY["vocab_size"], size=(rows, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 12:] = 0
    given = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        given["token_type_ids"] = np.zeros_like(ids)
    return given


def graph_logits(graph, given, field="logits"):
    with torch.no_grad():
        return graph.module(**{k: torch.from_numpy(v) for k, v in given.items()})[field].numpy()


def onnx_run(folder, given, outputs=None):
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(outputs, given)


def test_onnx_fp32_of_an_uneven_graph(uneven, tmp_path):
    manifest = uneven.export(tmp_path / "fp32", format="onnx")
    folder = tmp_path / "fp32"
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and manifest["outputs"] == ["logits"]
    assert manifest["verification"]["fresh_process"] and not manifest["verification"]["graphprune_imported"]
    assert manifest["verification"]["max_abs_diff"] <= 1e-4
    assert [step["pass"] for step in manifest["passes"]] == ["remove_heads", "remove_ffn_neurons", "remove_layers"]
    assert json.loads((folder / "artefact.json").read_text()) == manifest
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", "sequence"]] * 3
    for rows, length in ((1, 5), (6, 50)):
        given = fresh_inputs(rows, length)
        np.testing.assert_allclose(onnx_run(folder, given)[0], graph_logits(uneven, given), atol=1e-4)


FLOAT_HEADS = ("bert.pooler", "pre_classifier", "classifier")  # what the ONNX int8 export documents it leaves float


def with_a_strong_head(graph, given, pooler="bert.pooler.dense"):
    """A copy of ``graph`` whose head has unit-gain weights, its classes centred to split ``given`` in half.

    The random tiny encoder's own logits are about 0.02 wide: too small for a zero or
    negated artefact to fail a comparison against them, and every row would fall in one class.
    """
    graph = graph.copy()
    module = graph.module
    torch.manual_seed(1)
    with torch.no_grad():
        dense = module.get_submodule(pooler)
        dense.weight.normal_(0, dense.in_features**-0.5)
        module.classifier.weight.normal_(0, 1.0)
        module.classifier.bias.zero_()
        logits = torch.from_numpy(graph_logits(graph, given))
        module.classifier.bias[1] = -(logits[:, 1] - logits[:, 0]).median()
    return graph


def int8_reference(graph, weight_levels: int, embeddings: bool = True):
    """The dynamic int8 arithmetic ONNX Runtime is asked for, written out here on a copy of the graph's module.

    Every Linear outside the float heads: its weight symmetric per output channel (the largest
    |w| of a channel to ``weight_levels``), its input asymmetric uint8 over the whole tensor of
    each call (the range stretched to hold 0, zero point rounded into 0..255). With
    ``embeddings``, the word embeddings too: int8 per row, the largest |w| of a row to 127.
    """
    module = copy.deepcopy(graph.module)

    def symmetric(weight, levels):
        scale = weight.abs().amax(dim=1, keepdim=True) / levels
        return torch.clamp(torch.round(weight / scale), -levels, levels) * scale

    def uint8_per_call(_, args):
        x = args[0]
        low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        scale = (high - low) / 255
        zero = float(np.clip(np.round(-low / scale), 0, 255))
        return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale, *args[1:]

    with torch.no_grad():
        for name, sub in module.named_modules():
            if name.endswith("word_embeddings") and embeddings:
                sub.weight.copy_(symmetric(sub.weight, 127))
            elif isinstance(sub, torch.nn.Linear) and not any(name == h or name.startswith(h + ".") for h in FLOAT_HEADS):
                sub.weight.copy_(symmetric(sub.weight, weight_levels))
                sub.register_forward_pre_hook(uint8_per_call)
    return module


def int8_weight_levels(folder) -> set[int]:
    """The largest |q| of each output channel of the artefact's int8 Linear weights (the embedding rows left out)."""
    import onnx
    from onnx import numpy_helper

    levels = set()
    for init in onnx.load(str(folder / "model.onnx")).graph.initializer:
        q = numpy_helper.to_array(init)
        if q.dtype == np.int8 and q.ndim == 2 and not init.name.endswith("_int8_rows"):
            levels |= set(np.abs(q.astype(np.int32)).max(axis=0).tolist())  # MatMul weights are [in, out]
    return levels


def expected_weight_levels():
    """127 where the CPU accumulates u8 x s8 in int32 (VNNI, AMX), else 64: 7-bit weights, whose pair sums fit int16."""
    return 127 if graphprune.ir.cpu.int8_accumulates_in_int32() else 64


def assert_int8_near(got, want):
    """int8 is not the float arithmetic, but it keeps the logits (within 5% of the largest) and every clear prediction."""
    largest = np.abs(want).max()
    assert np.abs(got - want).max() < 0.05 * largest
    clear = np.abs(want[:, 1] - want[:, 0]) > 0.1 * largest
    assert clear.mean() >= 0.25 and (got.argmax(1) == want.argmax(1))[clear].all()


def assert_the_int8_arithmetic(got, reference, want):
    """``got`` is ``reference`` up to the order of float operations: within 2% of how far int8 puts it from the graph.

    Measured: at most 0.14% on the tiny models here; 7-bit weights where 8-bit ones are expected
    (or the reverse) land 6% or more away, the fp32 graph 100%.
    """
    assert np.abs(got - reference).max() <= 0.02 * np.abs(reference - want).max()


def test_onnx_int8_dynamic_computes_the_int8_arithmetic_and_static_stays_near_the_graph(uneven, tmp_path):
    data = [{"input_ids": list(np.random.default_rng(i).integers(1, 120, size=12)), "labels": i % 2} for i in range(16)]
    given = fresh_inputs(64, 30)
    graph = with_a_strong_head(uneven, given)
    want = graph_logits(graph, given)
    assert 24 <= (want.argmax(1) == 1).sum() <= 40 and np.abs(want).max() > 1  # both classes, logits of some size
    for mode in ("dynamic", "static"):
        manifest = graph.export(tmp_path / mode, format="onnx", quantize=mode, data=data if mode == "static" else None)
        assert manifest["precision"] == "int8" and manifest["quantize"] == mode
        assert manifest["scheme"] == {127: "u8s8", 64: "u8s7"}[expected_weight_levels()]
        # 6 Linears in each of the 2 kept layers and the word embeddings; static keeps the FFN down-projections float
        assert manifest["quantized_nodes"] == {"dynamic": 13, "static": 11}[mode]
        assert int8_weight_levels(tmp_path / mode) == {expected_weight_levels()}
        got = onnx_run(tmp_path / mode, given)[0]
        assert_int8_near(got, want)
    with torch.no_grad():
        reference = int8_reference(graph, expected_weight_levels())(**{k: torch.from_numpy(v) for k, v in given.items()}).logits.numpy()
    assert_the_int8_arithmetic(onnx_run(tmp_path / "dynamic", given)[0], reference, want)
    import onnx

    static = onnx.load(str(tmp_path / "static" / "model.onnx")).graph.node
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in static}
    # static int8 means calibrated int8 activations too: every Linear with int8 weights reads a dequantized input,
    # including those fed by ONNX Runtime's fused SkipLayerNormalization (untyped unless shapes are inferred for it)
    producer = {out: n.op_type for n in static for out in n.output}
    int8_linears = [n for n in static if n.op_type in ("MatMul", "Gemm") and producer.get(n.input[1]) == "DequantizeLinear"]
    assert len(int8_linears) == 10
    assert [n.name for n in int8_linears if producer.get(n.input[0]) != "DequantizeLinear"] == []
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dynamic" / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops


@needs_compiler
def test_aoti_fp32_and_lowered_int8(uneven, tmp_path):
    manifest = uneven.export(tmp_path / "fp32", format="aoti")
    assert manifest["precision"] == "fp32" and manifest["verification"]["max_abs_diff"] <= 1e-4
    package = torch._inductor.aoti_load_package(str(tmp_path / "fp32" / "model.pt2"))
    given = fresh_inputs(5, 33)
    with torch.no_grad():
        got = package(*[torch.from_numpy(given[k]) for k in manifest["inputs"]])
    np.testing.assert_allclose(got.numpy(), graph_logits(uneven, given), atol=1e-4)

    lowered, _ = graphprune.run_pass(uneven, "lower", {"activations": "dynamic"})
    manifest = lowered.export(tmp_path / "int8", format="aoti")
    assert manifest["precision"] == "int8" and manifest["scheme"] == lowered.meta["lowered"]["scheme"]
    package = torch._inductor.aoti_load_package(str(tmp_path / "int8" / "model.pt2"))
    with torch.no_grad():
        got = package(*[torch.from_numpy(given[k]) for k in manifest["inputs"]])
        want = lowered.module(**{k: torch.from_numpy(v) for k, v in given.items()}).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-3)  # the same int8 kernels, compiled twice


def test_hf_folder_of_layers_removed_and_one_ffn_width(tmp_path):
    torch.manual_seed(0)
    graph = graphprune.trace(tf.BertForSequenceClassification(tf.BertConfig(**{**TINY, "num_hidden_layers": 3})).eval())
    graph, _ = graphprune.run_pass(graph, "remove_layers", {"layers": [1]})
    graph, _ = graphprune.run_pass(graph, "remove_ffn_neurons", {"neurons": {0: list(range(16)), 1: list(range(8, 24))}})
    graph, _ = graphprune.run_pass(graph, "prune_weight", {"method": "magnitude", "sparsity": 0.5})  # masks, committed on export
    manifest = graph.export(tmp_path / "hf", format="hf")
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 48
    given = fresh_inputs(4, 19)
    with torch.no_grad():
        got = model(**{k: torch.from_numpy(v) for k, v in given.items()}).logits.numpy()
    np.testing.assert_allclose(got, graph_logits(graph, given), atol=1e-5)
    assert manifest["hf_class"] == "BertForSequenceClassification"


def test_hf_refuses_what_a_stock_config_cannot_say(uneven, tmp_path):
    with pytest.raises(ExportError, match=r"export hf: .*heads were removed \(layer 0: 3; layer 1: 2 of 4\).*FFN widths differ.*'onnx' or 'aoti'"):
        uneven.export(tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


def test_headless_encoder_exports_hidden_states_and_the_mean_pooled_embedding(tmp_path):
    graph = trace_once(make_model("BertModel"))
    manifest = graph.export(tmp_path / "embed", format="onnx", pooling="mean")
    assert manifest["outputs"] == ["last_hidden_state", "sentence_embedding"] and manifest["task"] is None
    given = fresh_inputs(3, 14)
    hidden, pooled = onnx_run(tmp_path / "embed", given)
    want = graph_logits(graph, given, "last_hidden_state")
    np.testing.assert_allclose(hidden, want, atol=1e-4)
    mask = given["attention_mask"][..., None]
    np.testing.assert_allclose(pooled, (want * mask).sum(1) / mask.sum(1), atol=1e-4)
    hf = graph.export(tmp_path / "embed-hf", format="hf", pooling="mean")
    assert hf["outputs"] == ["last_hidden_state", "sentence_embedding"]


def test_headless_encoder_lowers_on_labelled_calibration_data():
    graph = trace_once(make_model("BertModel"))
    data = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": 1}, {"input_ids": [11, 12, 13, 14, 15, 16], "labels": 0}]
    lowered, info = graphprune.run_pass(graph, "lower", {"compile": False}, data=data)
    assert info["calibration_samples"] == 2 and info["lowered_linears"] == 12


def test_a_model_without_token_types_exports_int8_that_computes_the_int8_arithmetic(tmp_path):
    given = fresh_inputs(16, 9, with_types=False)
    graph = with_a_strong_head(trace_once(make_model("DistilBertForSequenceClassification")), given, "pre_classifier")
    manifest = graph.export(tmp_path / "distil", format="onnx", quantize="dynamic")
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    # ONNX Runtime's optimizer fuses DistilBERT's embeddings into EmbedLayerNormalization, whose table stays
    # float: the 12 Linears are int8, the word embeddings are not
    assert manifest["quantized_nodes"] == 12 and manifest["optimizer"]["fused"].get("EmbedLayerNormalization") == 1
    got = onnx_run(tmp_path / "distil", given)[0]
    want = graph_logits(graph, given)
    assert got.shape == (16, 2)
    assert_int8_near(got, want)
    with torch.no_grad():
        reference = int8_reference(graph, expected_weight_levels(), embeddings=False)(
            **{k: torch.from_numpy(v) for k, v in given.items()}).logits.numpy()
    assert_the_int8_arithmetic(got, reference, want)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"format": "tflite"}, r"export: format 'tflite' is not one of: aoti, hf, onnx"),
        ({"format": "onnx", "quantize": "int4"}, r"export onnx: quantize 'int4' is not one of: none, 'dynamic', 'static'"),
        ({"format": "onnx", "quantize": "static"}, r"export onnx: quantize = 'static' needs calibration data"),
        ({"format": "onnx", "scheme": "u7s8"}, r"export onnx: scheme 'u7s8' is not one of: 'auto', 'u8s8', 'u8s7'"),
        ({"format": "onnx", "pooling": "mean"}, r"export onnx: pooling 'mean' is for headless encoders"),
        ({"format": "aoti", "pooling": "max"}, r"export aoti: pooling 'max' is not one of: none, 'mean'"),
    ],
)
def test_bad_options_are_clear_errors_and_write_nothing(options, message, tmp_path):
    graph = trace_once(make_model())
    with pytest.raises(ExportError, match=message):
        graph.export(tmp_path / "out", **options)
    assert list(tmp_path.iterdir()) == []


def test_a_lowered_graph_does_not_go_to_onnx(tmp_path):
    lowered, _ = graphprune.run_pass(trace_once(make_model()), "lower", {"activations": "dynamic", "compile": False})
    with pytest.raises(ExportError, match=r"export onnx: the graph was lowered .*quantize = 'dynamic' or 'static'.*format 'aoti'"):
        lowered.export(tmp_path / "out", format="onnx")


def test_a_failed_check_leaves_the_earlier_artefact_and_no_staging(tmp_path, monkeypatch):
    graph = trace_once(make_model())
    target = tmp_path / "art"
    first = graph.export(target, format="onnx", optimize=False)

    def broken(*args, **kwargs):
        raise ExportError("export onnx: the artefact's outputs differ from the graph's by 1 (allowed 0.0001)")

    monkeypatch.setattr(verify_module, "compare", broken)
    with pytest.raises(ExportError, match="differ from the graph's"):
        graph.export(target, format="onnx", quantize="dynamic")
    assert json.loads((target / "artefact.json").read_text()) == first  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging folder left behind


def test_refuses_to_overwrite_a_folder_that_is_not_an_artefact(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not a graphprune artefact folder; refusing to overwrite it"):
        trace_once(make_model()).export(tmp_path / "mine", format="onnx")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_check_catches_an_artefact_that_is_off(tmp_path):
    reference = {"a": {"logits": np.zeros((2, 2), np.float32)}}
    with pytest.raises(ExportError, match=r"differ from the graph's by 0\.001 \(allowed 0\.0001\)"):
        verify_module.compare(reference, {"a/logits": np.full((2, 2), 1e-3, np.float32)}, exact=True, caller="export onnx")
    report = verify_module.compare(reference, {"a/logits": np.array([[0.0, 1e-3], [0.0, 0.0]], np.float32)}, exact=False, caller="x")
    assert report["argmax_agreement"] == 0.5
    with pytest.raises(ExportError, match="shape"):
        verify_module.compare(reference, {"a/logits": np.zeros((2, 3), np.float32)}, exact=False, caller="x")


def test_record_accuracy_rewrites_the_manifest_whole(tmp_path):
    graph = trace_once(make_model())
    graph.export(tmp_path / "art", format="onnx", optimize=False)
    artefact_module.record_accuracy(tmp_path / "art", "rotten_tomatoes/test", {"accuracy": 0.5})
    manifest = json.loads((tmp_path / "art" / "artefact.json").read_text())
    assert manifest["accuracy"] == {"rotten_tomatoes/test": {"accuracy": 0.5}}
    assert sorted(p.name for p in (tmp_path / "art").iterdir() if p.name.startswith(".")) == []


def test_the_transformer_optimizer_is_kept_only_where_its_outputs_agree(tmp_path, monkeypatch):
    graph = trace_once(make_model())
    used = graph.export(tmp_path / "fused", format="onnx")["optimizer"]
    assert used["used"] and used["fused"] and used["max_abs_diff"] <= 1e-4
    from graphprune.app.export import onnx_optimize

    monkeypatch.setattr(onnx_optimize, "FLOAT_TOLERANCE", -1.0)  # no fused graph can agree now
    manifest = graph.export(tmp_path / "plain", format="onnx")
    assert not manifest["optimizer"]["used"] and "left unfused" in manifest["optimizer"]["reason"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "plain" / "model.onnx")).graph.node}
    assert "SkipLayerNormalization" not in ops and manifest["verification"]["max_abs_diff"] <= 1e-4


def test_embedding_rows_are_int8_with_a_scale_each():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from graphprune.app.export.onnx_embeddings import quantize_embedding_rows

    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32) * np.linspace(0.01, 3, 50, dtype=np.float32)[:, None]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], name="lookup", axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", 8])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_embedding_rows(model, {"lookup"}) == 1
    onnx.checker.check_model(model)
    ids = np.array([[0, 49, 7], [3, 3, 20]], dtype=np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    scale = np.abs(table).max(axis=1, keepdims=True) / 127  # the formula, written out here
    want = (np.clip(np.round(table / scale), -127, 127) * scale)[ids]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.abs(got - table[ids]).max() <= (scale[ids] / 2).max() + 1e-7  # within half a step of each row's own scale
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert stored["table_int8_rows"].dtype == np.int8 and "table" not in stored
