"""Reweighted Proximal Pruning: the proximal step against its formula, the reweighting
schedule, and ``finetune(rpp=...)`` end to end (zeros, masks, commit, bad options)."""

import json
from types import SimpleNamespace

import pytest
import torch

import graphprune
from graphprune.ir.masks import mask_of, set_mask, unmasked_weight
from graphprune.training.rpp import ReweightedProximal, RppConfig

from ..models import make_model, sentiment_data, tiny_tokenizer, trace_once

# the six encoder projections of the tiny BERT, by name (independent of the role metadata)
SELECTED = [
    f"bert.encoder.layer.{i}.{part}"
    for i in range(2)
    for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
]


def effective(module):
    mask = mask_of(module)
    weight = unmasked_weight(module).detach()
    return weight if mask is None else torch.where(mask.mask, weight, 0.0)


def fake_optimizer(graph, lr):
    """What the callback reads of an optimizer: param groups holding the graph's weights, with an lr."""
    return SimpleNamespace(param_groups=[{"params": list(graph.module.parameters()), "lr": lr}])


@pytest.fixture
def graph():
    return trace_once(make_model())


def test_proximal_step_matches_the_formula(graph):
    gm = graph.module
    torch.manual_seed(0)
    masked = gm.get_submodule(SELECTED[0])
    set_mask(masked, torch.rand_like(masked.weight) > 0.3)  # a weight that already carries a mask
    modules = {name: gm.get_submodule(name) for name in SELECTED}
    params = {name: unmasked_weight(m) for name, m in modules.items()}
    others = {k: v.detach().clone() for k, v in gm.named_parameters() if not any(k.startswith(n + ".") for n in SELECTED)}
    w_ref = {name: p.detach().clone() for name, p in params.items()}
    values = torch.cat([effective(m).abs().flatten() for m in modules.values()])
    lam = 0.5 * values[values != 0].mean().item()

    callback = ReweightedProximal(RppConfig(penalty=0.5, epsilon=1e-3, reweight_every=10))
    callback.on_train_begin(graph, 10)
    callback.on_optimizer(fake_optimizer(graph, lr=1e-2))
    with torch.no_grad():  # stands for the optimizer's own step
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    stepped = {name: p.detach().clone() for name, p in params.items()}
    callback.on_step_end(graph, 1, 10)

    assert callback.penalty == pytest.approx(lam)
    for name, p in params.items():
        expected = torch.sign(stepped[name]) * torch.relu(stepped[name].abs() - 1e-2 * lam / (w_ref[name].abs() + 1e-3))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
        assert p is unmasked_weight(modules[name])  # the optimizer's Parameter objects are kept
    assert mask_of(masked) is not None
    assert all(torch.equal(v, dict(gm.named_parameters())[k]) for k, v in others.items())


def test_reweighting_every_k_steps(graph):
    callback = ReweightedProximal(RppConfig(penalty=1.0, reweight_every=3))
    callback.on_train_begin(graph, 7)
    callback.on_optimizer(fake_optimizer(graph, lr=1e-3))
    weight = unmasked_weight(graph.module.get_submodule(SELECTED[4]))
    changed = []
    for step in range(1, 8):
        before = {k: v.clone() for k, v in callback.reweights.items()}
        callback.on_step_end(graph, step, 7)
        if any(not torch.equal(before[k], v) for k, v in callback.reweights.items()):
            changed.append(step)
        if step == 6:
            w_ref = weight.detach().clone()  # the weights after step 6's proximal step
    assert changed == [3, 6] and callback.reweighted_at == [0, 3, 6]
    assert not torch.equal(weight.detach(), w_ref)  # step 7 moved the weights, not r
    torch.testing.assert_close(callback.reweights[SELECTED[4]], 1 / (w_ref.abs() + 1e-3), rtol=0, atol=0)


def test_large_penalty_zeros_the_selected_weights_only(graph):
    gm = graph.module
    zeros_before = {k: int((v == 0).sum()) for k, v in gm.named_parameters()}
    graphprune.finetune(graph, sentiment_data(32), tiny_tokenizer(), max_steps=12, batch_size=8, learning_rate=1e-3,
                        rpp={"penalty": 20.0}, progress=False)
    callback_report = graph.meta["rpp"]
    selected = torch.cat([gm.get_submodule(n).weight.detach().flatten() for n in SELECTED])
    share = (selected == 0).float().mean().item()
    assert share > 0.5 and callback_report["zeros_before_masks"] == pytest.approx(share)
    assert callback_report["sparsity"] is None and all(mask_of(gm.get_submodule(n)) is None for n in SELECTED)
    for name, p in gm.named_parameters():
        if not any(name == n + ".weight" for n in SELECTED):  # embeddings, LayerNorms, biases, pooler, classifier
            assert int((p == 0).sum()) <= zeros_before[name], name
    json.dumps(graph.meta["rpp"])
    assert graph.meta["sparsity"]["totals"]["zero_weights"] >= int((selected == 0).sum())


