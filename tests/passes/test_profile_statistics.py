"""profile_statistics against oracles computed here (torch's own reductions on the weight,
forward hooks on the eager model over the real tokens, attention probabilities written
out per example), and quantize's frac_width = "auto" and per-channel scales against
frac widths searched for by hand (Python's round is half to even, as the format's)."""

import json
import math

import pytest
import torch
from torch import nn

import graphprune
from graphprune.infra.config import ConfigError
from graphprune.training.calibration import CalibrationData
from graphprune.passes.quantization.format_specs import quantizer
from graphprune.passes.quantization.quantizers import Quantizer

from ..models import make_model, max_diff, sentiment_data, tiny_tokenizer, trace_once, widened_model

STATS = "graphprune.statistics"
QUERY = "bert.encoder.layer.0.attention.self.query"
KEY = "bert.encoder.layer.0.attention.self.key"
UP = "bert.encoder.layer.0.intermediate.dense"
DOWN = "bert.encoder.layer.1.output.dense"


def node_name(path: str) -> str:
    return path.replace(".", "_").replace("LayerNorm", "layer_norm")


def fitted(maxabs: float, width: int) -> int:
    """The largest f at which maxabs, rounded half to even at 2^-f, is at most 2^(width-1) - 1: a search."""
    return next(f for f in range(40, -40, -1) if round(maxabs * 2.0**f) <= 2 ** (width - 1) - 1)


def int_q(x, width, frac):
    return torch.clamp(torch.round(x * 2.0**frac), -(2 ** (width - 1)), 2 ** (width - 1) - 1) / 2.0**frac


