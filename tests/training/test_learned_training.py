"""Training gates (the Lagrangian controller, through finetune) and layer-wise hidden distillation, against
formulas written here and the eager models' hidden states."""

import copy

import pytest
import torch
import transformers as tf
from torch import nn

import graphprune
from graphprune.ir.gates import GATES, gate_method, gate_modules
from graphprune.training.hidden_distillation import HiddenDistillation, HiddenTap
from graphprune.training.lagrangian import LagrangianController
from tests.models import TINY, make_model, padded_inputs, sentiment_data, tiny_tokenizer, trace_once

SMALL = dict(batch_size=8, max_length=16, progress=False)


def gated(target=0.5, init=3.0, seed=0):
    dense = trace_once(make_model(seed=seed))
    graph, info = graphprune.run_pass(dense, "l0_structured", {"target": target, "init": init})
    return dense, graph, info


def fraction(graph) -> float:
    with torch.no_grad():
        return float(gate_method(graph).expected_fraction(graph))


class OptimizerSpy:
    """Keeps the optimizer finetune builds, its groups as built, and the learning rates after the last step."""

    def on_optimizer(self, optimizer):
        self.optimizer = optimizer
        self.groups = [{"params": list(g["params"]), "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]

    def on_step_end(self, graph, step, total):
        self.last = [(list(g["params"]), g["lr"]) for g in self.optimizer.param_groups]


def taps(graph):
    gm = graph.module
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), HiddenTap)], [
        name for name, m in gm.named_modules() if isinstance(m, HiddenTap)
    ]


# --- gates trained under the Lagrangian -----------------------------------------------------------------------


def test_finetune_drives_the_expected_size_toward_the_target():
    dense, graph, info = gated(target=0.5)
    start = info["expected_fraction"]
    assert start == pytest.approx(fraction(graph)) and start > 0.95
    before = {name: g.log_alpha.detach().clone() for name, g in gate_modules(graph).items()}
    spy = OptimizerSpy()
    steps = 20  # short: quick rates for the gates and the multipliers
    result = graphprune.finetune(
        graph, sentiment_data(64), tiny_tokenizer(), teacher=dense, max_steps=steps, callbacks=[spy],
        gate_learning_rate=0.2, reg_learning_rate=0.1, **{**SMALL, "max_length": 12},
    )
    assert result.steps == steps
    now = fraction(graph)
    assert now < start - 0.3  # the gates closed a lot
    assert abs(now - 0.5) < abs(start - 0.5)  # toward the target
    trained = graph.meta[GATES]["trained"]
    assert trained["steps"] == steps and trained["target"] == pytest.approx(0.5)
    assert trained["expected_fraction"] == pytest.approx(now, abs=1e-6)
    assert trained["lambda_1"] > 0 and trained["lambda_2"] > 0  # the graph was above its target: the multipliers grew
    for name, old in before.items():
        assert (gate_modules(graph)[name].log_alpha.detach() < old).any(), name
    assert not graph.module.training and all(not g.training for g in gate_modules(graph).values())

    # the gates' own optimizer group: every log_alpha, at gate_learning_rate, no decay, kept constant to the end
    alphas = [g.log_alpha for g in gate_modules(graph).values()]
    holding = [g for g in spy.groups if any(p is a for p in g["params"] for a in alphas)]
    assert len(holding) == 1
    (group,) = holding
    assert len(group["params"]) == len(alphas) and all(any(p is a for a in alphas) for p in group["params"])
    assert group["lr"] == 0.2 and group["weight_decay"] == 0.0
    assert all(g["lr"] == 5e-5 for g in spy.groups if g is not group)  # the weights keep learning_rate
    last = {id(params[0]): lr for params, lr in spy.last}
    assert last[id(group["params"][0])] == 0.2
    assert all(lr == 0.0 for key, lr in last.items() if key != id(group["params"][0]))  # the weights' rate decayed to 0

    committed, out = graphprune.run_pass(graph, "commit_gates")  # a trained graph commits, and says how it was trained
    assert out["trained"] == trained and GATES not in committed.meta


