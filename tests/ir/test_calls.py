"""The traced graph is called like its model: the call-form table against eager, losses, errors."""

import inspect
import itertools

import pytest
import torch
import transformers as tf

import graphprune
from graphprune.ir.calls import model_call_of

from ..models import MODEL_FACTORIES, TINY, make_model, padded_inputs, trace_once

OPTIONAL = ("attention_mask", "token_type_ids", "position_ids")
BATCH, SEQ = 3, 9


def model_inputs(model) -> dict[str, torch.Tensor]:
    """input_ids plus every optional input the model takes, each different from its default."""
    inputs = padded_inputs(model, BATCH, SEQ)
    params = inspect.signature(model.forward).parameters
    out = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if "token_type_ids" in params:
        types = torch.zeros(BATCH, SEQ, dtype=torch.long)
        if getattr(model.config, "type_vocab_size", 0) >= 2:
            types[:, SEQ // 2 :] = 1
        out["token_type_ids"] = types
    if "position_ids" in params:
        out["position_ids"] = (torch.arange(SEQ) + 3).expand(BATCH, SEQ).clone()
    return out


def targets_for(model, inputs) -> dict[str, torch.Tensor]:
    name = type(model).__name__
    generator = torch.Generator().manual_seed(5)
    ids = inputs["input_ids"]
    if name.endswith("ForSequenceClassification"):
        return {"labels": torch.randint(0, model.config.num_labels, (BATCH,), generator=generator)}
    if name.endswith("ForTokenClassification"):
        labels = torch.randint(0, model.config.num_labels, ids.shape, generator=generator)
        labels[inputs["attention_mask"] == 0] = -100
        return {"labels": labels}
    if name.endswith("ForMaskedLM"):
        labels = torch.full_like(ids, -100)
        labels[:, 1:4] = ids[:, 1:4]
        return {"labels": labels}
    if name.endswith("ForQuestionAnswering"):
        # one answer beyond the input: HF clamps it to an ignored index
        return {"start_positions": torch.tensor([1, 2, SEQ + 4]), "end_positions": torch.tensor([3, 2, SEQ + 6])}
    return {}


def assert_same(out, ref, where: str):
    assert type(out) is type(ref), where
    if isinstance(ref, tuple):
        assert len(out) == len(ref), where
        pairs = list(zip(out, ref))
    else:
        assert list(out.keys()) == list(ref.keys()), where
        pairs = [(out[k], ref[k]) for k in ref.keys()]
    for a, b in pairs:
        assert a.shape == b.shape, where
        assert (a - b).abs().max().item() <= 1e-5, where


def call_forms(model):
    """Every call form: optional inputs present or absent, keyword or positional, labels or not, return_dict."""
    params = [p for p in inspect.signature(model.forward).parameters if p != "kwargs"]
    optional = [n for n in OPTIONAL if n in params]
    full = model_inputs(model)
    targets = targets_for(model, full)
    for present in itertools.chain.from_iterable(itertools.combinations(optional, k) for k in range(len(optional) + 1)):
        for with_targets in (False, True) if targets else (False,):
            values = {"input_ids": full["input_ids"], **{n: full[n] for n in present}}
            if with_targets:
                values.update(targets)
            for positional in (False, True):
                for return_dict in (None, True, False):
                    extra = {} if return_dict is None else {"return_dict": return_dict}
                    if positional:
                        last = max(params.index(n) for n in values)
                        args = [values.get(p) for p in params[: last + 1]]
                        yield f"{sorted(values)} positional {extra}", args, extra
                    else:
                        yield f"{sorted(values)} keyword {extra}", [], {**values, **extra}


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_call_forms_match_eager(name):
    model = make_model(name)
    graph = trace_once(model)
    forms = 0
    for where, args, kwargs in call_forms(model):
        with torch.no_grad():
            out, ref = graph.module(*args, **kwargs), model(*args, **kwargs)
        assert_same(out, ref, f"{name}: {where}")
        forms += 1
    assert forms >= 12


@pytest.mark.parametrize(
    "num_labels, problem_type, labels",
    [
        (1, None, torch.tensor([0.5, -1.0, 2.0])),
        (3, None, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),
        (3, None, torch.tensor([2, 0, 1])),
        (3, "regression", torch.randn(3, 3)),
        (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])),
        (2, "single_label_classification", torch.tensor([1, 0, 1])),
    ],
)
@pytest.mark.parametrize("family", ["bert", "deberta-v2", "distilbert"])
def test_every_problem_type_gives_the_models_loss(family, num_labels, problem_type, labels):
    torch.manual_seed(0)
    if family == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**TINY, num_labels=num_labels, problem_type=problem_type))
    elif family == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
            num_labels=num_labels, problem_type=problem_type,
        )
        model = tf.DistilBertForSequenceClassification(config)
    else:
        model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**TINY, num_labels=num_labels, problem_type=problem_type))
    model.eval()
    graph = trace_once(model)
    inputs = padded_inputs(model, BATCH, 7)
    with torch.no_grad():
        out, ref = graph.module(**inputs, labels=labels), model(**inputs, labels=labels)
    assert out.loss is not None
    assert_same(out, ref, f"{family} {problem_type} {labels.dtype}")