def make_batch(lengths, seq_len, seed, extra_padding=0):
    """Token ids with the rows padded (id 0, mask 0) after their lengths; extra all-padding columns on request."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (len(lengths), seq_len), generator=g)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    if extra_padding:
        ids = torch.cat([ids, torch.zeros(len(lengths), extra_padding, dtype=torch.long)], 1)
        mask = torch.cat([mask, torch.zeros(len(lengths), extra_padding, dtype=torch.long)], 1)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


TOKENS = 9 + 4 + 7 + 6 + 6 + 2 + 5  # the real tokens of make_batches()


def make_batches(extra_padding=0):
    return [make_batch([9, 4, 7], 9, 1, extra_padding), make_batch([6, 6, 2, 5], 6, 2, extra_padding)]


@pytest.fixture(scope="module")
def model():
    """The tiny BERT with weights and biases spread widely enough for frac widths to differ."""
    return widened_model(7)


@pytest.fixture(scope="module")
def graph(model):
    return trace_once(model)


@pytest.fixture(scope="module")
def profiled(graph):
    profiled, info = graphprune.run_pass(graph, "profile_statistics", {"progress": False}, data=make_batches())
    return profiled, info


def close(got: dict, want: dict, rel=1e-5, abs_=1e-6):
    for k in ("min", "max", "mean", "variance", "abs_mean"):
        assert got[k] == pytest.approx(want[k], rel=rel, abs=abs_), k
    assert got["count"] == want["count"]
    assert got["percentiles"].keys() == want["percentiles"].keys()
    for p in want["percentiles"]:
        assert got["percentiles"][p] == pytest.approx(want["percentiles"][p], rel=rel, abs=abs_), p


def oracle(values: torch.Tensor, percentiles=(0.1, 99.9)) -> dict:
    v = values.reshape(-1)
    q = torch.quantile(v.double(), torch.tensor([p / 100 for p in percentiles], dtype=torch.float64))
    return {"min": v.min().item(), "max": v.max().item(), "mean": v.double().mean().item(), "variance": v.double().var().item(),
            "abs_mean": v.double().abs().mean().item(), "count": v.numel(),
            "percentiles": {f"{p:g}": float(x) for p, x in zip(percentiles, q)}}


# ---- statistics -----------------------------------------------------------------------


def test_weight_statistics_are_torchs_own_and_need_no_data(model, graph):
    profiled, info = graphprune.run_pass(graph, "profile_statistics", {"nodes": "weights", "percentiles": [1, 50, 99.9]})
    for path in (UP, "bert.encoder.layer.0.attention.output.LayerNorm", "classifier"):
        module = model.get_submodule(path)
        record = profiled.node(node_name(path)).meta[STATS]
        assert set(record) == {"weight", "bias"}
        for name in ("weight", "bias"):
            tensor = getattr(module, name).detach()
            close(record[name], oracle(tensor, (1, 50, 99.9)), rel=1e-9, abs_=1e-12)
            assert record[name]["min"] == tensor.min().item() and record[name]["max"] == tensor.max().item()
    assert profiled.meta["statistics"]["percentiles"] == [1.0, 50.0, 99.9] and info["num_samples"] == 0
    assert "weight" in info["table"] and "data_in" not in info["table"]


def test_activation_statistics_equal_eager_hooks_on_real_tokens(model, profiled):
    graph, info = profiled
    batches = make_batches()
    seen = {UP: [], QUERY: [], KEY: [], "gelu": [], "probs": []}
    state = {}

    def keep(name, x):
        seen[name].append(x.detach()[state["mask"]])

    hooks = [model.get_submodule(UP).register_forward_pre_hook(lambda m, a: keep(UP, a[0])),
             model.get_submodule(QUERY).register_forward_hook(lambda m, a, out: keep(QUERY, out)),
             model.get_submodule(KEY).register_forward_hook(lambda m, a, out: keep(KEY, out)),
             model.get_submodule("bert.encoder.layer.0.intermediate.intermediate_act_fn").register_forward_pre_hook(
                 lambda m, a: keep("gelu", a[0]))]
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    # the attention probabilities, example by example over its real tokens only: softmax(q k^T / sqrt(d))
    lengths = [n for batch in batches for n in batch["attention_mask"].sum(1).tolist()]
    q_rows, k_rows = torch.cat(seen[QUERY]), torch.cat(seen[KEY])
    start = 0
    for n in lengths:
        q = q_rows[start:start + n].view(n, 4, 8).transpose(0, 1)
        k = k_rows[start:start + n].view(n, 4, 8).transpose(0, 1)
        seen["probs"].append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1))
        start += n

    tokens = sum(lengths)
    assert info["num_samples"] == 7 and info["tokens"] == tokens == graph.meta["statistics"]["tokens"]
    record = graph.node(node_name(UP)).meta[STATS]
    assert set(record) == {"weight", "bias", "data_in_0"} and record["data_in_0"]["count"] == tokens * 32
    close(record["data_in_0"], oracle(torch.cat(seen[UP])))
    close(graph.node("gelu").meta[STATS]["data_in_0"], oracle(torch.cat(seen["gelu"])))
    core = graph.node("bert_encoder_layer_0_attention_self_attention_core").meta[STATS]
    assert set(core) == {"query", "key", "value", "probs"}
    close(core["query"], oracle(q_rows))
    close(core["key"], oracle(k_rows))
    close(core["probs"], oracle(torch.cat([p.reshape(-1) for p in seen["probs"]])))
    assert core["probs"]["count"] == 4 * sum(n * n for n in lengths)
    # q, k and v read the same tensor: one measurement, each node its own copy
    same = [graph.node(node_name(p)).meta[STATS]["data_in_0"] for p in (QUERY, KEY)]
    assert same[0] == same[1] and same[0] is not same[1]
    assert graph.node("add_5").meta[STATS].keys() == {"data_in_0", "data_in_1"}  # every input of a quantizable op


def test_padding_does_not_change_the_statistics(graph, profiled):
    reference, _ = profiled
    padded, _ = graphprune.run_pass(graph, "profile_statistics", {"progress": False}, data=make_batches(extra_padding=5))
    records = {n.name: n.meta[STATS] for n in reference.nodes if STATS in n.meta}
    assert len(records) == 30  # 14 Linear, 5 LayerNorm, 6 add, 2 attention, 2 gelu, tanh
    for name, record in records.items():
        other = padded.node(name).meta[STATS]
        assert other.keys() == record.keys(), name
        for operand in record:
            close(other[operand], record[operand])
    # examples batched differently (other padding per batch) give the same statistics too
    data = sentiment_data(12)
    runs = [graphprune.run_pass(graph, "profile_statistics", {"progress": False, "batch_size": size, "num_samples": 12},
                                data=CalibrationData(data, tiny_tokenizer()))[0] for size in (3, 12)]
    for name in ("bert_encoder_layer_1_output_dense", "bert_encoder_layer_1_attention_self_attention_core"):
        small, large = (r.node(name).meta[STATS] for r in runs)
        for operand in small:
            close(small[operand], large[operand])


def test_the_graph_is_unchanged_and_the_metadata_is_json_that_survives_a_checkpoint(model, graph, profiled, tmp_path):
    profiled_graph, info = profiled
    batch = make_batch([5, 8], 8, 3)
    with torch.no_grad():
        assert max_diff(profiled_graph.module(**batch), graph.module(**batch)) == 0.0
    assert profiled_graph.module.code == graph.module.code
    assert all(torch.equal(a, b) for a, b in zip(profiled_graph.module.state_dict().values(), graph.module.state_dict().values()))
    assert not any(STATS in n.meta for n in graph.nodes)  # the caller's graph has no records
    for node in profiled_graph.nodes:
        if STATS in node.meta:
            json.dumps(node.meta[STATS], allow_nan=False)
            assert not any(isinstance(v, torch.Tensor) for r in node.meta[STATS].values() for v in r.values())
    assert profiled_graph.meta["statistics"] == {"nodes": "quantizable", "num_samples": 7, "tokens": TOKENS,
                                                 "percentiles": [0.1, 99.9], "max_values": 1_000_000}
    profiled_graph.save(tmp_path / "p")
    loaded = graphprune.load(tmp_path / "p")
    for node in profiled_graph.nodes:
        assert loaded.node(node.name).meta.get(STATS) == node.meta.get(STATS)
    assert loaded.meta["statistics"] == profiled_graph.meta["statistics"]
    assert loaded.history[-1]["pass"] == "profile_statistics"
    rows = info["table"].splitlines()
    assert rows[1].split() == ["layer", "weight", "bias", "data_in", "query", "key", "value", "probs"]
    assert [r.split()[0] for r in rows[2:]] == ["embeddings", "0", "1", "head"]


def test_all_nodes_sampling_and_errors(graph, profiled):
    reference, _ = profiled
    everything, info = graphprune.run_pass(graph, "profile_statistics", {"nodes": "all", "progress": False}, data=make_batches())
    up_out = everything.node(node_name(UP)).meta[STATS]["data_out_0"]
    close(up_out, everything.node("gelu").meta[STATS]["data_in_0"])  # the same tensor seen from both ends
    assert "data_out_0" not in everything.node("to").meta.get(STATS, {})  # the boolean mask is not a float tensor
    # a bounded sample for the percentiles: moments stay exact, the sample is seeded
    small = [graphprune.run_pass(graph, "profile_statistics", {"max_values": 100, "progress": False, "seed": s},
                                 data=make_batches())[0].node(node_name(UP)).meta[STATS]["data_in_0"] for s in (0, 0, 1)]
    exact = reference.node(node_name(UP)).meta[STATS]["data_in_0"]
    assert small[0] == small[1] and small[0]["percentiles"] != small[2]["percentiles"]
    assert small[0]["sample"] == 100 and exact["sample"] == exact["count"] == TOKENS * 32
    for k in ("min", "max", "mean", "variance", "abs_mean", "count"):
        assert small[0][k] == pytest.approx(exact[k], rel=1e-12)
    assert exact["min"] <= small[0]["percentiles"]["0.1"] <= small[0]["percentiles"]["99.9"] <= exact["max"]

    with pytest.raises(ValueError, match=r"pass 'profile_statistics' needs calibration data .*nodes = 'weights'"):
        graphprune.run_pass(graph, "profile_statistics")
    for bad, field in (({"percentiles": [0.1, 101]}, "percentiles"), ({"nodes": "some"}, "nodes"),
                       ({"max_values": 2**25}, "max_values"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=rf"pass 'profile_statistics': field '{field}'"):
            graphprune.run_pass(graph, "profile_statistics", bad, data=make_batches())


# ---- quantize: frac_width = "auto" ----------------------------------------------------------


AUTO = {"name": "integer", "data_in_width": 8, "data_in_frac_width": "auto", "weight_width": 8,
        "weight_frac_width": "auto", "bias_width": 8, "bias_frac_width": "auto"}


@pytest.mark.parametrize("k, top, sliver", [(-3, 1.3, False), (0, 1.0, False), (2, 1.9, False), (2, 1.999, True)])
def test_auto_weight_frac_width_fits_the_largest_weight(graph, k, top, sliver):
    work = graph.copy()
    module = work.module.get_submodule(UP)
    with torch.no_grad():  # max |w| = top * 2^k, in [2^k, 2^(k+1)), held by a negative weight
        module.weight.mul_(top * 2.0**k / module.weight.abs().max())
        module.weight[3, 5] = -top * 2.0**k
    quantized, info = graphprune.run_pass(work, "quantize", {"by": "name", node_name(UP): {
        "name": "integer", "data_in_width": 16, "data_in_frac_width": 8, "weight_width": 8, "weight_frac_width": "auto",
        "bias_width": 8, "bias_frac_width": 6}})
    # width 8, max |w| in [2^k, 2^(k+1)): f = 7 - (k + 1), and 2^k itself fits (7 - k would give 2^k -> 128);
    # just below 2^(k+1), max |w| * 2^f rounds up to 128, so one bit less (1.999 * 4 * 16 = 127.94)
    f = 7 - (k + 1) - sliver
    assert f == fitted(top * 2.0**k, 8)
    meta = quantized.node(node_name(UP)).meta["graphprune.quantize"]
    assert meta["frac_widths"] == {"weight": f} and info["frac_widths"] == {node_name(UP): {"weight": f}}
    assert meta["config"]["weight_frac_width"] == "auto" and meta["config"]["bias_frac_width"] == 6
    q = quantized.module.get_submodule(UP)
    w = q.parametrizations.weight.original.detach()
    assert torch.equal(q.weight, int_q(w, 8, f))
    assert torch.equal(q.weight, torch.round(w * 2.0**f) / 2.0**f)  # not saturated: plain rounding
    assert torch.round(w * 2.0 ** (f + 1)).abs().max() > 127  # one more fraction bit would saturate
    assert q.parametrizations.weight[0].keys == {"weight_width": 8, "weight_frac_width": f}  # a fixed grid


def test_auto_activations_need_a_profile_and_change_nothing_without_one(graph):
    before = (graph.module.code, {k: v.clone() for k, v in graph.module.state_dict().items()}, repr(graph.meta))
    for inplace in (False, True):
        with pytest.raises(ValueError, match=(r"pass 'quantize': field 'linear\.data_in_frac_width' = 'auto' needs the range of "
                                              r"data_in_0 of linear node 'bert_encoder_layer_0_attention_self_query', which has no "
                                              r"statistics: run the 'profile_statistics' pass first")):
            graphprune.run_pass(graph, "quantize", {"linear": AUTO}, inplace=inplace)
    assert graph.module.code == before[0] and repr(graph.meta) == before[2]
    assert all(torch.equal(v, before[1][k]) for k, v in graph.module.state_dict().items())
    assert not any(isinstance(m, Quantizer) for m in graph.module.modules())
    weights_only, _ = graphprune.run_pass(graph, "profile_statistics", {"nodes": "weights"})
    with pytest.raises(ValueError, match=r"'matmul\.weight_frac_width' = 'auto' needs the range of key of matmul node"):
        graphprune.run_pass(weights_only, "quantize", {"matmul": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 7,
                                                                   "weight_width": 8, "weight_frac_width": "auto"}})


def test_auto_activations_fit_the_profiled_range_and_do_not_saturate_on_it(profiled):
    graph, _ = profiled
    config = {"linear": AUTO, "matmul": {**AUTO, "data_in_range": "percentile"}, "gelu": {**AUTO, "data_in_width": 6}}
    quantized, info = graphprune.run_pass(graph, "quantize", config)
    for name in (node_name(UP), node_name(DOWN), "classifier"):
        record = graph.node(name).meta[STATS]["data_in_0"]
        f = fitted(max(abs(record["min"]), abs(record["max"])), 8)
        assert quantized.node(name).meta["graphprune.quantize"]["frac_widths"]["data_in_0"] == f == info["frac_widths"][name]["data_in_0"]
        assert quantized.module.get_submodule(f"{name}_data_in_0_quantizer").keys == {"data_in_width": 8, "data_in_frac_width": f}
    gelu = graph.node("gelu").meta[STATS]["data_in_0"]
    assert info["frac_widths"]["gelu"] == {"data_in_0": fitted(max(-gelu["min"], gelu["max"]), 6)}
    core = graph.node("bert_encoder_layer_0_attention_self_attention_core").meta[STATS]
    want = {"query": fitted(max(abs(v) for v in core["query"]["percentiles"].values()), 8),
            "probs": fitted(max(abs(v) for v in core["probs"]["percentiles"].values()), 8),
            "key": fitted(max(abs(core["key"]["min"]), abs(core["key"]["max"])), 8),  # weight_ keys: range max
            "value": fitted(max(abs(core["value"]["min"]), abs(core["value"]["max"])), 8)}
    assert info["frac_widths"]["bert_encoder_layer_0_attention_self_attention_core"] == want
    # on the calibration data the quantizer of a Linear input never clips a real token
    seen = []
    down = quantized.module.get_submodule(f"{node_name(DOWN)}_data_in_0_quantizer")
    hook = down.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for batch in make_batches():
            quantized.module(**batch)
            x = seen.pop()[batch["attention_mask"].bool()]
            f = down.keys["data_in_frac_width"]
            assert torch.round(x * 2.0**f).abs().max() <= 127 and torch.equal(down(x), torch.round(x * 2.0**f) / 2.0**f)
    hook.remove()


# ---- quantize: per-channel weights ------------------------------------------------------------


def test_per_channel_weights_have_a_scale_per_row(graph, tmp_path):
    work = graph.copy()
    module = work.module.get_submodule(UP)
    with torch.no_grad():  # rows of very different sizes, one exactly a power of two, one pruned away
        module.weight.mul_(torch.logspace(-4, 3, module.weight.shape[0], base=2.0)[:, None])
        module.weight[1] = 0.0
        module.weight[2, 0] = 0.5
        module.weight[2, 1:] = module.weight[2, 1:].clamp(-0.25, 0.25)
    entry = {"name": "integer", "data_in_width": 16, "data_in_frac_width": 8, "weight_width": 8, "weight_frac_width": "auto",
             "weight_per_channel": True, "bias_width": 8, "bias_frac_width": "auto"}
    quantized, info = graphprune.run_pass(work, "quantize", {"by": "name", node_name(UP): entry})

    def by_hand(w):
        rows = []
        for row in w:
            m = row.abs().max().item()
            f = fitted(m, 8) if m > 0 else 7
            rows.append((f, torch.clamp(torch.round(row * 2.0**f), -128, 127) / 2.0**f))
        return [f for f, _ in rows], torch.stack([r for _, r in rows])

    q = quantized.module.get_submodule(UP)
    w = q.parametrizations.weight.original.detach()
    fs, want = by_hand(w)
    assert fs[2] == 7 - (-1 + 1) and fs[1] == 7 and len(set(fs)) > 4  # max 0.5 = 2^-1 exactly; a zero row
    assert torch.equal(q.weight, want)
    meta = quantized.node(node_name(UP)).meta["graphprune.quantize"]
    assert meta["frac_widths"]["weight"] == fs and info["frac_widths"][node_name(UP)]["weight"] == f"{min(fs)}..{max(fs)}"
    assert meta["frac_widths"]["bias"] == fitted(q.parametrizations.bias.original.abs().max().item(), 8)
    # the same as the format applied to the tensor, and through a checkpoint
    assert torch.equal(q.weight, quantizer("integer", "weight", entry)(w))
    quantized.save(tmp_path / "pc")
    assert torch.equal(graphprune.load(tmp_path / "pc").module.get_submodule(UP).weight, want)
    # quantization-aware training moves the weights: each row's scale follows its own
    with torch.no_grad():
        w.mul_(torch.linspace(0.3, 3.0, w.shape[0])[:, None])
    assert torch.equal(q.weight, by_hand(w)[1])
    q.weight.sum().backward()
    assert torch.equal(q.parametrizations.weight.original.grad, torch.ones_like(w))  # straight-through


def test_per_channel_and_range_are_checked(graph):
    with pytest.raises(ConfigError, match=r"'weight_per_channel' = True .*false unless frac_width is 'auto'"):
        quantizer("integer", "weight", {"weight_width": 8, "weight_frac_width": 4, "weight_per_channel": True})
    with pytest.raises(ConfigError, match=r"'data_in_range' = 'percentile' .*'max'"):
        quantizer("integer", "data_in", {"data_in_width": 8, "data_in_frac_width": 4, "data_in_range": "percentile"})
    with pytest.raises(ValueError, match=r"pass 'quantize': field 'matmul\.weight_per_channel' = True .*Linear weights"):
        graphprune.run_pass(graph, "quantize", {"matmul": {**AUTO, "data_in_frac_width": 7, "weight_per_channel": True}})
    with pytest.raises(ValueError, match=r"pass 'quantize': field 'linear\.config\.weight_range' = 'maximum'"):
        graphprune.run_pass(graph, "quantize", {"linear": {"config": {**AUTO, "weight_range": "maximum"}}})


def test_a_shared_attention_module_is_fitted_to_the_widest_of_its_calls():
    albert = trace_once(make_model("AlbertForSequenceClassification"))  # one layer called three times
    profiled, _ = graphprune.run_pass(albert, "profile_statistics", {"progress": False}, data=make_batches())
    cores = [n for n in profiled.nodes if n.name.endswith(("attention_core", "attention_core_1", "attention_core_2"))]
    assert len(cores) == 3 and len({n.target for n in cores}) == 1
    ranges = [max(abs(n.meta[STATS]["query"]["min"]), abs(n.meta[STATS]["query"]["max"])) for n in cores]
    assert len(set(ranges)) == 3  # each call measured on its own
    quantized, info = graphprune.run_pass(profiled, "quantize", {"matmul": {**AUTO, "data_in_range": "max"}})
    assert {info["frac_widths"][n.name]["query"] for n in cores} == {fitted(max(ranges), 8)}
