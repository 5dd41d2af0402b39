import networkx as nx
import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir.metadata import common

from ..models import make_model, trace_once

ROLE_NAMES = {
    "BertForSequenceClassification": {
        "query": "bert.encoder.layer.{i}.attention.self.query",
        "key": "bert.encoder.layer.{i}.attention.self.key",
        "value": "bert.encoder.layer.{i}.attention.self.value",
        "attention_output": "bert.encoder.layer.{i}.attention.output.dense",
        "ffn_up": "bert.encoder.layer.{i}.intermediate.dense",
        "ffn_down": "bert.encoder.layer.{i}.output.dense",
    },
    "DistilBertForSequenceClassification": {
        "query": "distilbert.transformer.layer.{i}.attention.q_lin",
        "key": "distilbert.transformer.layer.{i}.attention.k_lin",
        "value": "distilbert.transformer.layer.{i}.attention.v_lin",
        "attention_output": "distilbert.transformer.layer.{i}.attention.out_lin",
        "ffn_up": "distilbert.transformer.layer.{i}.ffn.lin1",
        "ffn_down": "distilbert.transformer.layer.{i}.ffn.lin2",
    },
    "DebertaV2ForSequenceClassification": {
        "query": "deberta.encoder.layer.{i}.attention.self.query_proj",
        "key": "deberta.encoder.layer.{i}.attention.self.key_proj",
        "value": "deberta.encoder.layer.{i}.attention.self.value_proj",
        "attention_output": "deberta.encoder.layer.{i}.attention.output.dense",
        "ffn_up": "deberta.encoder.layer.{i}.intermediate.dense",
        "ffn_down": "deberta.encoder.layer.{i}.output.dense",
    },
}


def analysed(name, seq_len=16):
    model = make_model(name)
    graph, _ = graphprune.run_pipeline(trace_once(model), [("init_metadata", {}), ("add_common_metadata", {"seq_len": seq_len})])
    return model, graph


@pytest.mark.parametrize("name", sorted(ROLE_NAMES))
def test_roles_and_layers_of_linear_nodes(name):
    model, graph = analysed(name)
    found = {(common(n)["role"], common(n)["layer"]): n.target for n in graph.nodes if n.op == "call_module" and isinstance(graph.module.get_submodule(n.target), nn.Linear)}
    for i in range(model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layers):
        for role, pattern in ROLE_NAMES[name].items():
            assert found[(role, i)] == pattern.format(i=i)
    assert "classifier" in {role for role, layer in found if layer is None}


def test_albert_shared_layer_is_numbered_by_call():
    model, graph = analysed("AlbertForSequenceClassification")
    queries = [n for n in graph.nodes if common(n).get("role") == "query"]
    assert len({n.target for n in queries}) == 1  # one shared module ...
    assert [common(n)["layer"] for n in queries] == [0, 1, 2]  # ... called three times
    assert graph.meta["common"]["num_layers"] == 3


def test_shapes_dtypes_and_heads():
    model, graph = analysed("BertForSequenceClassification")
    cfg = model.config
    head_size = cfg.hidden_size // cfg.num_attention_heads
    query = graph.node("bert_encoder_layer_0_attention_self_query")
    meta = common(query)
    assert meta["in_shapes"] == [["batch", "seq", cfg.hidden_size]]
    assert meta["out_shape"] == ["batch", "seq", cfg.hidden_size] and meta["out_dtype"] == "float32"
    assert (meta["heads"], meta["head_size"]) == (cfg.num_attention_heads, head_size)
    core = graph.node("bert_encoder_layer_0_attention_self_attention_core")
    assert common(core)["kind"] == "attention" and common(core)["role"] == "attention"
    assert common(core)["out_shape"] == ["batch", cfg.num_attention_heads, "seq", head_size]
    ids = graph.node("input_ids")
    assert common(ids)["out_shape"] == ["batch", "seq"] and common(ids)["out_dtype"] == "int64"


