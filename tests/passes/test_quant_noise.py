"""Quant-Noise (``finetune(..., quant_noise=p)``) against its definition: each block of a weight is
either exactly the quantizer's eval output or exactly the float weight, the chosen share is p,
gradients pass straight through both, and nothing changes outside training."""

import pytest
import torch
from torch.nn.utils import parametrize

import graphprune
from graphprune.training.quant_noise import QuantNoise, weight_quantizers
from graphprune.passes.quantization.quantizers import Quantizer

from ..models import make_model, max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

FORMATS = {  # a per-element grid, and a format whose scale is shared by a block of 32
    "integer": {"weight_width": 4, "weight_frac_width": 2},
    "mxint8": {"weight_block_size": 32},
}
QUANTIZE = {  # 4-bit integer weights fitted to each tensor, 8-bit inputs; the attention operands too
    "by": "type",
    "linear": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4,
               "weight_width": 4, "weight_frac_width": "auto", "bias_width": 8, "bias_frac_width": "auto"},
    "matmul": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4, "weight_width": 8, "weight_frac_width": 4},
}
TRAIN = dict(max_steps=3, batch_size=8, learning_rate=1e-2, progress=False)


def noisy(fmt: str, p: float, block: int = 8) -> Quantizer:
    q = Quantizer(fmt, "weight", FORMATS[fmt]).train()
    q.noise_fraction, q.noise_block = p, block
    return q


def block_states(out, quantized, weight, block: int) -> torch.Tensor:
    """Per row and block: True if the block is q(w), False if it is w; fails on a block that mixes."""
    states = []
    for start in range(0, weight.shape[-1], block):  # the last block is partial (203 = 25 * 8 + 3)
        o, q, w = (t[:, start : start + block] for t in (out, quantized, weight))
        is_q, is_w = (o == q).all(-1), (o == w).all(-1)
        assert torch.all(is_q | is_w), f"a block starting at column {start} mixes quantized and float values"
        states.append(is_q & ~is_w)
    return torch.stack(states, -1)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_blocks_are_all_or_nothing_and_their_share_is_p(fmt):
    torch.manual_seed(0)
    weight = 2 * torch.randn(256, 203)
    q = noisy(fmt, 0.3)
    with torch.no_grad():
        reference = q.eval()(weight)  # the quantizer's own output, no noise
        assert not torch.equal(reference, weight)
        q.train()
        first, second = q(weight), q(weight)
    states = block_states(first, reference, weight, 8)
    assert states.shape == (256, 26)
    # 6,656 independent blocks: the share's standard deviation is 0.0056; seeded anyway
    assert abs(states.float().mean().item() - 0.3) < 0.03
    assert not torch.equal(block_states(second, reference, weight, 8), states)  # drawn again every forward pass
    # the block is a setting: 32-element blocks give a quarter as many draws per row
    assert block_states(noisy(fmt, 0.3, block=32)(weight).detach(), reference, weight, 32).shape == (256, 7)
    # p = 1 is ordinary QAT
    with torch.no_grad():
        assert torch.equal(noisy(fmt, 1.0)(weight), reference)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gradients_pass_straight_through_both_kinds_of_block(fmt):
    torch.manual_seed(1)
    weight = (2 * torch.randn(64, 45)).requires_grad_()
    upstream = torch.randn(64, 45)
    q = noisy(fmt, 0.5)
    out = q(weight)
    (out * upstream).sum().backward()
    states = block_states(out.detach(), q.eval()(weight).detach(), weight.detach(), 8)
    assert states.any() and not states.all()  # both kinds present
    assert torch.equal(weight.grad, upstream)


def test_no_noise_in_eval_mode_or_at_p_zero_is_the_old_forward():
    torch.manual_seed(2)
    weight = 2 * torch.randn(32, 20)
    for q, training in ((noisy("integer", 0.0), True), (noisy("integer", 0.5), False)):
        q.train(training)
        state = torch.get_rng_state()
        assert torch.equal(q(weight), q._fn(weight))  # bit-identical
        assert torch.equal(torch.get_rng_state(), state)  # and draws nothing: dropout's draws stay the same
    assert Quantizer("integer", "weight", FORMATS["integer"]).noise_fraction == 0.0


