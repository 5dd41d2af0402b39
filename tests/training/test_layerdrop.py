"""LayerDrop during finetune (against remove_layers and the seeded draws), and remove_layers' schedules."""

import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir.modules import AttentionCore
from graphprune.training.layerdrop import LayerDrop, LayerSkip, SkipDraws

from ..models import make_model, max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once


def _layers(n):
    model = make_model()
    model.config.num_hidden_layers = n
    torch.manual_seed(0)
    return type(model)(model.config).eval()


def _no_dropout(graph):
    """Training mode then differs from evaluation only by the skips."""
    for module in graph.module.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, AttentionCore):
            module.dropout_p = 0.0
    return graph


def _skips(graph):
    return [m for m in graph.module.modules() if isinstance(m, LayerSkip)]


def _train(graph, **options):
    options = {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "progress": False, **options}
    return graphprune.finetune(graph, sentiment_data(32), tiny_tokenizer(), **options)


def test_finetune_with_layerdrop_leaves_the_graph_as_it_was():
    graph = trace_once(make_model())
    code, keys = graph.module.code, list(graph.module.state_dict())
    weights = {k: v.clone() for k, v in graph.module.state_dict().items()}
    result = _train(graph, layerdrop=0.5, eval_data=sentiment_data(8, seed=1))
    assert graph.module.code == code and list(graph.module.state_dict()) == keys
    assert not _skips(graph) and not graph.module.training
    assert any(not torch.equal(weights[k], v) for k, v in graph.module.state_dict().items())
    fresh = trace_once(make_model())  # the untouched trace, with the trained weights
    fresh.module.load_state_dict(graph.module.state_dict())
    inputs = padded_inputs(make_model(), 3, 9)
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), fresh.module(**inputs)) == 0
    assert result.losses != _train(trace_once(make_model())).losses  # layers were skipped


def test_layerdrop_leaves_the_rest_of_training_unchanged():
    # A skip that never fires: the same losses as without LayerDrop, so its draws touch no other RNG.
    assert _train(trace_once(make_model()), layerdrop=1e-12).losses == _train(trace_once(make_model())).losses


def test_skips_are_removed_after_an_error():
    class Fails:
        def on_step_end(self, graph, step, total):
            raise RuntimeError("boom")

    graph = trace_once(make_model())
    code = graph.module.code
    with pytest.raises(RuntimeError, match="boom"):
        _train(graph, layerdrop=0.5, callbacks=[Fails()])
    assert graph.module.code == code and not _skips(graph)


def test_a_training_forward_equals_the_graph_without_the_skipped_layers():
    model = _layers(4)
    graph = _no_dropout(trace_once(model))
    reference = graph.copy()
    callback = LayerDrop(0.5, seed=3)
    callback.on_train_begin(graph, 1)
    assert len(_skips(graph)) == 4
    graph.module.train()
    removed, partial = {}, 0
    for forward in range(12):
        inputs = padded_inputs(model, 2, 7, seed=forward)
        with torch.no_grad():
            out = graph.module(**inputs)
        skipped = tuple(callback.last_skipped)
        if len(skipped) == 4:
            continue  # remove_layers keeps at least one layer
        partial += 0 < len(skipped)
        if skipped not in removed:
            removed[skipped] = graphprune.run_pass(reference, "remove_layers", {"layers": list(skipped)})[0] if skipped else reference
        with torch.no_grad():
            assert max_diff(out, removed[skipped].module(**inputs)) <= 1e-5, skipped
    assert partial >= 3 and any(len(s) >= 2 for s in removed)  # the oracle saw several skip patterns
    graph.module.eval()
    inputs = padded_inputs(model, 2, 7)
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), reference.module(**inputs)) == 0  # evaluation runs every layer
    callback.on_train_end(graph)
    assert graph.module.code == reference.module.code


