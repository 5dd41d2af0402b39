"""Pipelines, and a user's own pass written outside the package (MASE tutorial 1's dropout removal)."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir.metadata import common

from ..models import make_model, max_diff, padded_inputs, trace_once


@dataclass(frozen=True)
class RemoveDropoutConfig:
    keep_classifier_dropout: bool = False


@pytest.fixture(scope="module")
def user_passes():
    @graphprune.register_pass("test_remove_dropout", config=RemoveDropoutConfig)
    def remove_dropout(graph, config):
        """Remove Dropout nodes (they are identities at inference)."""
        gm = graph.module
        removed = []
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Dropout):
                if config.keep_classifier_dropout and node.target == "dropout":
                    continue
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed.append(node.target)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return graph, {"removed": len(removed)}

    @graphprune.register_pass("test_break_halfway")
    def break_halfway(graph, config):
        """Scribble on weights and metadata, then fail."""
        for p in graph.module.parameters():
            p.data.zero_()
        for node in graph.nodes:
            node.meta.setdefault("graphprune.common", {})["role"] = "broken"
        graph.meta["common"] = "broken"
        raise RuntimeError("boom")

    yield
    graphprune.unregister_pass("test_remove_dropout")
    graphprune.unregister_pass("test_break_halfway")


def _snapshot(graph):
    return (
        {k: v.clone() for k, v in graph.module.state_dict().items()},
        {n.name: dict(common(n)) for n in graph.nodes},
        repr(graph.meta),
        list(graph.history),
        graph.module.code,
    )


def _same(a, b):
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


def test_user_pass_runs_in_a_pipeline(user_passes):
    model = make_model()
    graph = trace_once(model)
    n_dropout = sum(isinstance(graph.module.get_submodule(n.target), nn.Dropout) for n in graph.nodes if n.op == "call_module")
    assert n_dropout > 0
    out, infos = graphprune.run_pipeline(graph, [("test_remove_dropout", {}), ("add_common_metadata", {"seq_len": 8})])
    assert infos[0] == {"removed": n_dropout}
    assert not any(isinstance(m, nn.Dropout) for m in out.module.modules())
    assert "dropout" not in {common(n)["role"] for n in out.nodes}
    inputs = padded_inputs(model, 3, 7)
    with torch.no_grad():
        assert max_diff(out.module(**inputs), model(**inputs)) <= 1e-6
    assert [h["pass"] for h in out.history] == ["test_remove_dropout", "add_common_metadata"]
    assert out.history[0]["config"] == {"keep_classifier_dropout": False}
    # the caller's graph still has its dropout
    assert sum(isinstance(m, nn.Dropout) for m in graph.module.modules()) == n_dropout


def test_pipeline_from_toml(tmp_path, user_passes):
    toml = tmp_path / "pipeline.toml"
    toml.write_text(
        '[[passes]]\nname = "test_remove_dropout"\nkeep_classifier_dropout = true\n\n'
        '[[passes]]\nname = "add_common_metadata"\nseq_len = 32\n'
    )
    graph = trace_once(make_model())
    out, infos = graphprune.run_pipeline(graph, toml)
    assert infos[0]["removed"] > 0 and out.meta["common"]["seq_len"] == 32
    assert isinstance(out.module.get_submodule("dropout"), nn.Dropout)


def test_failing_step_names_it_and_the_steps_before_and_leaves_graph_unchanged(user_passes):
    graph = trace_once(make_model())
    graph, _ = graphprune.run_pass(graph, "add_common_metadata")
    before = _snapshot(graph)
    with pytest.raises(graphprune.PipelineError) as error:
        graphprune.run_pipeline(graph, [("init_metadata", {}), ("test_remove_dropout", {}), ("test_break_halfway", {})])
    assert error.value.step == 3 and error.value.name == "test_break_halfway"
    assert error.value.previous == ["init_metadata", "test_remove_dropout"]
    assert "step 3 ('test_break_halfway')" in str(error.value) and "boom" in str(error.value)
    assert "init_metadata" in str(error.value) and "test_remove_dropout" in str(error.value)
    assert _same(before, _snapshot(graph))


def test_run_pass_failure_is_a_pass_error_and_graph_is_unchanged(tiny_graph, user_passes):
    before = _snapshot(tiny_graph)
    with pytest.raises(graphprune.PassError, match="test_break_halfway.*RuntimeError: boom"):
        graphprune.run_pass(tiny_graph, "test_break_halfway")
    assert _same(before, _snapshot(tiny_graph))


def test_bad_step_configs_are_rejected_before_anything_runs(user_passes, tmp_path):
    graph = trace_once(make_model())
    with pytest.raises(ValueError, match=r"pipeline step 2: pass 'add_common_metadata': field 'seq_len' = 0"):
        graphprune.run_pipeline(graph, [("init_metadata", {}), ("add_common_metadata", {"seq_len": 0})])
    with pytest.raises(ValueError, match="pipeline step 1: unknown pass"):
        graphprune.run_pipeline(graph, [("nope", {})])
    bad = tmp_path / "bad.toml"
    bad.write_text("[[passes]\nname = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        graphprune.run_pipeline(graph, bad)
    empty = tmp_path / "empty.toml"
    empty.write_text("title = 'x'\n")
    with pytest.raises(ValueError, match=r"\[\[passes\]\]"):
        graphprune.run_pipeline(graph, empty)
    with pytest.raises(ValueError, match="does not exist"):
        graphprune.run_pipeline(graph, tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="pass name must be a string"):
        graphprune.run_pipeline(graph, [(3, {})])


def test_a_pass_that_returns_the_wrong_thing_is_reported(tiny_graph):
    @graphprune.register_pass("test_returns_none")
    def returns_none(graph, config):
        """Forgets to return."""

    try:
        with pytest.raises(graphprune.PassError, match="must return"):
            graphprune.run_pass(tiny_graph, "test_returns_none")
    finally:
        graphprune.unregister_pass("test_returns_none")


def test_analysis_pass_copies_share_tensors_transform_copies_do_not(tiny_graph):
    shared = tiny_graph.copy(share_tensors=True)
    full = tiny_graph.copy()
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert shared.module.get_parameter(w) is tiny_graph.module.get_parameter(w)
    assert full.module.get_parameter(w) is not tiny_graph.module.get_parameter(w)
    node = shared.node("bert_encoder_layer_0_attention_self_query")
    node.meta["graphprune.common"]["role"] = "changed"
    assert common(tiny_graph.node("bert_encoder_layer_0_attention_self_query"))["role"] == "query"
