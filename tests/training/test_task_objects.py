"""Each task's tokenisation, decoding and metrics against oracles: the eager model, seqeval, brute force."""

import math

import pytest
import torch
import transformers as tf
from seqeval.metrics import f1_score, precision_score, recall_score

import graphprune
from graphprune.training import metrics
from graphprune.training.task_data import EmbeddingDataset
from graphprune.training.tasks import get_task, task_for

from ..models import FILLER, NER_TAGS, NEGATIVE, POSITIVE, TINY, ner_data, qa_data, tiny_tokenizer, trace_once


def split_tokenizer():
    """The tiny vocabulary plus '##x', so that 'goodx' is two sub-tokens: good ##x."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER + ["##x"]
    return tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def token_graph(seed=0):
    torch.manual_seed(seed)
    return trace_once(tf.BertForTokenClassification(tf.BertConfig(**TINY, num_labels=len(NER_TAGS))).eval())


def test_token_tags_sit_on_each_words_first_sub_token():
    tokenizer = split_tokenizer()
    task = get_task("token-classification")
    batch = task.collate([{"words": ["goodx", "w1", "badx"], "tags": [1, 0, 3]}, {"words": ["w2"], "tags": [0]}], tokenizer, 16)
    ids = tokenizer.convert_tokens_to_ids
    assert batch["input_ids"][0].tolist() == [ids("[CLS]"), ids("good"), ids("##x"), ids("w1"), ids("bad"), ids("##x"), ids("[SEP]")]
    assert batch["labels"][0].tolist() == [-100, 1, -100, 0, 3, -100, -100]
    assert batch["labels"][1].tolist() == [-100, 0, -100, -100, -100, -100, -100]


def word_predictions_by_hand(module, tokenizer, sentences, max_length):
    """Each word's tag from its first sub-token, one sentence at a time; cut-off words are O."""
    out = []
    for words in sentences:
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            logits = module(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits[0]
        tags, seen = ["O"] * len(words), set()
        for position, word in enumerate(encoded.word_ids(0)):
            if word is not None and word not in seen:
                seen.add(word)
                tags[word] = NER_TAGS[int(logits[position].argmax())]
        out.append(tags)
    return out


def test_token_classification_trains_and_scores_entities_as_seqeval():
    graph, tokenizer = token_graph(), tiny_tokenizer()
    train, test = ner_data(128, seed=0), ner_data(32, seed=1)
    graphprune.finetune(graph, train, tokenizer, epochs=30, batch_size=16, learning_rate=5e-3, progress=False)
    for max_length in (64, 9):  # 9 tokens cut most sentences: the words past it count as predicted O
        result = graphprune.evaluate(graph, test, tokenizer, batch_size=5, max_length=max_length, progress=False)
        true = [[NER_TAGS[t] for t in tags] for tags in test.tags]
        predicted = word_predictions_by_hand(graph.module, tokenizer, test.words, max_length)
        assert result["f1"] == pytest.approx(f1_score(true, predicted))
        assert result["precision"] == pytest.approx(precision_score(true, predicted))
        assert result["recall"] == pytest.approx(recall_score(true, predicted))
    full = graphprune.evaluate(graph, test, tokenizer, max_length=64, progress=False)
    assert full["f1"] > 0.5 and result["recall"] < full["recall"]  # it learned; cut words lose recall


def test_qa_windows_label_the_answer_tokens_and_cls_elsewhere():
    tokenizer, task = tiny_tokenizer(), get_task("question-answering")
    data = qa_data(12, seed=3, context_words=30)
    rows = [data[i] for i in range(len(data))]
    batch, meta = task.eval_features(rows, tokenizer, 16)
    assert len(batch["input_ids"]) > len(rows)  # long contexts became several windows
    holding = set()
    for i, owner in enumerate(meta["owners"]):
        s, e = int(batch["start_positions"][i]), int(batch["end_positions"][i])
        answer = rows[owner]["answers"]
        if s == 0:
            assert e == 0
            continue
        text = rows[owner]["contexts"][int(meta["offsets"][i, s, 0]) : int(meta["offsets"][i, e, 1])]
        assert text == answer["text"][0] and meta["context"][i, s] and meta["context"][i, e]
        holding.add(owner)
    assert holding == set(range(len(rows)))  # every answer lies whole in some window (stride = max_length // 4)


def test_qa_evaluate_equals_brute_force_over_every_window_and_span():
    torch.manual_seed(0)
    graph = trace_once(tf.BertForQuestionAnswering(tf.BertConfig(**TINY)).eval())
    tokenizer, data = tiny_tokenizer(), qa_data(10, seed=4, context_words=24)
    result = graphprune.evaluate(graph, data, tokenizer, batch_size=4, max_length=20, progress=False)
    answers = []
    for question, context in zip(data.questions, data.contexts):
        encoded = tokenizer(question, context, truncation="only_second", max_length=20, stride=5, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        best = (-math.inf, "")
        for w in range(len(encoded["input_ids"])):
            with torch.no_grad():
                out = graph.module(input_ids=torch.tensor([encoded["input_ids"][w]]), attention_mask=torch.tensor([encoded["attention_mask"][w]]),
                                   token_type_ids=torch.tensor([encoded["token_type_ids"][w]]))
            context_tokens = [p for p, s in enumerate(encoded.sequence_ids(w)) if s == 1]
            for s in context_tokens:
                for e in context_tokens:
                    if s <= e < s + 30:
                        score = float(out.start_logits[0, s] + out.end_logits[0, e])
                        if score > best[0]:
                            offsets = encoded["offset_mapping"][w]
                            best = (score, context[offsets[s][0] : offsets[e][1]])
        answers.append(best[1])
    expected = metrics.squad_metrics(answers, [a["text"] for a in data.answers])
    assert result["exact_match"] == pytest.approx(expected["exact_match"])
    assert result["f1"] == pytest.approx(expected["f1"])
    assert "loss" in result


def embedder_and_data():
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(**TINY)).eval()
    texts = [" ".join(FILLER[i : i + 4]) for i in range(0, 40, 3)]
    data = EmbeddingDataset(texts, queries=[t.split()[0] + " " + t.split()[1] for t in texts], documents=texts, name="pairs")
    return model, data


def test_feature_extraction_scores_retrieval_against_the_eager_models_mean_pooling():
    model, data = embedder_and_data()
    graph, tokenizer = trace_once(model), tiny_tokenizer()
    result = graphprune.evaluate(graph, data, tokenizer, batch_size=4, progress=False, reference=graph.copy())
    assert result["mean_cosine"] == pytest.approx(1.0, abs=1e-6)

    def embed(texts):  # the oracle: the eager model, mean over real tokens
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"][..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)

    q, d = torch.nn.functional.normalize(embed(data.queries), dim=-1), torch.nn.functional.normalize(embed(data.documents), dim=-1)
    scores = q.double() @ d.double().T
    ranks = [1 + int((scores[i] > scores[i, i]).sum()) for i in range(len(q))]
    assert result["recall@1"] == pytest.approx(sum(r == 1 for r in ranks) / len(ranks))
    assert result["mrr@10"] == pytest.approx(sum(1 / r if r <= 10 else 0 for r in ranks) / len(ranks), abs=1e-6)


def test_feature_extraction_needs_a_teacher_to_finetune_and_then_follows_it():
    model, data = embedder_and_data()
    teacher, tokenizer = trace_once(model), tiny_tokenizer()
    student = teacher.copy()
    with torch.no_grad():
        for p in student.module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with pytest.raises(ValueError, match="feature-extraction .* teacher="):
        graphprune.finetune(student, data, tokenizer, max_steps=1, progress=False)
    before = graphprune.evaluate(student, data, tokenizer, progress=False, reference=teacher)["mean_cosine"]
    graphprune.finetune(student, data, tokenizer, teacher=teacher, epochs=20, batch_size=8, learning_rate=1e-3, progress=False)
    after = graphprune.evaluate(student, data, tokenizer, progress=False, reference=teacher)["mean_cosine"]
    assert before < 0.999 and after > before + (1 - before) / 2


def exact_token_fisher(graph, batch, blocks):
    """sum over tokens and classes of p * (d log p / d head mask)^2, one backward pass per (token, class)."""
    from graphprune.passes.structured.importance import mask_gradients

    task = task_for(graph)
    with torch.no_grad():
        p = task.teacher_probabilities(graph.module(**batch), batch)[0]
    valid = batch["labels"] != -100
    total = 0
    for x, t in valid.nonzero().tolist():
        for y in range(p.shape[-1]):
            def term(outputs, b, x=x, t=t, y=y):
                log_q = task.distributions(outputs, b)[0][0]
                return [p[x, t, y].sqrt() * log_q[x, t, y]]
            grads = mask_gradients(graph, blocks, [], [batch], losses=term)[0][0]
            total = total + torch.stack([g.pow(2).sum(0) for g in grads])
    return total


def test_sampled_fisher_of_token_tags_matches_the_exact_sum():
    from graphprune.passes.structured.blocks import attention_blocks
    from graphprune.passes.structured.importance import mask_gradients

    graph, tokenizer = token_graph(seed=1), tiny_tokenizer()
    task = task_for(graph)
    batch = task.collate([ner_data(3, seed=5)[i] for i in range(3)], tokenizer, 16)
    blocks = attention_blocks(graph, "test")
    exact = exact_token_fisher(graph, batch, blocks)
    with torch.no_grad():
        teacher = task.teacher_probabilities(graph.module(**batch), batch)
    generator = torch.Generator().manual_seed(0)
    grads = mask_gradients(graph, blocks, [], [batch], losses=lambda out, b: task.fisher_terms(out, b, teacher, 400, generator))[0]
    sampled = sum(torch.stack([g.pow(2).sum(0) for g in term]) for term in grads)
    assert sampled.shape == exact.shape
    assert torch.allclose(sampled, exact, rtol=0.2)  # 400 draws: a few percent of noise per head
    assert torch.corrcoef(torch.stack([sampled.flatten(), exact.flatten()]))[0, 1] > 0.98


def test_multi_label_and_regression_distil_and_score_their_own_distributions():
    task = get_task("text-classification")
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    batch = {"labels": torch.randint(0, 2, (4, 3)).float()}
    # multi-label: each label's Bernoulli, T^2 * mean over (example, label) of KL(teacher || student), at T = 2
    ps, pt = torch.sigmoid(s / 2), torch.sigmoid(t / 2)
    kl = pt * (pt.log() - ps.log()) + (1 - pt) * ((1 - pt).log() - (1 - ps).log())
    got = task.distillation_loss({"logits": s}, {"logits": t}, batch, 2.0)
    assert got.item() == pytest.approx(4 * kl.mean().item(), rel=1e-5)
    # regression: the squared difference of the values, whatever the temperature
    got = task.distillation_loss({"logits": s[:, :1]}, {"logits": t[:, :1]}, {"labels": torch.randn(4)}, 2.0)
    assert got.item() == pytest.approx(((s[:, 0] - t[:, 0]) ** 2).mean().item(), rel=1e-6)


def test_kprune_on_a_regression_head_scores_by_the_outputs_gradient_and_meets_its_budget():
    from graphprune.training.data import TextDataset

    torch.manual_seed(0)
    graph = trace_once(tf.BertForSequenceClassification(tf.BertConfig(**TINY, num_labels=1)).eval())
    words = " ".join
    data = TextDataset([words(FILLER[i : i + 5]) for i in range(40)], [float(i % 7) / 7 for i in range(40)], (), name="scores")
    pruned, info = graphprune.run_pass(graph, "structured_search", {"method": "kprune", "flops": 0.6, "num_samples": 32, "score_samples": 16,
                                                                   "reconstruct_samples": 16, "seq_len": 16, "progress": False},
                                       data=graphprune.CalibrationData(data, tiny_tokenizer(), max_length=16))
    assert info["flops_ratio"] <= 0.6 + 1e-6 and sum(info["heads_per_layer"]) < 8
    result = graphprune.evaluate(pruned, data, tiny_tokenizer(), max_length=16, progress=False)
    assert set(result) >= {"pearson", "spearman", "loss"}
