from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch.nn.utils import prune

import graphprune
from graphprune.training.schedule import GradualPruning, cubic_sparsity
from graphprune.training.finetune import distillation_loss

from ..models import dropout_free_graph_and_contradicting_teacher, make_model, pure_kd, sentiment_data, tiny_tokenizer, trace_once


@pytest.fixture
def tiny():
    model = make_model()
    return trace_once(model), tiny_tokenizer()


def test_evaluate_matches_a_manual_computation(tiny):
    graph, tokenizer = tiny
    data = sentiment_data(20)
    metrics = graphprune.evaluate(graph, data, tokenizer, batch_size=8, progress=False)
    batch = tokenizer(data.texts, padding="longest", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = graph.module(**batch).logits
    labels = torch.tensor(data.labels)
    assert metrics["examples"] == 20
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert not graph.module.training


def test_finetune_lowers_the_loss_and_learns(tiny):
    graph, tokenizer = tiny
    train, val = sentiment_data(96, seed=0), sentiment_data(32, seed=1)
    before = graphprune.evaluate(graph, val, tokenizer, progress=False)
    result = graphprune.finetune(graph, train, tokenizer, eval_data=val, epochs=15, batch_size=16, learning_rate=3e-3, progress=False)
    assert result.steps == 90 and len(result.evaluations) == 15
    assert sum(result.losses[-6:]) / 6 < sum(result.losses[:6]) / 6 * 0.5
    assert result.evaluations[-1]["loss"] < before["loss"]
    assert result.evaluations[-1]["accuracy"] >= 0.9


def test_finetune_is_seeded(tiny):
    _, tokenizer = tiny
    runs = []
    for _ in range(2):
        graph = trace_once(make_model())
        runs.append(graphprune.finetune(graph, sentiment_data(32), tokenizer, max_steps=4, batch_size=8, progress=False).losses)
    assert runs[0] == runs[1]


def test_subset_and_max_steps(tiny):
    graph, tokenizer = tiny
    result = graphprune.finetune(graph, sentiment_data(64), tokenizer, subset=16, batch_size=8, epochs=1, progress=False)
    assert result.steps == 2
    result = graphprune.finetune(graph, sentiment_data(64), tokenizer, max_steps=3, batch_size=8, progress=False)
    assert result.steps == 3


def test_distillation_loss_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    T, w = 3.0, 0.25
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    ce = F.cross_entropy(s, y)
    expected = (1 - w) * ce + w * T * T * kl
    assert distillation_loss({"logits": s}, {"logits": t}, ce, T, w).item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_over_tokens_skips_padding_and_averages_logits_fields():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    T = 2.0

    def kl_rows(a, b):
        p = torch.softmax(b / T, -1)
        return (p * (torch.log(p) - torch.log_softmax(a / T, -1))).sum(-1)

    expected = T * T * kl_rows(s, t)[mask.bool()].mean()
    assert distillation_loss({"logits": s}, {"logits": t}, torch.tensor(0.0), T, 1.0, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    # question answering: start and end distributions over positions, averaged
    (s1, s2), (t1, t2) = torch.randn(2, 2, 5), torch.randn(2, 2, 5)
    expected = T * T * (kl_rows(s1, t1).mean() + kl_rows(s2, t2).mean()) / 2
    out = distillation_loss({"start_logits": s1, "end_logits": s2}, {"start_logits": t1, "end_logits": t2}, torch.tensor(0.0), T, 1.0, mask)
    assert out.item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_pulls_the_student_to_a_teacher_that_contradicts_the_labels():
    # the teacher reads every snippet as positive: against the labels on the negative half
    graph, teacher = dropout_free_graph_and_contradicting_teacher("BertForSequenceClassification")
    tokenizer = tiny_tokenizer()
    teacher_params = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    data = sentiment_data(32)
    collate = tf.DataCollatorWithPadding(tokenizer)
    examples = [dict(tokenizer(text), labels=label) for text, label in zip(data.texts, data.labels)]
    batch = collate(examples)
    labels, inputs = batch.pop("labels"), batch
    negative = labels == 0

    def logits(g):
        with torch.no_grad():
            return g.module(**inputs).logits

    student_before, teacher_logits = logits(graph), logits(teacher)
    assert (teacher_logits.argmax(-1) == 1).all() and (student_before[negative].argmax(-1) == 0).all()
    loader = torch.utils.data.DataLoader(examples, batch_size=8, collate_fn=collate)  # in order: the first batch is known
    result = graphprune.finetune(graph, loader, teacher=teacher, kd_weight=1.0, max_steps=8, learning_rate=1e-2, warmup_ratio=0.0, progress=False)
    assert result.steps == 8
    # kd_weight 1: the first step's loss is the divergence from the teacher alone (default temperature 2)
    assert result.losses[0] == pytest.approx(pure_kd(student_before[:8], teacher_logits[:8], 2.0).item(), rel=1e-5)
    student_after = logits(graph)
    # toward the teacher (to 0.36 of the divergence; 0.99 trained on the labels alone)
    assert pure_kd(student_after, teacher_logits, 2.0) < 0.5 * pure_kd(student_before, teacher_logits, 2.0)
    # and away from the labels where the teacher contradicts them (+1.35 nats; +0.01 trained on the labels alone)
    assert F.cross_entropy(student_after[negative], labels[negative]) > F.cross_entropy(student_before[negative], labels[negative]) + 0.5
    assert all(torch.equal(v, teacher.module.state_dict()[k]) for k, v in teacher_params.items())


def test_frozen_weight_mask_survives_training(tiny):
    """Masks that passes add live on the graph's modules and keep working in training."""
    graph, tokenizer = tiny
    module = graph.module.get_submodule("bert.encoder.layer.0.intermediate.dense")
    mask = (torch.rand_like(module.weight) > 0.5).float()
    prune.custom_from_mask(module, "weight", mask)
    before = module.weight_orig.detach().clone()
    graphprune.finetune(graph, sentiment_data(32), tokenizer, max_steps=4, batch_size=8, learning_rate=1e-2, progress=False)
    assert torch.all(module.weight[mask == 0] == 0)
    assert not torch.equal(module.weight[mask == 1], before[mask == 1])
    assert graphprune.commit_masks(graph) == ["bert.encoder.layer.0.intermediate.dense"]
    assert torch.all(module.weight[mask == 0] == 0) and not prune.is_pruned(module)


@pytest.mark.parametrize(
    "options, message",
    [({"learning_rate": 0}, "learning_rate = 0"), ({"kd_weight": 2}, "kd_weight = 2"), ({"batch_size": 0}, "batch_size = 0")],
)
def test_bad_finetune_options(tiny, options, message):
    graph, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        graphprune.finetune(graph, sentiment_data(8), tokenizer, progress=False, **options)


def test_cubic_schedule_formula():
    assert cubic_sparsity(0, initial=0.0, final=0.8, start=10, end=110) == 0.0
    assert cubic_sparsity(60, initial=0.0, final=0.8, start=10, end=110) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(500, initial=0.0, final=0.8, start=10, end=110) == 0.8


@dataclass(frozen=True)
class MaskConfig:
    sparsity: float = 0.0


def test_gradual_pruning_calls_a_pass_on_the_cubic_schedule(tiny):
    graph, tokenizer = tiny
    calls = []

    @graphprune.register_pass("test_mask_ffn", config=MaskConfig)
    def mask_ffn(g, config):
        """Mask the smallest weights of layer 0's FFN up-projection to the asked sparsity."""
        module = g.module.get_submodule("bert.encoder.layer.0.intermediate.dense")
        weight = module.weight_orig if prune.is_pruned(module) else module.weight
        k = int(round(config.sparsity * weight.numel()))
        threshold = weight.detach().abs().flatten().kthvalue(k).values if k else -1
        mask = (weight.detach().abs() > threshold).float()
        if prune.is_pruned(module):
            module.weight_mask.copy_(mask)
        else:
            prune.custom_from_mask(module, "weight", mask)
        calls.append(config.sparsity)
        return g, {}

    try:
        schedule = GradualPruning("test_mask_ffn", 0.0, 0.6, start_step=2, end_step=10, every=3)
        graphprune.finetune(graph, sentiment_data(96), tokenizer, max_steps=12, batch_size=8, callbacks=[schedule], progress=False)
        steps = [step for step, _ in schedule.applied]
        assert steps == [5, 8, 10]  # step 2 has sparsity 0: nothing to do
        expected = [0.6 + (0.0 - 0.6) * (1 - (s - 2) / 8) ** 3 for s in steps]
        assert calls == pytest.approx([0.0] + expected)  # the initial sparsity before training, then the schedule
        module = graph.module.get_submodule("bert.encoder.layer.0.intermediate.dense")
        assert float((module.weight == 0).float().mean()) == pytest.approx(0.6, abs=1 / module.weight.numel())
        assert [h["pass"] for h in graph.history].count("test_mask_ffn") == 4
    finally:
        graphprune.unregister_pass("test_mask_ffn")


def test_gradual_pruning_checks_its_arguments():
    with pytest.raises(ValueError, match="initial <= final"):
        GradualPruning("x", 0.5, 0.2, start_step=0, end_step=10)
    with pytest.raises(ValueError, match="start_step < end_step"):
        GradualPruning("x", 0.0, 0.5, start_step=10, end_step=10)