def test_final_sparsity_masks_and_commits(graph):
    gm = graph.module
    tokenizer = tiny_tokenizer()
    graphprune.finetune(graph, sentiment_data(32), tokenizer, max_steps=8, batch_size=8, learning_rate=1e-3,
                        rpp={"penalty": 2.0, "sparsity": 0.7, "mask_at": 1.0}, progress=False)
    masks = [mask_of(gm.get_submodule(n)) for n in SELECTED]
    assert all(m is not None for m in masks)
    assert all(mask_of(m) is None for name, m in gm.named_modules() if name not in SELECTED)
    total = sum(m.mask.numel() for m in masks)
    dropped = sum(int((~m.mask).sum()) for m in masks)
    assert dropped == round(0.7 * total) and graph.meta["rpp"]["sparsity"] == pytest.approx(0.7, abs=1 / total)
    assert 0 < graph.meta["rpp"]["zeros_before_masks"] < 0.7
    # one global threshold: every kept weight is at least as large as every masked one
    kept = torch.cat([unmasked_weight(gm.get_submodule(n)).detach().abs()[m.mask] for n, m in zip(SELECTED, masks)])
    gone = torch.cat([unmasked_weight(gm.get_submodule(n)).detach().abs()[~m.mask] for n, m in zip(SELECTED, masks)])
    assert kept.min() >= gone.max()
    batch = tokenizer(sentiment_data(6, seed=3).texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        masked_out = gm(**batch).logits
    assert sorted(graphprune.commit_masks(graph)) == sorted(SELECTED)
    with torch.no_grad():
        committed_out = graph.module(**batch).logits
    assert torch.equal(masked_out, committed_out)
    selected = torch.cat([graph.module.get_submodule(n).weight.detach().flatten() for n in SELECTED])
    assert int((selected == 0).sum()) >= dropped
    assert graph.meta["rpp"]["masked_at_step"] == 8


class Snapshots:
    """A callback after the RPP one: the selected weights and masks after every step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, graph, step, total_steps):
        modules = [graph.module.get_submodule(n) for n in SELECTED]
        weights = torch.cat([unmasked_weight(m).detach().flatten() for m in modules])
        masks = [mask_of(m) for m in modules]
        keep = None if masks[0] is None else torch.cat([m.mask.flatten() for m in masks])
        self.steps.append((step, weights.clone(), keep))


def test_masks_go_in_at_mask_at_and_the_rest_of_the_run_retrains_without_proximal_steps(graph):
    tokenizer = tiny_tokenizer()
    rpp = ReweightedProximal(RppConfig(penalty=20.0, sparsity=0.3, mask_at=0.5, mask_from=None))
    spy = Snapshots()
    graphprune.finetune(graph, sentiment_data(64), tokenizer, max_steps=10, batch_size=8, learning_rate=1e-3,
                        callbacks=[rpp, spy], progress=False)
    assert graph.meta["rpp"]["masked_at_step"] == 5 and graph.meta["rpp"]["mask_at"] == 0.5
    by_step = {step: (w, keep) for step, w, keep in spy.steps}
    assert all(by_step[s][1] is None for s in range(1, 5))
    weights, keep = by_step[5]
    assert int((~keep).sum()) == round(0.3 * keep.numel())
    assert weights.abs()[keep].min() >= weights.abs()[~keep].max()  # one global threshold at the mask step
    assert all(torch.equal(by_step[s][1], keep) for s in range(6, 11))  # the masks stay as they went in
    # before the masks the penalty (20x the mean |w| a step) grew the zeros; after them, with no proximal
    # step, AdamW moves kept zeros off zero: a proximal step would have put them back
    zeros = [int((by_step[s][0][keep] == 0).sum()) for s in range(5, 11)]
    assert zeros[0] > 0 and zeros[-1] < zeros[0]
    assert int((by_step[4][0] == 0).sum()) > int((by_step[1][0] == 0).sum())
    assert graph.meta["rpp"]["sparsity"] == pytest.approx(0.3, abs=1 / keep.numel())
    assert graph.meta["rpp"]["zeros_before_masks"] == pytest.approx(float((weights == 0).float().mean()))


def test_mask_from_grows_the_masks_on_the_cubic_schedule_with_one_global_threshold_each_cut(graph):
    rpp = ReweightedProximal(RppConfig(penalty=4.0, sparsity=0.6, mask_at=0.6, mask_from=0.1, mask_every=2))
    spy = Snapshots()
    graphprune.finetune(graph, sentiment_data(64), tiny_tokenizer(), max_steps=20, batch_size=8, learning_rate=1e-3,
                        callbacks=[rpp, spy], progress=False)
    # the ramp runs from step 2 to step 12: s_t = 0.6 * (1 - (1 - (t - 2) / 10) ** 3), by Zhu and Gupta's formula
    expected = [(t, 0.6 * (1 - (1 - (t - 2) / 10) ** 3)) for t in (4, 6, 8, 10)] + [(12, 0.6)]
    assert [t for t, _ in rpp.cuts] == [t for t, _ in expected]
    assert [s for _, s in rpp.cuts] == pytest.approx([s for _, s in expected])
    by_step = {step: (w, keep) for step, w, keep in spy.steps}
    assert all(by_step[s][1] is None for s in range(1, 4))
    for t, share in expected:
        weights, keep = by_step[t]
        assert int((~keep).sum()) == round(share * keep.numel())
        assert weights.abs()[keep].min() >= weights.abs()[~keep].max()
    assert all(torch.equal(by_step[s][1], by_step[12][1]) for s in range(13, 21))  # the last cut's masks stay
    meta = graph.meta["rpp"]
    assert meta["masked_at_step"] == 12 and meta["cuts"] == 5 and meta["mask_from"] == 0.1
    assert meta["sparsity"] == pytest.approx(0.6, abs=1 / by_step[12][1].numel())


class Stop(RuntimeError):
    pass


class StopAt:
    """A callback that stops the run with :class:`Stop` at the end of one step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, graph, step, total_steps):
        if step == self.step:
            raise Stop