@pytest.mark.parametrize("seq_len", [16, 128])
def test_flops_match_the_textbook_formula(seq_len):
    model, graph = analysed("BertForSequenceClassification", seq_len=seq_len)
    h, f, s = model.config.hidden_size, model.config.intermediate_size, seq_len
    per_layer = 2 * s * (4 * h * h + 2 * h * f) + 2 * 2 * s * s * h  # projections + QK^T and AV
    meta = graph.meta["common"]
    assert [layer["flops"] for layer in meta["layers"]] == [per_layer] * 2
    head = 2 * h * h + 2 * h * model.config.num_labels  # pooler and classifier on the CLS token
    assert meta["head"]["flops"] == head
    assert meta["totals"]["flops"] == 2 * per_layer + head
    assert graph.summary(seq_len=2 * s).totals["flops"] == 2 * (2 * (2 * s) * (4 * h * h + 2 * h * f) + 4 * (2 * s) ** 2 * h) + head


def test_parameter_counts_match_the_model():
    model, graph = analysed("BertForSequenceClassification")
    meta = graph.meta["common"]
    assert meta["totals"]["params"] == sum(p.numel() for p in model.parameters())
    layer0 = model.bert.encoder.layer[0]
    assert meta["layers"][0]["params"] == sum(p.numel() for p in layer0.parameters())
    assert meta["embeddings"]["params"] == sum(p.numel() for p in model.bert.embeddings.parameters())
    parts = meta["embeddings"]["params"] + sum(l["params"] for l in meta["layers"]) + meta["head"]["params"]
    assert parts == meta["totals"]["params"]
    node = graph.node("bert_encoder_layer_0_intermediate_dense")
    assert common(node)["params"] == layer0.intermediate.dense.weight.numel() + layer0.intermediate.dense.bias.numel()


def test_graph_level_metadata():
    model, graph = analysed("BertForSequenceClassification")
    meta = graph.meta["common"]
    assert meta["family"] == "bert" and meta["num_layers"] == 2 and meta["hidden_size"] == 32
    assert [(l["heads"], l["head_size"], l["ffn_width"]) for l in meta["layers"]] == [(4, 8, 64)] * 2


def test_summary_is_a_table_and_does_not_change_the_graph():
    model = make_model()
    graph = trace_once(model)
    before = {n.name: dict(n.meta) for n in graph.nodes}
    table = graph.summary(seq_len=32)
    text = str(table)
    lines = text.splitlines()
    assert "layer" in lines[1] and "heads" in lines[1] and "flops" in lines[1]
    assert [line.split()[0] for line in lines[3:]][:4] == ["embeddings", "0", "1", "head"]
    assert lines[-1].split()[0] == "total"
    assert table.totals["params"] == sum(p.numel() for p in model.parameters())
    assert {n.name: dict(n.meta) for n in graph.nodes}.keys() == before.keys()
    assert all("graphprune.common" not in n.meta for n in graph.nodes)


def test_to_networkx_exposes_nodes_metadata_and_coupling(tiny_graph):
    dg = tiny_graph.to_networkx()
    assert isinstance(dg, nx.DiGraph) and nx.is_directed_acyclic_graph(dg)
    assert dg.number_of_nodes() == len(tiny_graph.nodes)
    q = "bert_encoder_layer_0_attention_self_query"
    assert dg.nodes[q]["common"]["role"] == "query" and dg.nodes[q]["op"] == "call_module"
    # q/k/v of layer 0 all feed its attention core, which feeds the output projection:
    # the coupling later head-pruning passes rely on.
    core = "bert_encoder_layer_0_attention_self_attention_core"
    for name in ("query", "key", "value"):
        assert nx.has_path(dg, f"bert_encoder_layer_0_attention_self_{name}", core)
    assert nx.has_path(dg, core, "bert_encoder_layer_0_attention_output_dense")
    assert not nx.has_path(dg, "bert_encoder_layer_1_attention_self_query", core)


def test_init_metadata_keeps_other_concerns(tiny_graph):
    graph = tiny_graph.copy()
    node = graph.node("bert_encoder_layer_0_intermediate_dense")
    node.meta["graphprune.sparsity"] = {"weight": 0.5}
    graph, _ = graphprune.run_pass(graph, "init_metadata")
    node = graph.node("bert_encoder_layer_0_intermediate_dense")
    assert node.meta["graphprune.sparsity"] == {"weight": 0.5}
    assert "flops" not in common(node) and common(node)["role"] == "ffn_up"
