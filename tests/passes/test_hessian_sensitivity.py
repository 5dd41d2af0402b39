"""hessian_sensitivity against the explicitly computed Hessian of a tiny model's task loss."""

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import graphprune
from graphprune.training.calibration import CalibrationData, calibration_batches
from graphprune.training.hessian import hutchinson_trace, rademacher, top_eigenvalue
from tests.models import make_model, sentiment_data, tiny_tokenizer, trace_once

LINEAR = "bert_encoder_layer_1_attention_self_value"  # 32 x 32: a 1024 x 1024 Hessian


def data(n=16):
    return CalibrationData(sentiment_data(n, seed=4), tiny_tokenizer(), max_length=16, batch_size=8)


def trained_graph():
    graph = trace_once(make_model())
    graphprune.finetune(graph, sentiment_data(64), tiny_tokenizer(), epochs=4, batch_size=16, learning_rate=3e-3, progress=False)
    return graph


def explicit_hessian(graph, target: str, batches) -> torch.Tensor:
    """d2 (mean loss over all examples) / dW2 of one Linear's weight, by torch.autograd.functional.hessian."""
    gm = graph.module.eval()
    name = f"{graph.node(target).target}.weight"
    weight = dict(gm.named_parameters())[name].detach()
    total = sum(len(b["input_ids"]) for b in batches)

    def loss(flat):
        w = flat.reshape(weight.shape)
        return sum(functional_call(gm, {name: w}, args=(), kwargs=b)["loss"] * len(b["input_ids"]) / total for b in batches)

    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no second derivative
        return torch.autograd.functional.hessian(loss, weight.flatten(), vectorize=True).double()


@pytest.fixture(scope="module")
def setup():
    graph = trained_graph()
    batches = calibration_batches(graph, data(), num_samples=16, caller="test", needs_targets=True)
    return graph, explicit_hessian(graph, LINEAR, batches)


def test_power_iteration_finds_the_top_eigenvalue_of_the_explicit_hessian(setup):
    graph, hessian = setup
    eigenvalues = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    top = float(eigenvalues[eigenvalues.abs().argmax()])
    out, info = graphprune.run_pass(graph, "hessian_sensitivity", {"granularity": "linear", "names": "layer_1_attention_self_value$",
                                                                   "subsets": 1, "iterations": 500,
                                                                   "tolerance": 1e-7, "trace_samples": 0, "progress": False},
                                    data=data())
    [record] = out.meta["sensitivity"]["groups"]
    assert record["params"] == 32 * 32 and record["linears"] == [LINEAR]
    assert record["eigenvalue"] == pytest.approx(top, rel=1e-3)
    assert out.node(LINEAR).meta["graphprune.sensitivity"]["eigenvalue"] == record["eigenvalue"]
    assert info["groups"] == 1 and LINEAR in info["table"]


def test_hutchinson_trace_is_the_mean_of_v_h_v_and_estimates_the_trace(setup):
    _, hessian = setup
    shapes = [torch.Size([32, 32])]

    def hvp(vector):
        return [(hessian @ vector[0].flatten().double()).float().reshape(32, 32)]

    estimate = hutchinson_trace(hvp, shapes, samples=50, generator=torch.Generator().manual_seed(3))
    again = torch.Generator().manual_seed(3)
    vectors = [rademacher(shapes, again)[0].flatten().double() for _ in range(50)]
    assert estimate == pytest.approx(float(sum(v @ hessian @ v for v in vectors) / 50), rel=1e-4)
    # Hutchinson's variance is 2 * (||H||_F^2 - sum diag^2): the estimate lies within a few of its standard errors
    spread = (2 * (hessian.pow(2).sum() - hessian.diagonal().pow(2).sum()) / 50).sqrt()
    assert abs(estimate - float(hessian.trace())) <= 4 * float(spread)


def test_power_iteration_on_a_known_matrix():
    matrix = torch.diag(torch.tensor([5.0, -2.0, 1.0, 0.5]))
    value, steps = top_eigenvalue(lambda v: [matrix @ v[0]], [torch.Size([4])], iterations=200, tolerance=1e-9,
                                  generator=torch.Generator().manual_seed(0))
    assert value == pytest.approx(5.0, rel=1e-6) and steps < 200


def test_layer_groups_subsets_and_the_graph_left_as_it_was(setup):
    graph, _ = setup
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in graph.module.named_parameters()}
    out, _ = graphprune.run_pass(graph, "hessian_sensitivity", {"subsets": 2, "iterations": 3, "trace_samples": 1, "progress": False},
                                 data=data())
    groups = out.meta["sensitivity"]["groups"]
    assert [g["name"] for g in groups] == ["layer 0", "layer 1"]
    assert all(len(g["eigenvalues"]) == 2 and g["sensitivity"] == pytest.approx(g["eigenvalue"] + g["eigenvalue_std"]) for g in groups)
    assert all(len(g["linears"]) == 6 and g["params"] == 4 * 32 * 32 + 2 * 32 * 64 for g in groups)
    assert all(g["trace_per_param"] == pytest.approx(g["trace"] / g["params"]) for g in groups)
    assert all(torch.equal(before[k], v) for k, v in out.module.state_dict().items())
    assert {n: p.requires_grad for n, p in graph.module.named_parameters()} == flags


@pytest.mark.parametrize(
    "config, data_arg, words",
    [
        ({"granularity": "head"}, True, ["granularity", "head"]),
        ({"subsets": 3}, True, ["subsets", "3", "at most the 2 calibration batches"]),
        ({"tolerance": 1.0}, True, ["tolerance"]),
        ({"names": "("}, True, ["names", "regular expression"]),
        ({"names": "no_such"}, True, ["names = 'no_such'"]),
        ({}, False, ["needs labelled calibration data"]),
    ],
)
def test_bad_input_is_a_clear_error(config, data_arg, words):
    graph = trace_once(make_model())
    with pytest.raises(ValueError) as error:
        graphprune.run_pass(graph, "hessian_sensitivity", {**config, "progress": False}, data=data() if data_arg else None)
    assert "hessian_sensitivity" in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
    assert "sensitivity" not in graph.meta
