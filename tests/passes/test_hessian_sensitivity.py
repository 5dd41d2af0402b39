"""hessian_sensitivity against the explicitly computed Hessian of a tiny model's task loss."""

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import graphprune
from graphprune.training.calibration import CalibrationData, calibration_batches
from graphprune.training.hessian import hutchinson_block_traces, hutchinson_trace, rademacher, top_eigenvalue
from tests.models import make_model, sentiment_data, tiny_tokenizer, trace_once

LINEAR = "bert_encoder_layer_1_attention_self_value"  # 32 x 32: a 1024 x 1024 Hessian


def data(n=16):
    return CalibrationData(sentiment_data(n, seed=4), tiny_tokenizer(), max_length=16, batch_size=8)


def trained_graph():
    graph = trace_once(make_model())
    graphprune.finetune(graph, sentiment_data(64), tiny_tokenizer(), epochs=4, batch_size=16, learning_rate=3e-3, progress=False)
    return graph


def explicit_hessian(graph, target: str | list[str], batches) -> torch.Tensor:
    """d2 (mean loss over all examples) / dW2 of one Linear's weight (or of several, flattened and joined in order)."""
    gm = graph.module.eval()
    names = [f"{graph.node(t).target}.weight" for t in ([target] if isinstance(target, str) else target)]
    params = dict(gm.named_parameters())
    weights = [params[n].detach() for n in names]
    total = sum(len(b["input_ids"]) for b in batches)

    def loss(flat):
        pieces = torch.split(flat, [w.numel() for w in weights])
        values = {n: piece.reshape(w.shape) for n, piece, w in zip(names, pieces, weights)}
        return sum(functional_call(gm, values, args=(), kwargs=b)["loss"] * len(b["input_ids"]) / total for b in batches)

    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no second derivative
        return torch.autograd.functional.hessian(loss, torch.cat([w.flatten() for w in weights]), vectorize=True).double()


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


def test_block_traces_from_whole_hessian_products():
    """Two blocks of a known symmetric matrix: each block's estimate is the mean of v_g^T (H v)_g and near tr(H_gg)."""
    torch.manual_seed(0)
    a = torch.randn(40, 40, dtype=torch.float64)
    matrix = a @ a.T / 40 + torch.diag(torch.linspace(0.5, 3.0, 40, dtype=torch.float64))
    shapes = [torch.Size([4, 5]), torch.Size([10]), torch.Size([2, 0]), torch.Size([10])]  # blocks: 30 entries, then 10
    bounds = [slice(0, 30), slice(30, 40)]

    def hvp(vector):
        flat = matrix @ torch.cat([v.flatten().double() for v in vector])
        return [piece.float().reshape(s) for piece, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]

    estimates = hutchinson_block_traces(hvp, shapes, [2, 2], samples=400, generator=torch.Generator().manual_seed(1))
    again = torch.Generator().manual_seed(1)
    vectors = [torch.cat([x.flatten().double() for x in rademacher(shapes, again)]) for _ in range(400)]
    for estimate, block in zip(estimates, bounds):
        assert estimate == pytest.approx(float(sum(v[block] @ (matrix[block] @ v) for v in vectors) / 400), rel=1e-4)
        # the variance of v_g^T (H v)_g is 2 * (sum of the squared entries of H's rows in g, less the block's diagonal)
        spread = (2 * (matrix[block].pow(2).sum() - matrix[block, block].diagonal().pow(2).sum()) / 400).sqrt()
        assert abs(estimate - float(matrix[block, block].trace())) <= 4 * float(spread)
    with pytest.raises(ValueError, match="3 tensors but there are 4 shapes"):
        hutchinson_block_traces(hvp, shapes, [2, 1], samples=1, generator=torch.Generator())


def test_joint_trace_of_one_group_is_its_block_trace_and_skips_the_eigenvalue(setup):
    graph, hessian = setup
    config = {"granularity": "linear", "names": "layer_1_attention_self_value$", "eigenvalue": False, "trace_samples": 5, "progress": False}
    [block] = graphprune.run_pass(graph, "hessian_sensitivity", config, data=data())[0].meta["sensitivity"]["groups"]
    out, info = graphprune.run_pass(graph, "hessian_sensitivity", {**config, "joint_trace": True}, data=data())
    [joint] = out.meta["sensitivity"]["groups"]
    assert joint["trace"] == pytest.approx(block["trace"], rel=1e-6)  # the same probes, the same products
    assert joint["eigenvalue"] is None and joint["sensitivity"] is None and joint["eigenvalues"] == []
    assert " - " in info["table"]


def test_joint_traces_are_the_block_means_of_v_h_v_over_the_explicit_joint_hessian(setup):
    graph, _ = setup
    linears = ["bert_encoder_layer_1_attention_self_query", LINEAR]
    config = {"granularity": "linear", "names": "layer_1_attention_self_(query|value)$", "eigenvalue": False, "trace_samples": 6,
              "joint_trace": True, "seed": 2, "progress": False}
    out, _ = graphprune.run_pass(graph, "hessian_sensitivity", config, data=data())
    groups = out.meta["sensitivity"]["groups"]
    assert [g["linears"] for g in groups] == [[n] for n in linears]
    batches = calibration_batches(graph, data(), num_samples=96, seed=2, caller="test", needs_targets=True)
    hessian = explicit_hessian(graph, linears, batches)  # 2048 x 2048: both weights together
    shapes = [torch.Size([32, 32])] * 2
    again = torch.Generator().manual_seed(2)  # the pass's generator, drawing the same probes in the same order
    vectors = [torch.cat([x.flatten().double() for x in rademacher(shapes, again)]) for _ in range(6)]
    for group, block in zip(groups, (slice(0, 1024), slice(1024, 2048))):
        expected = float(sum(v[block] @ (hessian[block] @ v) for v in vectors) / 6)
        assert group["trace"] == pytest.approx(expected, rel=1e-3, abs=1e-9)


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
        ({"eigenvalue": False, "trace_samples": 0}, True, ["trace_samples", "eigenvalue = false"]),
    ],
)
def test_bad_input_is_a_clear_error(config, data_arg, words):
    graph = trace_once(make_model())
    with pytest.raises(ValueError) as error:
        graphprune.run_pass(graph, "hessian_sensitivity", {**config, "progress": False}, data=data() if data_arg else None)
    assert "hessian_sensitivity" in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
    assert "sensitivity" not in graph.meta
