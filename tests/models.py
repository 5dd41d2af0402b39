"""Tiny models built in code, and helpers: every test runs offline in seconds."""

from __future__ import annotations

import copy
import hashlib

import torch
import transformers as tf

import graphprune

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def _bert(cls):
    return lambda: cls(tf.BertConfig(**TINY))


MODEL_FACTORIES = {
    "BertModel": _bert(tf.BertModel),
    "BertForSequenceClassification": _bert(tf.BertForSequenceClassification),
    "BertForMaskedLM": _bert(tf.BertForMaskedLM),
    "BertForTokenClassification": _bert(tf.BertForTokenClassification),
    "BertForQuestionAnswering": _bert(tf.BertForQuestionAnswering),
    "RobertaForSequenceClassification": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**TINY)),
    "XLMRobertaForSequenceClassification": lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**TINY)),
    "CamembertForSequenceClassification": lambda: tf.CamembertForSequenceClassification(tf.CamembertConfig(**TINY)),
    "RobertaForQuestionAnswering": lambda: tf.RobertaForQuestionAnswering(tf.RobertaConfig(**TINY)),
    "DistilBertForSequenceClassification": lambda: tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    ),
    "DistilBertForTokenClassification": lambda: tf.DistilBertForTokenClassification(
        tf.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    ),
    "ElectraForMaskedLM": lambda: tf.ElectraForMaskedLM(tf.ElectraConfig(embedding_size=16, **TINY)),
    "AlbertForSequenceClassification": lambda: tf.AlbertForSequenceClassification(
        tf.AlbertConfig(embedding_size=16, **{**TINY, "num_hidden_layers": 3})
    ),
    "ElectraForSequenceClassification": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, **TINY)),
    "DebertaV2ForSequenceClassification": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**TINY)),
}


def make_model(name: str = "BertForSequenceClassification", seed: int = 0):
    torch.manual_seed(seed)
    return MODEL_FACTORIES[name]().eval()


_TRACES: dict[str, graphprune.Graph] = {}


def trace_once(model, example_inputs=None, **options) -> graphprune.Graph:
    """``graphprune.trace`` of ``model``, exported once per session for each distinct model.

    Exporting costs seconds even for a tiny model and most tests trace the same few,
    so the trace is cached by the model's class, config, mode and weights, and each call
    gets a copy with its own parameters (equal to ``model``'s), as
    ``graphprune.trace(copy.deepcopy(model))`` would give. Tests of tracing itself, and
    calls with example inputs or options, use ``graphprune.trace``.
    """
    if example_inputs is not None or options:
        return graphprune.trace(model, example_inputs, **options)
    key = _fingerprint(model)
    if key not in _TRACES:
        _TRACES[key] = graphprune.trace(copy.deepcopy(model))
    return _TRACES[key].copy()


def _fingerprint(model) -> str:
    digest = hashlib.sha1(f"{type(model).__qualname__}|{model.training}".encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string().encode())
    for name, tensor in model.state_dict(keep_vars=False).items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def widened_model(seed: int, layer_norms: bool = False):
    """The tiny BERT with Linear weights times 5 and random biases (and LayerNorm affines near 1 with
    ``layer_norms``): ranges wide enough for quantization widths to matter. ``seed`` draws the new values."""
    model = make_model()
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5.0)
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
            elif layer_norms and isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
    return model