@pytest.mark.parametrize("warmup, total", [(0.5, 20), (0.25, 40), (1.0, 7)])
def test_target_warmup_is_linear_from_the_start_fraction_to_the_target(warmup, total):
    _, graph, _ = gated(target=0.7)  # remove 70%: keep 0.3
    controller = LagrangianController(learning_rate=0.02, target_warmup=warmup)
    controller.on_train_begin(graph, total)
    start = fraction(graph)
    assert controller.start == pytest.approx(start) and controller.final == pytest.approx(0.3)
    ramp = round(warmup * total)
    for step in range(total + 3):
        assert controller.target_at(step) == pytest.approx(start + (0.3 - start) * min(1.0, step / ramp), abs=1e-9), step
    assert controller.target_at(ramp) == pytest.approx(0.3)


def test_the_penalty_and_the_multipliers_ascent_are_the_formula():
    _, graph, _ = gated(target=0.5)
    lr = 0.02
    controller = LagrangianController(learning_rate=lr, target_warmup=0.5)
    controller.on_train_begin(graph, 20)
    step = 5
    gap = fraction(graph) - controller.target_at(step)
    assert gap > 0.1
    loss = controller.extra_loss(graph, {}, step, 20)
    assert float(loss) == 0.0  # the multipliers start at 0
    loss.backward()
    assert controller.lambdas.grad.tolist() == pytest.approx([gap, gap**2], rel=1e-4)
    controller.on_step_end(graph, step, 20)
    # one AdamW step, maximising: each multiplier moves by about the learning rate, up
    assert controller.lambdas.detach().tolist() == pytest.approx([lr, lr], rel=1e-3)
    for gate in gate_modules(graph).values():
        gate.log_alpha.grad = None
    loss = controller.extra_loss(graph, {}, step, 20)
    l1, l2 = controller.lambdas.detach().tolist()
    assert float(loss) == pytest.approx(l1 * gap + l2 * gap**2, rel=1e-4)
    loss.backward()
    for name, gate in gate_modules(graph).items():  # descent on the penalty shuts every gate a little
        assert (gate.log_alpha.grad > 0).all(), name
    assert [h["step"] for h in controller.history] == [step, step]
    assert controller.history[-1]["lambda_1"] == pytest.approx(l1) and controller.history[-1]["target"] == pytest.approx(controller.target_at(step))
    controller.on_train_end(graph)
    assert graph.meta[GATES]["trained"]["steps"] == step + 1 and graph.meta[GATES]["trained"]["lambda_1"] == pytest.approx(l1)


def test_the_gates_momentum_is_dropped_once_when_the_size_falls_to_the_target():
    _, graph, _ = gated(target=0.5)
    controller = LagrangianController(learning_rate=0.02, target_warmup=0.5)
    controller.on_train_begin(graph, 20)
    alphas = [g.log_alpha for g in gate_modules(graph).values()]
    weights = [p for name, p in graph.module.named_parameters() if not name.endswith("log_alpha")]
    optimizer = torch.optim.AdamW([{"params": weights}, {"params": alphas}], lr=0.1)
    controller.on_optimizer(optimizer)

    def step(gap: float) -> None:
        for p in alphas + weights:
            p.grad = torch.ones_like(p)
        optimizer.step()
        controller.gap = gap  # what extra_loss measured this step
        controller.on_step_end(graph, 0, 20)

    step(0.2)  # above the target: Adam's moments build up on every parameter
    assert all(p in optimizer.state for p in alphas + weights)
    first = {id(p): optimizer.state[p]["exp_avg"].clone() for p in alphas}
    step(0.1)
    assert all(not torch.equal(optimizer.state[p]["exp_avg"], first[id(p)]) for p in alphas)
    step(-0.05)  # fell to the target: the gates' moments are gone, the weights' stay
    assert not any(p in optimizer.state for p in alphas) and all(p in optimizer.state for p in weights)
    step(-0.02)  # still below: the moments rebuilt since the crossing are kept
    assert all(int(optimizer.state[p]["step"]) == 1 for p in alphas)
    step(0.03)
    step(-0.01)  # a second crossing drops them again
    assert not any(p in optimizer.state for p in alphas)