@pytest.fixture(scope="module")
def quantized():
    graph, _ = graphprune.run_pass(trace_once(make_model()), "quantize", QUANTIZE)
    return graph


def test_finetune_with_quant_noise_trains_and_leaves_no_noise(quantized, tmp_path):
    graph = quantized.copy()
    quantizers = weight_quantizers(graph.module)
    assert len(quantizers) == 2 * 6 + 2  # six Linear layers per encoder layer, pooler and classifier
    query = graph.module.get_submodule("bert.encoder.layer.0.attention.self.query")
    core = graph.module.get_submodule("bert.encoder.layer.0.attention.self.attention_core")
    seen = []

    class Spy:
        def on_step_end(self, graph, step, total):
            seen.append((
                {q.noise_fraction for q in quantizers}, {q.noise_block for q in quantizers},
                core.key_quantizer.noise_fraction,  # an activation quantized with weight_ keys: no noise
                not torch.equal(query.weight, query.weight),  # a fresh draw on every access in training
            ))

    result = graphprune.finetune(graph, sentiment_data(32), tiny_tokenizer(), callbacks=[Spy()], quant_noise=0.25, **TRAIN)
    assert result.steps == 3
    assert seen == [({0.25}, {8}, 0.0, True)] * 3
    assert all(q.noise_fraction == 0.0 for q in graph.module.modules() if isinstance(q, Quantizer))
    assert not graph.module.training

    inputs = padded_inputs(make_model(), 3, 11)
    with torch.no_grad():
        out = graph.module(**inputs)
        assert max_diff(graph.module(**inputs), out) == 0.0  # no leftover noise
        weight = query.weight
        assert torch.equal(weight, query.parametrizations.weight[-1].eval()(query.parametrizations.weight.original))
    graph.save(tmp_path / "qn")
    loaded = graphprune.load(tmp_path / "qn")
    with torch.no_grad():
        assert max_diff(loaded.module(**inputs), out) == 0.0
    assert all(q.noise_fraction == 0.0 for q in weight_quantizers(loaded.module)) and weight_quantizers(loaded.module)
    assert loaded.history[-1]["config"]["quant_noise"] == 0.25


def test_noise_is_switched_off_after_an_error_too(quantized):
    graph = quantized.copy()

    class Fails:
        def on_step_end(self, graph, step, total):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        graphprune.finetune(graph, sentiment_data(16), tiny_tokenizer(), callbacks=[Fails()], quant_noise=0.5, **TRAIN)
    assert all(q.noise_fraction == 0.0 for q in weight_quantizers(graph.module))


@pytest.mark.parametrize("quantize", [None, {"add": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4}}],
                         ids=["unquantized", "activations only"])
def test_quant_noise_needs_weight_quantizers_and_leaves_the_graph_alone(quantize):
    graph = trace_once(make_model())
    if quantize:
        graph, _ = graphprune.run_pass(graph, "quantize", quantize)
    state = {k: v.clone() for k, v in graph.module.state_dict().items()}
    history = list(graph.history)
    with pytest.raises(ValueError, match=r"finetune: quant_noise = 0.1 needs a quantized graph \(run the 'quantize' pass with weight formats first\)"):
        graphprune.finetune(graph, sentiment_data(16), tiny_tokenizer(), quant_noise=0.1, **TRAIN)
    assert graph.history == history
    after = graph.module.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(parametrize.is_parametrized(m) for m in graph.module.modules())


def test_callback_checks_its_arguments():
    with pytest.raises(ValueError, match="quant_noise = 1.5"):
        QuantNoise(1.5)
    with pytest.raises(ValueError, match="quant_noise_block = 0"):
        QuantNoise(0.1, block=0)
