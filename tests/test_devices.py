"""Graphs off the CPU: the ``meta`` device stands in for a GPU.

A graph moved with ``Graph.to("meta")`` has no values, so everything that only needs
shapes runs on it: the forward pass, the analysis passes, ``summary()``, the
structural passes with explicit selections, inserting simulated quantizers,
checkpoints loaded with ``device="meta"``. Meta kernels skip some of CUDA's device
checks (``index_select`` and ``embedding`` take CPU indices on meta), so those runs
happen under :class:`StrictDevices`, which refuses any op that mixes devices as CUDA
does. Data-driven passes need values; for them the tests check that the data reaches
the graph on the graph's device, at the first embedding lookup. Passes that read weight
values stop on meta at their first read, with run_pass's error and the graph unchanged.
The real GPU run is ``bench/gpu_check.py``.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

import graphprune
from graphprune.ir.shapes import refresh_shapes
from graphprune.training.calibration import CalibrationData, calibration_batches
from graphprune.training.timing import compare_latency
from graphprune.passes.quantization.formats import tensor_range
from graphprune.passes.structured.costs import latency_table
from tests.models import make_model, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

META = torch.device("meta")
CPU = torch.device("cpu")

# What CUDA lets take tensors from two devices: copies between them (Module.to among them),
# and CPU index tensors.
CROSS_DEVICE = {
    torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.type_as, torch.Tensor.cpu, torch._has_compatible_shallow_copy_type,
    torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_,
}


class StrictDevices(TorchFunctionMode):
    """Refuse every op whose tensors are on more than one device (CPU scalars aside), as CUDA does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in CROSS_DEVICE:
            devices = {
                t.device for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
            }
            if len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def baked_devices(graph) -> set:
    """The devices written into the graph's ops, in args and kwargs at any depth."""
    found = set()
    for node in graph.module.graph.nodes:
        fx.node.map_aggregate((node.args, node.kwargs), lambda v: found.add(v) if isinstance(v, torch.device) else None)
    return found


def tensor_devices(graph) -> set:
    module = graph.module
    return {t.device for t in list(module.parameters()) + list(module.buffers())}


def shape_devices(graph) -> set:
    """The devices of the shape metadata (``node.meta["val"]``)."""
    return {
        t.device for node in graph.module.graph.nodes
        for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)
    }


def assert_all_on_meta(graph) -> None:
    assert tensor_devices(graph) == {META}
    assert baked_devices(graph) == {META}
    assert shape_devices(graph) == {META}


def on(device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def shapes(out) -> dict:
    return {k: tuple(v.shape) for k, v in out.items()}


def run_both(graph, inputs: dict) -> tuple[dict, dict]:
    """Output shapes of ``graph`` on the CPU and of its meta copy, run under StrictDevices; also checks devices."""
    with torch.no_grad():
        expected = shapes(graph.module(**inputs))
        meta = graph.copy().to("meta")
        with StrictDevices():
            out = meta.module(**on("meta", inputs))
    assert {v.device for v in out.values()} == {META}
    return expected, shapes(out)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def graph(model):
    traced, _ = graphprune.run_pipeline(trace_once(model), [("init_metadata", {}), ("add_common_metadata", {"seq_len": 16})])
    return traced


# ---- moving a graph ----------------------------------------------------------------------


def test_to_moves_weights_every_baked_device_and_the_shape_metadata(graph):
    assert CPU in baked_devices(graph)  # export baked the trace device into the mask ops
    assert graph.device == CPU
    meta = graph.copy().to("meta")
    assert meta.device == META
    assert_all_on_meta(meta)
    assert tensor_devices(graph) == {CPU} and CPU in baked_devices(graph)  # the copy moved, not the original


def test_a_model_off_the_cpu_traces_with_example_inputs_on_its_device(model):
    """As a model already on a GPU would: export refuses CPU inputs for CUDA weights."""
    on_meta = make_model().to("meta")
    assert {v.device for v in graphprune.dummy_inputs(on_meta).values()} == {META}
    traced = graphprune.trace(on_meta)
    assert_all_on_meta(traced)
    inputs = padded_inputs(model, 3, 10)
    with StrictDevices():
        assert traced.module(**on("meta", inputs)).logits.shape == model(**inputs).logits.shape


def _nested(x, where, *, options):
    return x.to(where[0][1]) + torch.zeros(1, device=options["device"][0])


def test_to_moves_devices_nested_in_args_and_kwargs_of_every_kind_of_node():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(_nested, (x, [("keep", CPU)]), {"options": {"device": [CPU]}})
    z = g.call_method("to", (y,), {"device": CPU})
    g.output(z)
    moved = graphprune.Graph(fx.GraphModule(nn.Module(), g)).to("meta")
    assert baked_devices(moved) == {META}
    with StrictDevices():
        assert moved.module(torch.ones(2, device="meta")).device == META


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "RobertaForSequenceClassification",
                                  "DistilBertForSequenceClassification", "BertForQuestionAnswering"])