def padded_inputs(model, batch_size: int, seq_len: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs of a size other than the traced one, with padding in the mask."""
    torch.manual_seed(seed)
    inputs = graphprune.dummy_inputs(model, batch_size=batch_size, seq_len=seq_len)
    inputs["input_ids"] = torch.randint(5, model.config.vocab_size, (batch_size, seq_len))
    inputs["attention_mask"] = torch.ones(batch_size, seq_len, dtype=torch.long)
    inputs["attention_mask"][0, seq_len // 2 :] = 0
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        inputs["input_ids"][0, seq_len // 2 :] = pad  # as a tokenizer pads (RoBERTa numbers positions around it)
    return inputs


def max_diff(out, ref) -> float:
    keys = list(ref.keys())
    assert list(out.keys()) == keys
    return max((out[k] - ref[k]).abs().max().item() for k in keys)


def minilm_path():
    """The shipped MiniLM folder, or None when its package is absent (tests then skip)."""
    from graphprune.training.models import minilm_path as shipped

    try:
        path = shipped()
    except FileNotFoundError:
        return None
    return path if (path / "model.safetensors").is_file() else None


POSITIVE = ["good", "great", "fun", "moving", "superb"]
NEGATIVE = ["bad", "dull", "boring", "awful", "weak"]
FILLER = [f"w{i}" for i in range(60)]


def tiny_tokenizer():
    """A WordPiece tokenizer over a small vocabulary, built in code (vocab fits TINY's 120)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def sentiment_data(n: int = 64, seed: int = 0, name: str = "toy"):
    """Synthetic two-class snippets: one sentiment word among filler words."""
    import random

    from graphprune.training.data import TextDataset

    rng = random.Random(seed)
    texts, labels, groups = [], [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
        groups.append(f"movie{i % 7}")
    return TextDataset(texts, labels, ("neg", "pos"), groups, name)


def make_biased(name="BertForSequenceClassification"):
    """``make_model`` with random Linear biases and LayerNorm affines: HF initialises them to 0 and 1, which would
    hide a bias left unfolded or unsliced."""
    from torch import nn

    model = make_model(name)
    torch.manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
    return model


def dropout_free_graph_and_contradicting_teacher(cls: str):
    """A tiny ``cls`` graph without dropout (so a step's loss can be computed by hand) and a copy of it as
    teacher whose classifier bias (-3, +3) predicts class 1 everywhere: against labels of class 0."""
    torch.manual_seed(0)
    model = getattr(tf, cls)(tf.BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    graph = trace_once(model.eval())
    teacher = graph.copy()
    with torch.no_grad():
        teacher.module.get_submodule("classifier").bias.copy_(torch.tensor([-3.0, 3.0]))
    return graph, teacher


def pure_kd(student_logits, teacher_logits, temperature, rows=None):
    """T^2 * KL(teacher_T || student_T) averaged over ``rows`` (all rows by default), written out."""
    p = torch.softmax(teacher_logits / temperature, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(student_logits / temperature, -1))).sum(-1)
    return temperature**2 * (kl if rows is None else kl[rows]).mean()


NER_TAGS = ("O", "B-POS", "I-POS", "B-NEG", "I-NEG")


def ner_data(n: int = 64, seed: int = 0, name: str = "ner"):
    """Generated NER sentences: runs of one or two sentiment words are POS or NEG entities among filler (IOB2)."""
    import random

    from graphprune.training.task_data import TokenDataset

    rng = random.Random(seed)
    words, tags = [], []
    for _ in range(n):
        sentence, labels = [], []
        for _ in range(rng.randint(2, 4)):
            sentence += rng.sample(FILLER, rng.randint(1, 3))
            labels += [0] * (len(sentence) - len(labels))
            kind = rng.choice(["POS", "NEG"])
            pool = POSITIVE if kind == "POS" else NEGATIVE
            run = rng.sample(pool, rng.randint(1, 2))
            sentence += run
            labels += [NER_TAGS.index(f"B-{kind}")] + [NER_TAGS.index(f"I-{kind}")] * (len(run) - 1)
        words.append(sentence)
        tags.append(labels)
    return TokenDataset(words, tags, NER_TAGS, [f"doc{i % 5}" for i in range(n)], name)


def qa_data(n: int = 32, seed: int = 0, context_words: int = 12, name: str = "qa"):
    """Generated extractive QA: the question names a sentiment ('pos' asks for the one positive word of the context)."""
    import random

    from graphprune.training.task_data import QADataset

    rng = random.Random(seed)
    questions, contexts, answers = [], [], []
    for _ in range(n):
        words = rng.sample(FILLER, context_words)
        positive, negative = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        words.insert(rng.randrange(len(words) + 1), positive)
        words.insert(rng.randrange(len(words) + 1), negative)
        answer = positive if rng.random() < 0.5 else negative
        context = " ".join(words)
        questions.append(("good" if answer == positive else "bad") + " " + rng.choice(FILLER))
        contexts.append(context)
        start = (" " + context + " ").index(" " + answer + " ")
        answers.append({"text": [answer], "answer_start": [start]})
    return QADataset(questions, contexts, answers, [], name)
