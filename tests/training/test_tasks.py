"""evaluate and finetune use the graph's own loss: token classification, question answering, HF Trainer."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from torch.nn.utils import parametrize

import graphprune
from graphprune.training.data import TextDataset

from ..models import NEGATIVE, POSITIVE, dropout_free_graph_and_contradicting_teacher, make_model, pure_kd, sentiment_data, tiny_tokenizer, trace_once, widened_model


def token_examples(n: int, seed: int = 0) -> list[dict]:
    """One example per snippet: label 1 on the sentiment word, 0 on filler, -100 on [CLS]/[SEP]."""
    tokenizer = tiny_tokenizer()
    sentiment = set(tokenizer.convert_tokens_to_ids(POSITIVE + NEGATIVE))
    examples = []
    for text in sentiment_data(n, seed=seed).texts:
        encoded = tokenizer(text)
        ids = encoded["input_ids"]
        labels = [-100 if i in (tokenizer.cls_token_id, tokenizer.sep_token_id) else int(i in sentiment) for i in ids]
        examples.append({**encoded, "labels": labels})
    return examples


def qa_examples(n: int, seed: int = 0) -> list[dict]:
    """The 'answer' is the one sentiment word: its position is both start and end."""
    examples = []
    for example in token_examples(n, seed):
        position = example.pop("labels").index(1)
        examples.append({**example, "start_positions": position, "end_positions": position})
    return examples


def test_token_classification_finetunes_and_evaluates_with_its_own_loss():
    graph = trace_once(make_model("BertForTokenClassification"))
    tokenizer = tiny_tokenizer()
    collate = tf.DataCollatorForTokenClassification(tokenizer)
    train, test = token_examples(96, seed=0), token_examples(24, seed=1)
    before = graphprune.evaluate(graph, test, collate_fn=collate, progress=False)
    result = graphprune.finetune(graph, train, collate_fn=collate, epochs=12, batch_size=16, learning_rate=3e-3, progress=False)
    after = graphprune.evaluate(graph, test, collate_fn=collate, batch_size=7, progress=False)
    assert sum(result.losses[-6:]) < sum(result.losses[:6]) * 0.5
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.95 and after["examples"] == 24

    # oracle: token-level cross-entropy and accuracy over labelled tokens, by hand
    batch = collate(test)
    with torch.no_grad():
        logits = graph.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = batch["labels"] != -100
    assert after["loss"] == pytest.approx(F.cross_entropy(logits[labelled], batch["labels"][labelled]).item(), rel=1e-4)
    assert after["accuracy"] == pytest.approx((logits.argmax(-1) == batch["labels"])[labelled].float().mean().item())


def test_question_answering_finetunes_and_evaluates_with_its_own_loss():
    graph = trace_once(make_model("BertForQuestionAnswering"))
    collate = tf.DataCollatorWithPadding(tiny_tokenizer())
    train, test = qa_examples(96, seed=0), qa_examples(24, seed=1)
    before = graphprune.evaluate(graph, test, collate_fn=collate, progress=False)
    graphprune.finetune(graph, train, collate_fn=collate, epochs=12, batch_size=16, learning_rate=3e-3, progress=False)
    after = graphprune.evaluate(graph, test, collate_fn=collate, progress=False)
    assert after["loss"] < before["loss"] * 0.5 and after["accuracy"] >= 0.9

    batch = collate(test)
    with torch.no_grad():
        out = graph.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    start, end = batch["start_positions"], batch["end_positions"]
    expected_loss = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    exact = ((out.start_logits.argmax(-1) == start) & (out.end_logits.argmax(-1) == end)).float().mean()
    assert after["loss"] == pytest.approx(expected_loss.item(), rel=1e-4)
    assert after["accuracy"] == pytest.approx(exact.item())


def test_distillation_for_token_classification_pulls_every_real_token_to_the_teacher():
    # the teacher tags every token as a sentiment word: against the labels on the filler
    graph, teacher = dropout_free_graph_and_contradicting_teacher("BertForTokenClassification")
    collate = tf.DataCollatorForTokenClassification(tiny_tokenizer())
    # rows of 5 to 8 tokens, so that batches carry padding the divergence must skip
    examples = [{k: v[: 5 + i % 4] for k, v in example.items()} for i, example in enumerate(token_examples(32))]
    batch = collate(examples)
    labels, inputs = batch.pop("labels"), batch
    real, filler = inputs["attention_mask"][:8].bool(), labels == 0

    def logits(g):
        with torch.no_grad():
            return g.module(**inputs).logits

    student_before, teacher_logits = logits(graph), logits(teacher)
    assert not real.all() and (teacher_logits.argmax(-1) == 1).all()
    loader = torch.utils.data.DataLoader(examples, batch_size=8, collate_fn=collate)  # in order: the first batch is known
    result = graphprune.finetune(graph, loader, teacher=teacher, kd_weight=1.0, max_steps=8, learning_rate=1e-2, warmup_ratio=0.0, progress=False)
    assert result.steps == 8
    # kd_weight 1: the first step's loss is the divergence alone, over real tokens ([CLS] and [SEP] too), temperature 2
    assert result.losses[0] == pytest.approx(pure_kd(student_before[:8], teacher_logits[:8], 2.0, real).item(), rel=1e-5)
    student_after = logits(graph)
    # toward the teacher on the filler, where it contradicts the labels (trained on the labels alone: 2.1x and -0.63 nats)
    assert pure_kd(student_after, teacher_logits, 2.0, filler) < 0.5 * pure_kd(student_before, teacher_logits, 2.0, filler)
    assert F.cross_entropy(student_after[filler], labels[filler]) > F.cross_entropy(student_before[filler], labels[filler]) + 0.5


def test_hf_trainer_trains_graph_module_exactly_like_the_model(tmp_path):
    tokenizer = tiny_tokenizer()
    data = sentiment_data(64)
    examples = [dict(tokenizer(t, truncation=True, max_length=16), labels=label) for t, label in zip(data.texts, data.labels)]
    model = make_model()
    graph = trace_once(copy.deepcopy(model))
    histories = []
    for module in (graph.module, model):
        args = tf.TrainingArguments(
            output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[],
            save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
        )
        trainer = tf.Trainer(model=module, args=args, train_dataset=examples, data_collator=tf.DataCollatorWithPadding(tokenizer))
        trainer.train()
        histories.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    graph_losses, model_losses = histories
    assert len(graph_losses) == len(model_losses) == 60  # logging_steps=1: one loss per optimizer step
    # same dropout draws, same updates: every step's loss and every final weight (1.5e-8 apart here)
    assert max(abs(a - b) for a, b in zip(graph_losses, model_losses)) <= 1e-6
    weights, reference = graph.module.state_dict(), model.state_dict()
    assert weights.keys() == reference.keys()
    # but the attention key biases: softmax over keys cancels them, so their exact gradient is 0, and
    # AdamW, dividing by the gradient's own size, turns the rounding each run sees into real steps
    trained = [k for k in reference if not k.endswith("attention.self.key.bias")]
    assert len(trained) == len(reference) - 2
    assert max((weights[k] - reference[k]).abs().max().item() for k in trained) <= 1e-6
    assert sum(graph_losses[-10:]) < sum(graph_losses[:10]) * 0.5


class SnapToGrid(nn.Module):
    """A fake-quantizer as a parametrization: weights on a 1/16 grid, straight-through gradients."""

    def forward(self, weight):
        return weight + (torch.round(weight * 16) / 16 - weight).detach()


def test_finetune_and_evaluate_keep_working_with_masks_and_fake_quantizers():
    graph = trace_once(widened_model(seed=3))  # wide weights: what the mask and the grid remove changes the outputs
    tokenizer = tiny_tokenizer()
    up = graph.module.get_submodule("bert.encoder.layer.0.intermediate.dense")
    down = graph.module.get_submodule("bert.encoder.layer.0.output.dense")
    mask = (torch.rand_like(up.weight) > 0.5).float()
    torch.nn.utils.prune.custom_from_mask(up, "weight", mask)
    parametrize.register_parametrization(down, "weight", SnapToGrid())
    before = down.parametrizations.weight.original.detach().clone()
    result = graphprune.finetune(graph, sentiment_data(64), tokenizer, max_steps=6, batch_size=16, learning_rate=1e-2, progress=False)
    assert result.steps == 6
    assert torch.all(up.weight[mask == 0] == 0)
    assert not torch.equal(down.parametrizations.weight.original, before)  # gradients reached the latent weights
    assert torch.equal(down.weight, torch.round(down.weight * 16) / 16)  # the forward sees grid values
    every = sentiment_data(24)
    # 12 negative, 4 positive: a graph answering one class throughout (as this barely trained one does) scores 0.75 or 0.25
    keep = [i for i, label in enumerate(every.labels) if label == 0 or i % 6 == 1]
    data = TextDataset([every.texts[i] for i in keep], [every.labels[i] for i in keep], every.label_names, name="unbalanced")
    metrics = graphprune.evaluate(graph, data, tokenizer, progress=False)

    # oracle: the eager model carrying the weights the graph's forward sees (masked, on the grid), scored by hand
    def eager_logits(weight_of):
        model = make_model()
        model.load_state_dict({name: weight_of(name) for name in model.state_dict()})
        with torch.no_grad():
            return model(**tokenizer(data.texts, padding=True, return_tensors="pt")).logits

    def effective(name):
        path, attr = name.rsplit(".", 1)
        return getattr(graph.module.get_submodule(path), attr).detach()

    logits, labels = eager_logits(effective), torch.tensor(data.labels)
    assert metrics["examples"] == 16
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    # the same eager model with the latent weights (unmasked, off the grid) scores 2e-4 apart: the loss tells them apart
    latent = {
        "bert.encoder.layer.0.intermediate.dense.weight": up.weight_orig,
        "bert.encoder.layer.0.output.dense.weight": down.parametrizations.weight.original,
    }
    unmasked = eager_logits(lambda name: latent[name].detach() if name in latent else effective(name))
    assert abs(F.cross_entropy(unmasked, labels).item() - metrics["loss"]) > 5e-5


def test_graphs_without_a_task_loss_are_refused_clearly():
    graph = trace_once(make_model("BertModel"))  # an embedder: it has no labels, only a teacher to follow
    with pytest.raises(ValueError, match="toy holds text-classification data but the graph is a feature-extraction model"):
        graphprune.evaluate(graph, sentiment_data(8), tiny_tokenizer(), progress=False)
    with pytest.raises(ValueError, match="finetune: a feature-extraction model .* has no labels to train on; pass teacher="):
        graphprune.finetune(graph, sentiment_data(8), tiny_tokenizer(), progress=False)
    masked = trace_once(make_model("BertForMaskedLM"))  # a masked LM has a loss but no task metrics for texts
    with pytest.raises(ValueError, match="evaluate: BertForMaskedLM has no task graphprune can score"):
        graphprune.evaluate(masked, sentiment_data(8), tiny_tokenizer(), progress=False)


def test_examples_without_targets_are_refused_clearly():
    graph = trace_once(make_model())
    examples = [{"input_ids": [2, 8, 9, 3]} for _ in range(4)]
    with pytest.raises(ValueError, match="carry no labels"):
        graphprune.evaluate(graph, examples, tiny_tokenizer(), progress=False)
    with pytest.raises(ValueError, match="must be dicts of model inputs"):
        graphprune.evaluate(graph, [(1, 2)], progress=False)