def test_forward_on_meta_gives_the_cpu_output_shapes(name):
    model = make_model(name)
    graph = trace_once(model)
    inputs = padded_inputs(model, 3, 10)
    targets = ({"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 4, 5])}
               if name.endswith("QuestionAnswering") else {"labels": torch.tensor([0, 1, 1])})
    expected, got = run_both(graph, {**inputs, **targets})
    assert "loss" in got and got == expected


def test_copy_of_a_meta_graph_stays_on_meta_and_runs(graph, model):
    copied = graph.copy().to("meta").copy()
    assert_all_on_meta(copied)
    inputs = padded_inputs(model, 2, 7)
    with StrictDevices():
        logits = copied.module(**on("meta", inputs)).logits
    assert logits.device == META and logits.shape == graph.module(**inputs).logits.shape


def test_shape_propagation_runs_on_the_graphs_device(graph):
    meta = graph.copy().to("meta")
    with StrictDevices():
        refresh_shapes(meta.module)  # every node, from fresh symbolic inputs
    assert shape_devices(meta) == {META}


# ---- passes that need no values ---------------------------------------------------------------


def test_analysis_passes_and_summary_on_meta_equal_the_cpu_ones(model):
    cpu = trace_once(model)
    meta = cpu.copy().to("meta")
    steps = [("init_metadata", {}), ("add_common_metadata", {"seq_len": 24, "batch_size": 2})]
    cpu, _ = graphprune.run_pipeline(cpu, steps)
    with StrictDevices():
        meta, _ = graphprune.run_pipeline(meta, steps)
        summary = str(meta.summary())
    assert meta.meta["common"] == cpu.meta["common"]
    assert summary == str(cpu.summary())
    assert_all_on_meta(meta)


STRUCTURAL = [
    ("remove_heads", {"heads": {0: [1], 1: [0, 2]}}),
    ("remove_heads", {"heads": {1: [0, 1, 2, 3]}, "min_heads": 0}),  # an emptied attention: a zero-width slice
    ("remove_ffn_neurons", {"neurons": {0: [1, 5, 9], 1: [0]}}),
    ("remove_layers", {"layers": [0]}),
]


@pytest.mark.parametrize("name, config", STRUCTURAL)
def test_structural_passes_on_meta_match_the_cpu_result(graph, model, name, config):
    cpu, cpu_info = graphprune.run_pass(graph, name, config)
    meta = graph.copy().to("meta")
    with StrictDevices():
        meta, info = graphprune.run_pass(meta, name, config)
    assert info == cpu_info
    assert_all_on_meta(meta)
    assert meta.meta["common"] == cpu.meta["common"]
    assert {k: v.shape for k, v in meta.module.state_dict().items()} == {k: v.shape for k, v in cpu.module.state_dict().items()}
    expected, got = run_both(cpu, padded_inputs(model, 3, 9))
    with StrictDevices():
        again = meta.module(**on("meta", padded_inputs(model, 3, 9)))
    assert shapes(again) == got == expected


FORMATS = {
    "integer": {"width": 8, "frac_width": 4},
    "minifloat_ieee": {"width": 8, "exponent_width": 4},
    "minifloat_denorm": {"width": 8, "exponent_width": 4},
    "log": {"width": 8},
    "block_fp": {"width": 8, "exponent_width": 8, "block_size": 16},
    "block_minifloat": {"width": 8, "exponent_width": 4, "exponent_bias_width": 8, "block_size": 16},
    "binary": {},
    "ternary": {},
    "mxint8": {},
    "mxfp4": {},
}


def _entry(fmt: str, prefixes) -> dict:
    return {"name": fmt, **{f"{p}_{k}": v for p in prefixes for k, v in FORMATS[fmt].items()}}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantize_inserts_simulated_formats_on_meta(graph, model, fmt):
    config = {"linear": _entry(fmt, ("data_in", "weight", "bias")), "matmul": _entry(fmt, ("data_in", "weight")),
              "layer_norm": _entry(fmt, ("data_in",)), "add": _entry(fmt, ("data_in",))}
    cpu, cpu_info = graphprune.run_pass(graph, "quantize", config)
    meta = graph.copy().to("meta")
    with StrictDevices():
        meta, info = graphprune.run_pass(meta, "quantize", config)
    assert {k: v for k, v in info.items() if k != "seconds"} == {k: v for k, v in cpu_info.items() if k != "seconds"}
    assert meta.meta["quantize"] == cpu.meta["quantize"]
    assert [(n.name, n.op, n.target) for n in meta.nodes] == [(n.name, n.op, n.target) for n in cpu.nodes]
    assert_all_on_meta(meta)
    expected, got = run_both(cpu, {**padded_inputs(model, 2, 9), "labels": torch.tensor([1, 0])})
    assert got == expected


VALUE_PASSES = [
    ("prune_weight", {"method": "l1", "sparsity": 0.5}),
    ("prune_activation", {"method": "random", "sparsity": 0.5}),
    ("profile_statistics", {"nodes": "weights", "progress": False}),
]


def fingerprint(graph) -> tuple:
    return (
        [(n.name, n.op, str(n.target)) for n in graph.nodes],
        {k: (tuple(v.shape), v.dtype, v.device) for k, v in graph.module.state_dict().items()},
        sorted(graph.meta), len(graph.history),
    )


@pytest.mark.parametrize("name, config", VALUE_PASSES)
def test_passes_that_read_weight_values_stop_on_meta_with_a_pass_error_and_the_graph_unchanged(graph, name, config):
    """These passes choose or record from weight values (thresholds, zero counts), which meta tensors lack.

    No meta run can finish them, so this checks what run_pass promises for a failing pass
    (a PassError naming it, the graph unchanged) and that the failure is torch refusing a
    value read: everything before that read ran under StrictDevices without mixing devices.
    """
    meta = graph.copy().to("meta")
    before = fingerprint(meta)
    with pytest.raises(graphprune.PassError, match=rf"^pass '{name}' failed: RuntimeError: .*meta tensors") as raised, StrictDevices():
        graphprune.run_pass(meta, name, config)
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert fingerprint(meta) == before
    assert_all_on_meta(meta)


def test_percentile_ranges_are_computed_on_the_tensors_device():
    with StrictDevices():
        assert tensor_range(torch.randn(300, device="meta"), "percentile").device == META


# ---- checkpoints -------------------------------------------------------------------------------


def test_load_onto_meta_and_the_default_load_onto_the_cpu(graph, model, tmp_path):
    graph.save(tmp_path / "ckpt")
    loaded = graphprune.load(tmp_path / "ckpt", device="meta")
    assert_all_on_meta(loaded)
    inputs = padded_inputs(model, 3, 10)
    expected, got = run_both(graph, inputs)
    with StrictDevices():
        assert shapes(loaded.module(**on("meta", inputs))) == got == expected
    default = graphprune.load(tmp_path / "ckpt")
    assert tensor_devices(default) == {CPU} and baked_devices(default) == {CPU}
    with torch.no_grad():
        assert torch.equal(default.module(**inputs).logits, graph.module(**inputs).logits)


def test_a_checkpoint_saved_from_another_device_loads_onto_the_cpu(graph, model, tmp_path):
    """A graph saved from a GPU has the GPU in its ops; its tensors load on the CPU, and its ops must follow."""
    saved = graph.copy()
    gpu = torch.device("cuda", 0)  # only written into the ops: nothing runs on it
    for node in saved.module.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, lambda v: gpu if isinstance(v, torch.device) else v)
        node.kwargs = fx.node.map_aggregate(node.kwargs, lambda v: gpu if isinstance(v, torch.device) else v)
    saved.save(tmp_path / "ckpt")
    assert '"cuda:0"' in json.dumps(json.loads((tmp_path / "ckpt" / "graph.json").read_text()))
    loaded = graphprune.load(tmp_path / "ckpt")
    assert baked_devices(loaded) == {CPU}
    inputs = padded_inputs(model, 3, 10)
    with torch.no_grad(), StrictDevices():
        assert torch.equal(loaded.module(**inputs).logits, graph.module(**inputs).logits)
    assert_all_on_meta(graphprune.load(tmp_path / "ckpt", device="meta"))


