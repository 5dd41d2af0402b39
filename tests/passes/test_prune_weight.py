"""prune_weight against torch's pruning utilities and formulas computed here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import graphprune
from graphprune.ir.masks import MovementMask, mask_of
from graphprune.ir.metadata import common
from graphprune.training.calibration import CalibrationData, calibration_batches

from ..models import TINY, make_model, max_diff, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

ENCODER = ("query", "key", "value", "attention_output", "ffn_up", "ffn_down")
DATA_METHODS = ("taylor", "wanda", "sparsegpt")


def calib(n=48):
    return CalibrationData(sentiment_data(n, seed=3), tiny_tokenizer(), batch_size=16)


def traced(name="BertForSequenceClassification"):
    return trace_once(make_model(name))


def linears(graph, roles=ENCODER) -> dict:
    graph = graphprune.run_pass(graph, "init_metadata")[0] if not any(common(n) for n in graph.nodes) else graph
    found = {}
    for node in graph.nodes:
        if node.op == "call_module" and common(node).get("role") in roles:
            found[node.target] = graph.module.get_submodule(node.target)
    return found


def weights(graph, roles=ENCODER) -> dict:
    return {k: m.weight.detach().clone() for k, m in linears(graph, roles).items()}


def run(graph, config, data=None):
    return graphprune.run_pass(graph, "prune_weight", config, data=data)[0]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_l1_local_equals_torch_l1_unstructured(sparsity):
    graph = traced()
    dense = {k: copy.deepcopy(m) for k, m in linears(graph).items()}
    pruned = run(graph, {"method": "l1", "sparsity": sparsity})
    for name, module in linears(pruned).items():
        reference = dense[name]
        prune.l1_unstructured(reference, "weight", amount=sparsity)
        assert torch.equal(mask_of(module).mask, reference.weight_mask.bool()), name
        assert torch.equal(module.weight, reference.weight)


@pytest.mark.parametrize("sparsity", [0.4, 0.7])
def test_l1_global_equals_torch_global_unstructured(sparsity):
    graph = traced()
    dense = {k: copy.deepcopy(m) for k, m in linears(graph).items()}
    pruned = run(graph, {"method": "l1", "sparsity": sparsity, "scope": "global"})
    prune.global_unstructured([(m, "weight") for m in dense.values()], pruning_method=prune.L1Unstructured, amount=sparsity)
    for name, module in linears(pruned).items():
        assert torch.equal(mask_of(module).mask, dense[name].weight_mask.bool()), name
    sizes = [m.weight.numel() for m in dense.values()]
    assert sum(int((~mask_of(m).mask).sum()) for m in linears(pruned).values()) == round(sparsity * sum(sizes))


@pytest.mark.parametrize("method", ["random", "l1", "taylor", "wanda", "sparsegpt", "movement"])
@pytest.mark.parametrize("sparsity", [0.3, 0.65])
def test_achieved_sparsity_is_the_request_within_one_element_per_tensor(method, sparsity):
    graph = traced()
    pruned = run(graph, {"method": method, "sparsity": sparsity}, data=calib() if method in DATA_METHODS else None)
    for name, module in linears(pruned).items():
        zeros = int((~mask_of(module).mask).sum())
        assert abs(zeros - sparsity * module.weight.numel()) <= 1, (name, zeros)
        assert int((module.weight == 0).sum()) >= zeros


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
@pytest.mark.parametrize("method", ["l1", "wanda", "sparsegpt"])
def test_n_m_prunes_n_of_every_m_inputs(method, n, m):
    graph = traced()
    pruned = run(graph, {"method": method, "granularity": f"{n}:{m}"}, data=calib() if method in DATA_METHODS else None)
    for name, module in linears(pruned).items():
        groups = (~mask_of(module).mask).view(module.out_features, -1, m).sum(dim=2)
        assert torch.all(groups == n), name  # at least n, and exactly n on a fresh model
        assert torch.all(module.weight.view(module.out_features, -1, m).eq(0).sum(dim=2) >= n)


def test_row_granularity_prunes_whole_rows_by_their_l1_norm():
    graph = traced()
    dense = weights(graph)
    pruned = run(graph, {"method": "l1", "granularity": "row", "sparsity": 0.25})
    for name, module in linears(pruned).items():
        kept_rows = mask_of(module).mask.all(dim=1)
        assert torch.equal(mask_of(module).mask, kept_rows.unsqueeze(1).expand_as(module.weight))
        norms = dense[name].abs().mean(dim=1)
        assert int((~kept_rows).sum()) == round(0.25 * len(norms))
        assert norms[~kept_rows].max() <= norms[kept_rows].min()


def _inputs_of(model, batches, module_path):
    """The Linear's input rows on real tokens, captured from the eager model (the test's own oracle)."""
    rows = []
    module = model.get_submodule(module_path)
    current = {}
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0][current["mask"]]))
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    return torch.cat(rows)


def test_wanda_scores_equal_the_formula():
    from graphprune.passes.pruning import scores as scoring
    from graphprune.passes.pruning.targets import select_targets
    from graphprune.passes.pruning.prune_weight import WeightEntry

    model = make_model()
    graph = trace_once(copy.deepcopy(model))
    batches = calibration_batches(graph, calib(), num_samples=48, caller="test")
    targets = select_targets(graph, "role", WeightEntry(method="wanda"), {})
    got = scoring.wanda_scores(targets, scoring.input_square_sums(graph, targets, batches))
    for t in targets:
        x = _inputs_of(model, batches, t.path).double()
        expected = model.get_submodule(t.path).weight.detach().abs() * x.pow(2).sum(0).sqrt().float()
        assert torch.allclose(got[t.path], expected, rtol=1e-5, atol=1e-7), t.path
    # and the pass prunes the lowest of those scores in every output row
    pruned = run(graph, {"method": "wanda", "sparsity": 0.5, "sequential": False}, data=calib())
    for t in targets:
        mask = mask_of(linears(pruned)[t.path]).mask
        s = got[t.path]
        assert torch.all(s.masked_fill(mask, -math.inf).max(dim=1).values <= s.masked_fill(~mask, math.inf).min(dim=1).values)


def test_taylor_scores_equal_the_formula():
    from graphprune.passes.pruning import scores as scoring
    from graphprune.passes.pruning.targets import select_targets
    from graphprune.passes.pruning.prune_weight import WeightEntry

    model = make_model()
    graph = trace_once(copy.deepcopy(model))
    batches = calibration_batches(graph, calib(), num_samples=48, caller="test", needs_targets=True)
    targets = select_targets(graph, "role", WeightEntry(method="taylor"), {})
    got = scoring.taylor_scores(graph, targets, batches)
    expected = {t.path: torch.zeros_like(t.module.weight) for t in targets}
    for batch in batches:  # sum over batches of |W * dL_b/dW|, on the eager model
        model.zero_grad()
        model(**batch).loss.backward()
        for t in targets:
            w = model.get_submodule(t.path).weight
            expected[t.path] += (w * w.grad).abs().detach()
    for t in targets:
        assert torch.allclose(got[t.path], expected[t.path], rtol=1e-4, atol=1e-9), t.path
    assert all(t.module.weight.grad is None for t in targets)  # the graph is left without gradients


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged():
    graph = traced()
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    pruned = run(graph, {"method": "sparsegpt", "sparsity": 0.0}, data=calib())
    assert all(torch.equal(before[k], v) for k, v in pruned.module.state_dict().items())
    assert all(mask_of(m) is None for m in linears(pruned).values())


@pytest.mark.parametrize("layer", ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense"])
def test_sparsegpt_reconstructs_the_layer_output_better_than_l1_and_wanda(layer):
    model = make_model()
    graph = trace_once(copy.deepcopy(model))
    data = calib(96)
    batches = calibration_batches(graph, data, num_samples=96, caller="test")
    x = _inputs_of(model, batches, layer)
    dense = model.get_submodule(layer).weight.detach()
    errors = {}
    for method in ("l1", "wanda", "sparsegpt"):
        only = {"by": "name", "default": {"sparsity": 0.0}, layer.replace(".", r"\."): {"method": method, "sparsity": 0.5}}
        pruned = run(graph, only, data=data if method != "l1" else None)
        w = pruned.module.get_submodule(layer).weight.detach()
        assert int((w == 0).sum()) == dense.numel() // 2
        errors[method] = (x @ (w - dense).T).pow(2).sum().item()
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["l1"], errors


@pytest.mark.parametrize("method", ["random", "l1", "taylor", "wanda", "sparsegpt"])
def test_pruning_again_keeps_every_earlier_pruned_weight(method):
    data = calib() if method in DATA_METHODS else None
    once = run(traced(), {"method": method, "sparsity": 0.3}, data=data)
    first = {k: ~mask_of(m).mask for k, m in linears(once).items()}
    parameters = {k: mask_of(m) for k, m in linears(once).items()}
    twice, _ = graphprune.run_pass(once, "prune_weight", {"method": method, "sparsity": 0.6}, data=data, inplace=True)
    for name, module in linears(twice).items():
        now = ~mask_of(module).mask
        assert torch.all(now[first[name]]), name  # earlier pruned stay pruned
        assert abs(int(now.sum()) - 0.6 * now.numel()) <= 1
        assert mask_of(module) is parameters[name]  # updated in place: an optimizer's parameters stay valid


def test_masks_survive_training_and_commit_to_plain_weights(tmp_path):
    graph = run(traced(), {"method": "l1", "sparsity": 0.5})
    tokenizer = tiny_tokenizer()
    before = {k: m.parametrizations.weight.original.detach().clone() for k, m in linears(graph).items()}
    graphprune.finetune(graph, sentiment_data(48), tokenizer, max_steps=5, batch_size=16, learning_rate=5e-2, progress=False)
    for name, module in linears(graph).items():
        mask = mask_of(module).mask
        assert torch.all(module.weight[~mask] == 0), name  # exactly zero after optimizer steps
        assert not torch.equal(module.parametrizations.weight.original[mask], before[name][mask])
    inputs = padded_inputs(make_model(), 3, 9)
    with torch.no_grad():
        expected = graph.module(**inputs).logits
    committed, info = graphprune.run_pass(graph, "commit_masks")
    assert info["modules"] == 12
    assert all(type(m) is nn.Linear and mask_of(m) is None for m in linears(committed).values())
    with torch.no_grad():
        assert torch.equal(committed.module(**inputs).logits, expected)


def test_masks_save_and_reload_bit_identically_with_masks_in_place(tmp_path):
    graph = run(traced(), {"method": "wanda", "sparsity": 0.6, "ffn_down": {"method": "sparsegpt", "granularity": "2:4"}}, data=calib())
    graph.save(tmp_path / "masked")
    again = graphprune.load(tmp_path / "masked")
    for name, module in linears(again).items():
        original = linears(graph)[name]
        assert torch.equal(mask_of(module).mask, mask_of(original).mask)
        assert torch.equal(module.parametrizations.weight.original, original.parametrizations.weight.original)
    inputs = padded_inputs(make_model(), 2, 7)
    with torch.no_grad():
        assert max_diff(again.module(**inputs), graph.module(**inputs)) == 0.0
    assert again.history[-1]["pass"] == "prune_weight" and "data" in again.history[-1]


def test_a_committed_sparse_checkpoint_is_compact_and_reloads_bit_identically(tmp_path):
    import transformers as tf

    from ..models import TINY

    torch.manual_seed(0)  # wider layers than TINY, so that the Linear weights dominate as in a real encoder
    model = tf.BertForSequenceClassification(tf.BertConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 512})).eval()
    graph = trace_once(model)
    graph.save(tmp_path / "dense")
    pruned = run(graph, {"method": "l1", "sparsity": 0.5})
    committed, _ = graphprune.run_pass(pruned, "commit_masks")
    committed.save(tmp_path / "sparse")
    dense_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sparse_bytes = (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert sparse_bytes <= 0.8 * dense_bytes, (sparse_bytes, dense_bytes)
    again = graphprune.load(tmp_path / "sparse")
    for key, value in committed.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[key], value), key
        assert torch.equal(torch.signbit(again.module.state_dict()[key]), torch.signbit(value)) if value.is_floating_point() else True


def test_movement_scores_learn_by_the_straight_through_rule():
    graph = run(traced(), {"method": "movement", "sparsity": 0.0})
    module = graph.module.get_submodule("bert.encoder.layer.0.intermediate.dense")
    mask = mask_of(module)
    assert isinstance(mask, MovementMask) and bool(mask.mask.all())
    inputs = padded_inputs(make_model(), 2, 7)
    captured = {}
    module.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    out = graph.module(**inputs, labels=torch.tensor([0, 1]))
    grad_out = torch.autograd.grad(out.loss, [mask.scores, module.parametrizations.weight.original], retain_graph=True)
    # dL/dscores = dL/dW' * W (straight through), and dL/dW = dL/dW' * mask
    weight_grad_effective = grad_out[1]  # mask is all ones here
    assert torch.allclose(grad_out[0], weight_grad_effective * module.parametrizations.weight.original.detach(), atol=1e-8)


def test_gradual_movement_pruning_reaches_its_target_during_fine_tuning():
    graph = traced()
    teacher = graph.copy()
    schedule = graphprune.GradualPruning("prune_weight", 0.0, 0.6, start_step=2, end_step=8, every=2, config={"method": "movement"})
    graphprune.finetune(graph, sentiment_data(96), tiny_tokenizer(), teacher=teacher, max_steps=10, batch_size=16,
                        learning_rate=1e-2, callbacks=[schedule], progress=False)
    assert [s for s, _ in schedule.applied] == [4, 6, 8]
    for name, module in linears(graph).items():
        mask = mask_of(module)
        assert isinstance(mask, MovementMask)
        assert abs(int((~mask.mask).sum()) - 0.6 * mask.mask.numel()) <= 1
        assert bool(torch.count_nonzero(mask.scores)), name  # the scores were trained
        assert torch.all(module.weight[~mask.mask] == 0)


@pytest.mark.parametrize("method", DATA_METHODS)
def test_data_methods_without_data_raise_a_clear_error(method):
    graph = traced()
    with pytest.raises(ValueError, match=rf"pass 'prune_weight' \(method {method}\) needs calibration data"):
        graphprune.run_pass(graph, "prune_weight", {"method": method})


def test_taylor_refuses_unlabelled_calibration_batches():
    graph = traced()
    batch = padded_inputs(make_model(), 4, 8)
    with pytest.raises(ValueError, match="needs labelled calibration data"):
        graphprune.run_pass(graph, "prune_weight", {"method": "taylor"}, data=[batch])
    graphprune.run_pass(graph, "prune_weight", {"method": "wanda"}, data=[batch])  # ready batches are fine for wanda


def test_entries_select_by_role_type_and_name():
    graph = traced()
    pruned = run(graph, {"method": "l1", "sparsity": 0.5, "ffn_up": {"sparsity": 0.75}, "query": None, "classifier": {"sparsity": 0.25}})
    found = {n.target: common(n)["role"] for n in pruned.nodes if n.op == "call_module" and common(n).get("role")}
    for path, role in found.items():
        module = pruned.module.get_submodule(path)
        if not isinstance(module, nn.Linear):
            continue
        expected = {"ffn_up": 0.75, "query": None, "classifier": 0.25, "pooler": None}.get(role, 0.5 if role in ENCODER else None)
        if expected is None:
            assert mask_of(module) is None, path
        else:
            assert (~mask_of(module).mask).float().mean().item() == pytest.approx(expected, abs=1e-3), path
    by_name = run(graph, {"by": "name", "sparsity": 0.0, r"bert\.encoder\.layer\.1\..*": {"sparsity": 0.5}})
    masked = {n for n, m in linears(by_name).items() if mask_of(m) is not None}
    assert masked == {n for n in linears(by_name) if n.startswith("bert.encoder.layer.1.")}
    by_type = run(graph, {"by": "type", "linear": {"sparsity": 0.5}})
    assert all(mask_of(m) is not None for m in by_type.module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sparsity": 1.0}, r"field 'sparsity' = 1.0 is not allowed"),
        ({"method": "obs"}, r"field 'method' = 'obs' is not allowed"),
        ({"granularity": "4:2"}, r"N:M with 0 < N < M"),
        ({"granularity": "2:4", "sparsity": 0.7}, r"0.5 \(N/M\)"),
        ({"scope": "global", "granularity": "2:4"}, r"local with N:M"),
        ({"method": "sparsegpt", "granularity": "row"}, r"sparsegpt with granularity element or N:M"),
        ({"sparsty": 0.5}, r"field 'sparsty' = 0.5 is not allowed; expected the key to be a config field"),
        ({"ffn_up": {"sparsity": -0.1}}, r"field 'ffn_up.sparsity' = -0.1"),
        ({"by": "name", "[": {}}, r"regular expression"),
        ({"by": "colour"}, r"field 'by' = 'colour'"),
    ],
)
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        graphprune.run_pass(traced(), "prune_weight", config)


def test_mase_spellings_are_accepted():
    graph = traced()
    a = run(graph, {"method": "l1-norm", "granularity": "elementwise", "sparsity": 0.5})
    b = run(graph, {"method": "l1", "granularity": "element", "sparsity": 0.5})
    assert all(torch.equal(mask_of(m).mask, mask_of(linears(b)[k]).mask) for k, m in linears(a).items())


@pytest.mark.parametrize("name", ["RobertaForSequenceClassification", "DistilBertForSequenceClassification", "AlbertForSequenceClassification"])
def test_other_families(name):
    graph = traced(name)
    pruned = run(graph, {"method": "sparsegpt", "sparsity": 0.5}, data=calib())
    masked = [m for m in pruned.module.modules() if isinstance(m, nn.Linear) and mask_of(m) is not None]
    assert masked and all(abs(int((~mask_of(m).mask).sum()) - m.weight.numel() / 2) <= 1 for m in masked)


def test_committing_a_copy_leaves_the_original_masked_graph_working():
    # torch's parametrized modules share their class with their deep copies; the commit must not touch it
    graph = run(traced(), {"method": "l1", "sparsity": 0.5})
    copy_of = graph.copy()
    graphprune.commit_masks(copy_of)
    inputs = padded_inputs(make_model(), 2, 6)
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), copy_of.module(**inputs)) == 0.0
    assert all(mask_of(m) is not None for m in linears(graph).values())
    total, nonzero = graphprune.count_parameters(graph)  # counts on a committed copy, again
    # the original still runs masked: the eager model with torch's own l1 pruning of the same Linears
    reference = make_model()
    for name in linears(graph):
        prune.remove(prune.l1_unstructured(reference.get_submodule(name), "weight", amount=0.5), "weight")
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), reference(**inputs)) <= 1e-5
    params = list(reference.parameters())
    assert (total, nonzero) == (sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params))


@pytest.mark.parametrize("method", ["l1", "wanda", "sparsegpt"])
def test_a_layer_with_every_head_removed_is_pruned_around_its_empty_projection(method):
    """remove_heads with min_heads 0 leaves an output projection with no inputs: nothing to score or mask."""
    graph = traced()
    cut, _ = graphprune.run_pass(graph, "remove_heads", {"heads": {0: list(range(TINY["num_attention_heads"]))}, "min_heads": 0})
    assert cut.module.get_submodule("bert.encoder.layer.0.attention.output.dense").weight.numel() == 0
    pruned, info = graphprune.run_pass(cut, "prune_weight", {"method": method, "sparsity": 0.5, "num_samples": 16}, data=calib())
    assert info["modules"] == 12 - 4  # layer 0's q, k, v are gone and its output projection is empty
    for name, module in linears(pruned).items():
        if module.weight.numel():
            zeros = (module.weight == 0).float().mean().item()  # (the masked weight)
            assert zeros == pytest.approx(0.5, abs=0.02), name
    assert info["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