def test_deberta_ignores_negative_labels_like_the_model():
    model = make_model("DebertaV2ForSequenceClassification")
    graph = trace_once(model)
    inputs = padded_inputs(model, BATCH, 7)
    for labels in (torch.tensor([1, -1, 0]), torch.tensor([-1, -1, -1])):
        with torch.no_grad():
            assert_same(graph.module(**inputs, labels=labels), model(**inputs, labels=labels), str(labels))


def test_problem_type_is_recorded_on_first_call_as_the_model_does():
    model = make_model()
    graph = trace_once(model)
    inputs = padded_inputs(model, BATCH, 7)
    multi = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        assert_same(graph.module(**inputs, labels=multi), model(**inputs, labels=multi), "first call")
    assert model.config.problem_type == "multi_label_classification"
    assert model_call_of(graph.module).problem_type == "multi_label_classification"
    # class indices no longer fit the recorded problem: both refuse them alike
    for module in (graph.module, model):
        with pytest.raises(ValueError, match="must be the same as input size"):
            module(**inputs, labels=torch.tensor([0, 1, 1]))


def test_loss_backpropagates_like_the_model():
    model = make_model("BertForTokenClassification")
    graph = trace_once(model).copy()  # own parameters, same values
    inputs = model_inputs(model)
    labels = targets_for(model, inputs)["labels"]
    graph.module(**inputs, labels=labels).loss.backward()
    model(**inputs, labels=labels).loss.backward()
    own = dict(graph.module.named_parameters())
    for path, param in model.named_parameters():
        if path in own and param.grad is not None:
            assert torch.allclose(own[path].grad, param.grad, atol=1e-6), path


def test_inputs_the_graph_cannot_honour_raise_clear_errors():
    model = make_model()
    graph = trace_once(model)
    ids = padded_inputs(model, 2, 6)["input_ids"]
    cases = [
        ({"output_attentions": True}, r"cannot honour output_attentions=True.*supported inputs: input_ids, attention_mask"),
        ({"output_hidden_states": True}, r"cannot honour output_hidden_states=True"),
        ({"inputs_embeds": torch.zeros(2, 6, 32)}, r"cannot honour inputs_embeds=a float32 tensor of shape \(2, 6, 32\)"),
        ({"lables": torch.tensor([0, 1])}, r"unexpected input 'lables'.*labels"),
        ({"attention_mask": torch.ones(2, 5)}, r"attention_mask must have the shape of input_ids \(2, 6\), got \(2, 5\)"),
        ({"position_ids": torch.ones(2, 4, dtype=torch.long)}, r"position_ids must have the shape"),
    ]
    for extra, message in cases:
        with pytest.raises(graphprune.InputError, match=message):
            graph.module(input_ids=ids, **extra)
    with pytest.raises(graphprune.InputError, match="needs input_ids, an integer tensor of shape"):
        graph.module(attention_mask=torch.ones(2, 6))
    with pytest.raises(TypeError):  # InputError is a TypeError, as Python's own call errors are
        graph.module(input_ids=ids, output_attentions=True)
    # off switches are fine
    with torch.no_grad():
        graph.module(input_ids=ids, output_attentions=False, output_hidden_states=None, num_items_in_batch=torch.tensor(4))