# ---- data reaches the graph on its device ------------------------------------------------------


class _Seen(Exception):
    """Raised by the probe at the graph's first embedding lookup: the values after it are not needed."""


def probe(graph) -> list:
    """Record the device of the token ids at the graph's first embedding lookup, then stop the run."""
    seen = []

    def hook(module, args):
        seen.append(args[0].device)
        raise _Seen

    for module in graph.module.modules():
        if isinstance(module, nn.Embedding):
            module.register_forward_pre_hook(hook)  # graph copies (run_pass) carry the hook along
    return seen


def examples(n: int = 16) -> list[dict]:
    data, tokenizer = sentiment_data(n), tiny_tokenizer()
    return [{**tokenizer(text), "labels": label} for text, label in zip(data.texts, data.labels)]


@pytest.mark.parametrize("form", ["examples", "batches", "text"])
def test_calibration_batches_are_on_the_graphs_device(graph, model, form):
    data = {
        "examples": examples(),
        "batches": [{**padded_inputs(model, 4, 9, seed=i), "labels": torch.tensor([0, 1, 0, 1])} for i in range(3)],
        "text": CalibrationData(sentiment_data(16), tiny_tokenizer(), batch_size=4),
    }[form]
    batches = calibration_batches(graph.copy().to("meta"), data, num_samples=12, caller="test")
    assert sum(len(b["input_ids"]) for b in batches) == 12
    assert {v.device for b in batches for v in b.values() if isinstance(v, torch.Tensor)} == {META}