def test_draws_are_one_per_layer_per_forward_from_the_seed_and_near_p():
    graph = _no_dropout(trace_once(make_model()))
    p, forwards = 0.3, 150
    callback = LayerDrop(p, seed=7)
    callback.on_train_begin(graph, 1)
    graph.module.train()
    inputs = padded_inputs(make_model(), 1, 4)
    seen = []
    with torch.no_grad():
        for _ in range(forwards):
            graph.module(**inputs)
            seen.append([i in callback.last_skipped for i in range(2)])
    generator = torch.Generator().manual_seed(7)
    expected = [[float(torch.rand((), generator=generator)) < p for _ in range(2)] for _ in range(forwards)]
    assert seen == expected
    rate = sum(map(sum, seen)) / (2 * forwards)
    assert abs(rate - p) < 0.1  # 3.8 standard deviations of 300 draws; and seeded, so it cannot flake
    callback.on_train_end(graph)


def test_p_zero_changes_nothing_and_skips_touch_no_global_rng():
    graph = _no_dropout(trace_once(make_model()))
    reference = graph.copy()
    callback = LayerDrop(0.0)
    callback.on_train_begin(graph, 1)
    graph.module.train()
    inputs = padded_inputs(make_model(), 2, 6)
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), reference.module(**inputs)) == 0
    assert callback.last_skipped == []
    skip = LayerSkip(0, SkipDraws(0.5, seed=0))
    state = torch.get_rng_state()
    for _ in range(5):
        skip.train()(torch.zeros(1), torch.ones(1))
    assert torch.equal(torch.get_rng_state(), state)
    callback.on_train_end(graph)


def test_a_graph_with_skips_copies_and_evaluates():
    graph = trace_once(make_model())
    callback = LayerDrop(0.5)
    callback.on_train_begin(graph, 1)
    copied = graph.copy()
    a, b = _skips(copied)
    assert a.draws is b.draws and a.draws is not _skips(graph)[0].draws  # one generator per graph
    inputs = padded_inputs(make_model(), 2, 6)
    with torch.no_grad():
        assert max_diff(copied.module(**inputs), graph.module(**inputs)) == 0
    callback.on_train_end(graph)
    assert not _skips(graph) and len(_skips(copied)) == 2


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_bad_layerdrop_is_a_clear_error(p):
    graph = trace_once(make_model())
    with pytest.raises(ValueError, match="finetune: layerdrop"):
        _train(graph, layerdrop=p)
    with pytest.raises(ValueError, match="finetune: layerdrop"):
        LayerDrop(p)


@pytest.mark.parametrize("config,removed", [
    ({"schedule": "every_other"}, [1, 3]),
    ({"schedule": "evenly", "depth": 2}, [1, 2]),
    ({"depth": 2}, [1, 2]),
    ({"depth": 3}, [1]),  # keeps 0, round(1.5) = 2, 3
    ({"depth": 1}, [1, 2, 3]),
    ({"layers": [0], "schedule": "every_other"}, [0]),  # explicit layers win
])
def test_remove_layers_schedules_equal_the_explicit_lists(config, removed):
    model = _layers(4)
    graph = trace_once(model)
    pruned, info = graphprune.run_pass(graph, "remove_layers", config)
    assert info["removed"] == removed and info["num_layers"] == 4 - len(removed)
    explicit, _ = graphprune.run_pass(graph, "remove_layers", {"layers": removed})
    assert pruned.module.code == explicit.module.code
    inputs = padded_inputs(model, 2, 9)
    with torch.no_grad():
        assert max_diff(pruned.module(**inputs), explicit.module(**inputs)) == 0


@pytest.mark.parametrize("config,message", [
    ({"schedule": "magic"}, r"remove_layers.*'schedule' = 'magic'.*'evenly', 'every_other'"),
    ({"schedule": "evenly"}, r"remove_layers.*'depth' = None.*with schedule 'evenly'"),
    ({"schedule": "every_other", "depth": 2}, r"remove_layers.*'depth' = 2.*every_other"),
    ({"depth": 0}, r"remove_layers.*'depth' = 0.*1 <= depth"),
    ({"depth": 4}, r"remove_layers.*'depth' = 4.*1\.\.3 \(the graph has 4 layers\)"),
])
def test_bad_depth_or_schedule_is_a_clear_error(config, message):
    graph = trace_once(_layers(4))
    with pytest.raises(ValueError, match=message):
        graphprune.run_pass(graph, "remove_layers", config)