def test_heads_without_a_known_loss_refuse_labels_clearly():
    torch.manual_seed(0)
    model = tf.BertForNextSentencePrediction(tf.BertConfig(**TINY)).eval()
    graph = trace_once(model)
    inputs = padded_inputs(model, 2, 6)
    with torch.no_grad():
        assert_same(graph.module(**inputs), model(**inputs), "no labels")
    with pytest.raises(graphprune.InputError, match="cannot compute its loss.*SequenceClassification"):
        graph.module(**inputs, labels=torch.tensor([0, 1]))


def test_positional_order_is_the_models_own():
    model = make_model("DistilBertForSequenceClassification")  # input_ids, attention_mask, inputs_embeds, labels, position_ids
    graph = trace_once(model)
    inputs = padded_inputs(model, 2, 6)
    labels = torch.tensor([1, 0])
    positions = (torch.arange(6) + 1).expand(2, 6)
    with torch.no_grad():
        out = graph.module(inputs["input_ids"], inputs["attention_mask"], None, labels, positions)
        ref = model(inputs["input_ids"], inputs["attention_mask"], None, labels, positions)
    assert_same(out, ref, "positional")
    assert list(inspect.signature(graph.module.forward).parameters)[:5] == [
        "input_ids", "attention_mask", "inputs_embeds", "labels", "position_ids"
    ]


def test_broadcast_positions_and_the_tokenizer_output_of_another_family():
    model = make_model("DistilBertForSequenceClassification")
    graph = trace_once(model)
    inputs = padded_inputs(model, 2, 6)
    with torch.no_grad():
        out = graph.module(**inputs, position_ids=torch.arange(6)[None], token_type_ids=torch.zeros(2, 6, dtype=torch.long))
        ref = model(**inputs, position_ids=torch.arange(6)[None], token_type_ids=torch.zeros(2, 6, dtype=torch.long))
    assert_same(out, ref, "broadcast positions, ignored token types")


def test_graph_call_and_code_show_the_signature():
    model = make_model()
    graph = trace_once(model)
    code = graph.module.code
    assert "def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None" in code
    assert "labels=None, **kwargs)" in code
    ids = padded_inputs(model, 2, 6)["input_ids"]
    with torch.no_grad():
        assert torch.equal(graph(ids).logits, graph.module(input_ids=ids).logits)


def test_example_inputs_need_only_input_ids_and_may_carry_labels():
    model = make_model()
    inputs = padded_inputs(model, 2, 6)
    graph = trace_once(model, {"input_ids": inputs["input_ids"], "labels": torch.tensor([0, 1])})
    with torch.no_grad():
        assert_same(graph.module(**inputs), model(**inputs), "traced from input_ids only")
    with pytest.raises(graphprune.TraceError, match="example input 'inputs_embeds' cannot be traced"):
        trace_once(model, {"input_ids": inputs["input_ids"], "inputs_embeds": torch.zeros(2, 6, 32)})


def test_a_model_configured_for_tuples_still_returns_tuples():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**TINY, return_dict=False)).eval()
    graph = trace_once(model)
    assert model.config.return_dict is False  # restored after tracing
    inputs = padded_inputs(model, 2, 6)
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        assert_same(graph.module(**inputs, labels=labels), model(**inputs, labels=labels), "tuple config")
        assert_same(graph.module(**inputs, return_dict=True), model(**inputs, return_dict=True), "dict asked")