def test_evaluation_batches_reach_the_graph_on_its_device(graph):
    meta = graph.copy().to("meta")
    seen = probe(meta)
    with pytest.raises(_Seen):
        graphprune.evaluate(meta, sentiment_data(8), tiny_tokenizer(), batch_size=4, progress=False)
    assert seen == [META]


DATA_PASSES = [
    ("prune_weight", {"method": "wanda", "num_samples": 8}),
    ("prune_weight", {"method": "sparsegpt", "num_samples": 8}),
    ("prune_weight", {"method": "taylor", "num_samples": 8}),
    ("remove_heads", {"method": "taylor", "num_samples": 8}),
    ("remove_ffn_neurons", {"method": "fisher", "num_samples": 8}),
    ("remove_layers", {"method": "similarity", "num_samples": 8}),
    ("structured_search", {"method": "kwon", "num_samples": 8, "seq_len": 16, "progress": False}),
    ("structured_search", {"method": "kprune", "num_samples": 8, "seq_len": 16, "progress": False}),
    ("analyze_heads", {"num_samples": 8}),
]  # profile_statistics reads weight values and token counts before its first forward pass; its data is calibration_batches'


@pytest.mark.parametrize("name, config", DATA_PASSES)
def test_data_driven_passes_feed_their_data_on_the_graphs_device(graph, name, config):
    meta = graph.copy().to("meta")
    seen = probe(meta)
    with pytest.raises(graphprune.PassError) as raised, StrictDevices():
        graphprune.run_pass(meta, name, config, data=examples())
    assert isinstance(raised.value.__cause__, _Seen), raised.value  # stopped by the probe, nothing earlier
    assert seen == [META]


# ---- timing ------------------------------------------------------------------------------------


def test_latency_is_measured_with_inputs_on_the_modules_device(graph, model):
    meta = graph.copy().to("meta")
    with StrictDevices():
        result = compare_latency(meta.module, meta.module, padded_inputs(model, 2, 8), iters=1, warmup=0)  # CPU inputs
        table = latency_table(32, 4, 8, 64, batch=2, seq=8, reps=1, device="meta")
    assert result["ratio"] > 0 and table["per_head_ms"] > 0


# ---- bench/gpu_check.py ------------------------------------------------------------------------

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the real check")
def test_gpu_check_says_no_cuda_device_and_exits_2():
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr


def test_gpu_check_sequence_passes_on_the_cpu(tmp_path, monkeypatch):
    """The script's own logic, on the device a machine without a GPU has: every step runs and passes.

    Each step's outputs are compared with the eager HF model carrying the graph's weights,
    so a graph computing the wrong thing fails here, not only on a GPU.
    """
    monkeypatch.syspath_prepend(str(BENCH))
    gpu_check = importlib.import_module("gpu_check")
    rows = gpu_check.run_checks("cpu", ["tiny"], tmp_path, log=lambda *args: None)
    assert [r["step"] for r in rows] == [
        "trace (cpu)", "graph.to(cpu)", "structured_search kprune", "prune_weight wanda 50%", "prune_weight sparsegpt 50%",
        "finetune 20 steps (KD)", "evaluate", "save", "load(device='cpu')",
    ]
    assert [(r["step"], r["result"], r.get("max_abs_diff"), r.get("note")) for r in rows if r["result"] != "pass"] == []
    assert [r["step"] for r in rows if not isinstance(r.get("max_abs_diff"), float)] == ["save"]  # every other step compared