def test_no_masks_if_the_run_stops_before_mask_at(graph):
    with pytest.raises(Stop):
        graphprune.finetune(graph, sentiment_data(64), tiny_tokenizer(), max_steps=10, batch_size=8, learning_rate=1e-3,
                            callbacks=[StopAt(3)], rpp={"penalty": 2.0, "sparsity": 0.7, "mask_at": 0.5, "mask_from": None}, progress=False)
    assert all(mask_of(graph.module.get_submodule(n)) is None for n in SELECTED)


def test_without_a_sparsity_the_ramp_makes_no_masks(graph):
    graphprune.finetune(graph, sentiment_data(64), tiny_tokenizer(), max_steps=8, batch_size=8, learning_rate=1e-3,
                        rpp={"penalty": 2.0, "mask_from": 0.0, "mask_every": 2}, progress=False)
    assert graph.meta["rpp"]["cuts"] == 0 and graph.meta["rpp"]["sparsity"] is None
    assert all(mask_of(graph.module.get_submodule(n)) is None for n in SELECTED)


def test_a_run_stopped_within_the_ramp_keeps_the_cuts_it_made(graph):
    with pytest.raises(Stop):
        graphprune.finetune(graph, sentiment_data(64), tiny_tokenizer(), max_steps=20, batch_size=8, learning_rate=1e-3, callbacks=[StopAt(5)],
                            rpp={"penalty": 2.0, "sparsity": 0.7, "mask_at": 0.5, "mask_from": 0.0, "mask_every": 2}, progress=False)
    masks = [mask_of(graph.module.get_submodule(n)) for n in SELECTED]
    total = sum(m.mask.numel() for m in masks)
    assert sum(int((~m.mask).sum()) for m in masks) == round(0.7 * (1 - (1 - 4 / 10) ** 3) * total)  # step 4's cut, the last before the stop


@pytest.mark.parametrize(
    "rpp, message",
    [
        ({"pnalty": 1.0}, r"rpp\.pnalty = 1\.0 is not allowed; expected one of the rpp options"),
        ({"penalty": 0}, r"rpp\.penalty = 0 is not allowed"),
        ({"penalty": -1.0}, r"rpp\.penalty = -1\.0 is not allowed"),
        ({"sparsity": 1.0}, r"rpp\.sparsity = 1\.0 is not allowed"),
        ({"reweight_every": 0}, r"rpp\.reweight_every = 0 is not allowed"),
        ({"mask_at": 0}, r"rpp\.mask_at = 0 is not allowed; expected a fraction in \(0, 1\]"),
        ({"mask_at": 1.5}, r"rpp\.mask_at = 1\.5 is not allowed"),
        ({"sparsity": 0.5, "mask_at": 0.5, "mask_from": 0.5}, r"rpp\.mask_from = 0\.5 is not allowed; expected None or a fraction in \[0, mask_at = 0\.5\)"),
        ({"sparsity": 0.5, "mask_from": 0.1, "mask_every": 0}, r"rpp\.mask_every = 0 is not allowed; expected an integer >= 1"),
        ({"roles": ["queries"]}, r"rpp\.roles = \['queries'\] is not allowed"),
    ],
)
def test_bad_rpp_options_fail_before_training(graph, rpp, message):
    state = {k: v.clone() for k, v in graph.module.state_dict().items()}
    history, meta = list(graph.history), json.dumps(graph.meta, sort_keys=True, default=str)
    options = dict(rpp)
    with pytest.raises(ValueError, match=message):
        graphprune.finetune(graph, sentiment_data(8), tiny_tokenizer(), max_steps=2, batch_size=4, rpp=options, progress=False)
    assert options == rpp
    assert all(torch.equal(v, graph.module.state_dict()[k]) for k, v in state.items())
    assert graph.history == history and json.dumps(graph.meta, sort_keys=True, default=str) == meta