# --- hidden distillation ---------------------------------------------------------------------------------------


def eager_states(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[1:]  # each layer's output


def masked_mse(a, b, mask):
    return ((a - b)[mask] ** 2).mean()


def run_both(student, teacher, inputs):
    with torch.no_grad():
        student.module(**inputs)
        teacher.module(**inputs)


def test_hidden_distillation_without_a_teacher_is_a_clear_error():
    graph = trace_once(make_model())
    code = graph.module.code
    with pytest.raises(ValueError, match="kd_hidden_weight.*teacher="):
        graphprune.finetune(graph, sentiment_data(16), tiny_tokenizer(), max_steps=1, kd_hidden_weight=1.0, **SMALL)
    assert graph.module.code == code and not taps(graph)[1]


def test_the_loss_with_an_explicit_layer_map_is_the_sum_of_masked_mses():
    student_model, teacher_model = make_model(seed=0), make_model(seed=1)
    student, teacher = trace_once(student_model), trace_once(teacher_model)
    layer_map = [1, 1]
    weight = 0.7
    distil = HiddenDistillation(teacher, weight, layer_map)
    distil.on_train_begin(student, 1)
    assert torch.equal(distil.transform.weight, torch.eye(32)) and torch.equal(distil.transform.bias, torch.zeros(32))
    inputs = padded_inputs(student_model, 3, 11)
    run_both(student, teacher, inputs)
    with torch.no_grad():
        loss = distil.extra_loss(student, inputs, 0, 1)
    s, t = eager_states(student_model, inputs), eager_states(teacher_model, inputs)
    mask = inputs["attention_mask"].bool()
    expected = weight * sum(masked_mse(s[i], t[j], mask) for i, j in enumerate(layer_map))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    unmasked = weight * sum(((s[i] - t[j]) ** 2).mean() for i, j in enumerate(layer_map))
    assert abs(float(unmasked) - float(expected)) > 1e-4  # the padding is really left out
    assert distil.matches == [[0, 1]]
    distil.on_train_end(student)
    assert not taps(student)[0] and not taps(teacher)[0]


def four_layers(seed=0):
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(tf.BertConfig(**{**TINY, "num_hidden_layers": 4})).eval()


def our_matching(student_states, teacher_states, mask):
    """CoFi's matching as the docstring states it: teacher layers in order, each to the closest student layer
    at or after the previous match."""
    first, matches = 0, []
    for t in teacher_states:
        errors = [float(masked_mse(s, t, mask)) for s in student_states[first:]]
        first += min(range(len(errors)), key=errors.__getitem__)
        matches.append(first)
    return matches


def test_dynamic_matching_of_a_student_equal_to_the_teacher_is_the_identity():
    model = four_layers()
    teacher = graphprune.trace(copy.deepcopy(model))
    student = teacher.copy()
    distil = HiddenDistillation(teacher, 1.0)
    distil.on_train_begin(student, 1)
    inputs = padded_inputs(model, 3, 11)
    run_both(student, teacher, inputs)
    with torch.no_grad():
        loss = distil.extra_loss(student, inputs, 0, 1)
    assert distil.matches == [[0, 1, 2, 3]] and float(loss) == 0.0
    distil.on_train_end(student)


def test_dynamic_matching_of_a_shallower_student_is_the_greedy_closest_match():
    model = four_layers()
    teacher = graphprune.trace(copy.deepcopy(model))
    student, _ = graphprune.run_pass(teacher, "remove_layers", {"layers": [1]})
    eager = copy.deepcopy(model)
    eager.bert.encoder.layer = nn.ModuleList([eager.bert.encoder.layer[i] for i in (0, 2, 3)])
    inputs = padded_inputs(model, 3, 11)
    mask = inputs["attention_mask"].bool()
    s, t = eager_states(eager, inputs), eager_states(model, inputs)
    expected = our_matching(s, t, mask)
    assert expected[0] == 0 and expected[-1] == 2 and len(set(expected)) == 3  # a real matching, not all one layer
    distil = HiddenDistillation(teacher, 2.0)
    distil.on_train_begin(student, 1)
    run_both(student, teacher, inputs)
    with torch.no_grad():
        loss = distil.extra_loss(student, inputs, 0, 1)
    assert distil.matches == [expected]
    assert float(loss) == pytest.approx(2.0 * float(sum(masked_mse(s[m], t[i], mask) for i, m in enumerate(expected))), rel=1e-5)
    distil.on_train_end(student)


def test_finetune_with_hidden_distillation_leaves_both_graphs_as_they_were():
    dense, graph, _ = gated(target=0.5)
    teacher = dense.copy()
    codes = graph.module.code, teacher.module.code
    modules = {n for n, _ in graph.module.named_modules()}, {n for n, _ in teacher.module.named_modules()}
    spy = OptimizerSpy()
    result = graphprune.finetune(graph, sentiment_data(32), tiny_tokenizer(), teacher=teacher, max_steps=3, callbacks=[spy],
                                 kd_hidden_weight=1.0, **SMALL)
    assert result.steps == 3
    for g in (graph, teacher):
        assert taps(g) == ([], [])
        assert not any(getattr(n.target, "startswith", lambda _: False)("hidden_tap") for n in g.module.graph.nodes)
    assert (graph.module.code, teacher.module.code) == codes
    assert ({n for n, _ in graph.module.named_modules()}, {n for n, _ in teacher.module.named_modules()}) == modules
    transform = [params for params, _ in spy.last if [tuple(p.shape) for p in params] == [(32, 32), (32,)]]
    assert len(transform) == 1  # the layer transformation trained with the graph
    assert not torch.equal(transform[0][0].detach(), torch.eye(32))


def test_hidden_distillation_after_remove_hidden_is_a_clear_error():
    teacher = trace_once(make_model())
    student, _ = graphprune.run_pass(teacher, "remove_hidden", {"fraction": 0.25})
    code = student.module.code
    with pytest.raises(ValueError, match=r"hidden size \(24\) to equal the teacher's \(32\).*kd_hidden_weight = 0"):
        graphprune.finetune(student, sentiment_data(16), tiny_tokenizer(), teacher=teacher, max_steps=1, kd_hidden_weight=1.0, **SMALL)
    assert student.module.code == code and taps(student) == ([], []) and taps(teacher) == ([], [])


@pytest.mark.parametrize("layer_map", [[0, 2], [0], [0, 1, 1]])
def test_a_bad_layer_map_is_a_clear_error_that_leaves_both_graphs_untouched(layer_map):
    student, teacher = trace_once(make_model(seed=0)), trace_once(make_model(seed=1))
    codes = student.module.code, teacher.module.code
    with pytest.raises(ValueError, match=r"kd_layer_map = \[.*\] is not allowed; expected 2 teacher layer indices"):
        graphprune.finetune(student, sentiment_data(16), tiny_tokenizer(), teacher=teacher, max_steps=1, kd_hidden_weight=1.0,
                            kd_layer_map=layer_map, **SMALL)
    assert (student.module.code, teacher.module.code) == codes
    assert taps(student) == ([], []) and taps(teacher) == ([], [])


@pytest.mark.parametrize("option, value", [("kd_layer_map", [-1, 0]), ("kd_layer_map", [0.5, 1]), ("kd_hidden_weight", -1.0)])
def test_bad_distillation_options_name_the_field(option, value):
    student, teacher = trace_once(make_model(seed=0)), trace_once(make_model(seed=1))
    with pytest.raises(ValueError, match=f"finetune: {option} = "):
        graphprune.finetune(student, sentiment_data(16), tiny_tokenizer(), teacher=teacher, max_steps=1,
                            **{"kd_hidden_weight": 1.0, option: value}, **SMALL)
