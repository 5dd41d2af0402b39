"""mixed_precision: the allocation against brute force, the applied widths against quantize itself."""

import itertools
import random

import pytest
import torch

import graphprune
from graphprune.passes.quantization.mixed_precision import allocate
from tests.models import make_model, padded_inputs, trace_once


def test_allocation_is_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(20):
        sizes = [rng.choice([64, 128, 256]) for _ in range(4)]
        widths = (2, 3, 4, 8)
        errors = [{w: rng.random() * 2.0 ** (-w) * rng.choice([1, 10, 100]) for w in widths} for _ in sizes]
        budget = rng.uniform(2.5, 7.5) * sum(sizes)
        feasible = [c for c in itertools.product(widths, repeat=4) if sum(s * w for s, w in zip(sizes, c)) <= budget]
        best = min(sum(e[w] for e, w in zip(errors, c)) for c in feasible)
        chosen = allocate(sizes, errors, budget)
        assert sum(s * w for s, w in zip(sizes, chosen)) <= budget
        assert sum(e[w] for e, w in zip(errors, chosen)) == pytest.approx(best)


def with_sensitivity(graph, traces):
    """The graph with a sensitivity record written by hand: layer i's trace per parameter is traces[i]."""
    graph = graph.copy()
    groups = []
    for layer, trace in enumerate(traces):
        linears = [n.name for n in graph.nodes if n.op == "call_module" and f"layer_{layer}_" in n.name
                   and isinstance(graph.module.get_submodule(n.target), torch.nn.Linear)]
        groups.append({"name": f"layer {layer}", "layer": layer, "linears": linears, "params": 0, "eigenvalue": trace,
                       "eigenvalue_std": 0.0, "sensitivity": trace, "trace": trace, "trace_per_param": trace})
    graph.meta["sensitivity"] = {"granularity": "layer", "num_samples": 0, "subsets": 1, "groups": groups}
    return graph


@pytest.mark.parametrize("traces, expected", [((1e6, 1e-6), [8, 2]), ((1e-6, 1e6), [2, 8])])
def test_the_sensitive_layer_gets_the_wide_weights_and_quantize_applies_them(traces, expected):
    graph = with_sensitivity(trace_once(make_model()), traces)
    out, info = graphprune.run_pass(graph, "mixed_precision", {"average_bits": 5, "widths": [2, 8]})
    assert list(info["widths"].values()) == expected and info["average_bits"] == 5
    entries = {}
    for group, width in zip(graph.meta["sensitivity"]["groups"], expected):
        for name in group["linears"]:
            entries[name] = {"config": {"name": "integer", "data_in_width": 16, "data_in_frac_width": 8, "bias_width": 16,
                                        "bias_frac_width": "auto", "weight_width": width, "weight_frac_width": "auto", "weight_per_channel": True}}
    oracle, _ = graphprune.run_pass(graph, "quantize", {"by": "name", **entries})
    inputs = padded_inputs(make_model(), 2, 12)
    with torch.no_grad():
        a, b = out.module.eval()(**inputs), oracle.module.eval()(**inputs)
    assert torch.equal(a["logits"], b["logits"])
    assert out.meta["mixed_precision"]["widths"] == info["widths"]
    bits = [layer["weight_bits"] for layer in out.meta["quantize"]["layers"]]  # weights and 16-bit biases
    assert (bits[0] > bits[1]) == (expected[0] > expected[1])


def test_measured_sensitivity_gives_a_budgeted_allocation():
    from tests.passes.test_hessian_sensitivity import data

    graph, _ = graphprune.run_pass(trace_once(make_model()), "hessian_sensitivity",
                                   {"granularity": "linear", "subsets": 2, "iterations": 3, "trace_samples": 2, "progress": False},
                                   data=data())
    out, info = graphprune.run_pass(graph, "mixed_precision", {"average_bits": 4})
    assert len(info["widths"]) == 12 and info["average_bits"] <= 4
    assert set(info["widths"].values()) <= {3, 4, 5, 6, 8}


def test_a_negative_estimate_counts_by_its_magnitude():
    """A short power iteration can return a negative eigenvalue: it must not make the error a reward."""
    graph = with_sensitivity(trace_once(make_model()), (-1e6, 1e-6))
    _, info = graphprune.run_pass(graph, "mixed_precision", {"average_bits": 5, "widths": [2, 8]})
    assert list(info["widths"].values()) == [8, 2] and info["expected_error"] > 0


@pytest.mark.parametrize(
    "config, prepare, words",
    [
        ({}, None, ["run 'hessian_sensitivity' first"]),
        ({"widths": [1, 4]}, "meta", ["widths", "2 to 16"]),
        ({"average_bits": 9, "widths": [2, 8]}, "meta", ["average_bits", "2 <= average_bits <= 8"]),
        ({"criterion": "curvature"}, "meta", ["criterion", "curvature"]),
        ({"entry": {"weight_width": 3}}, "meta", ["entry.weight_width"]),
        ({}, "no_trace", ["trace_samples = 0", "eigenvalue"]),
        ({"criterion": "eigenvalue"}, "no_eigenvalue", ["eigenvalue = false", "criterion = 'trace'"]),
    ],
)
def test_bad_input_is_a_clear_error(config, prepare, words):
    graph = trace_once(make_model())
    if prepare:
        graph = with_sensitivity(graph, (1.0, 2.0))
        for group in graph.meta["sensitivity"]["groups"]:
            if prepare == "no_trace":
                group["trace_per_param"] = None
            if prepare == "no_eigenvalue":
                group["sensitivity"] = None
    code = graph.module.code
    with pytest.raises(ValueError) as error:
        graphprune.run_pass(graph, "mixed_precision", config)
    assert "mixed_precision" in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
    assert graph.module.code == code and "quantize" not in graph.meta
