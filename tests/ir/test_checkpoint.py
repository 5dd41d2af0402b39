import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import graphprune
from graphprune.ir import checkpoint, serialize
from graphprune.ir.metadata import common

from ..models import make_model, max_diff, padded_inputs, trace_once


@pytest.fixture
def saved(tmp_path, tiny_graph):
    path = tmp_path / "ckpt"
    tiny_graph.save(path)
    return path


def test_round_trip_keeps_outputs_metadata_and_history(saved, tiny_graph):
    loaded = graphprune.load(saved)
    model = make_model()
    inputs = padded_inputs(model, 3, 11)
    with torch.no_grad():
        assert max_diff(loaded.module(**inputs), tiny_graph.module(**inputs)) == 0.0
    assert loaded.history == tiny_graph.history == [{"pass": "add_common_metadata", "config": {"seq_len": 16, "batch_size": 1}}]
    assert loaded.meta == tiny_graph.meta
    assert loaded.source["model_class"].endswith("BertForSequenceClassification")
    assert loaded.source["config"]["hidden_size"] == 32
    for a, b in zip(loaded.nodes, tiny_graph.nodes):
        assert a.name == b.name and common(a) == common(b)
        stack_a, stack_b = a.meta.get("nn_module_stack") or {}, b.meta.get("nn_module_stack") or {}
        assert [(k, path) for k, (path, _) in stack_a.items()] == [(k, path) for k, (path, _) in stack_b.items()]
    # shapes are re-derived on load, so analysis passes work on loaded graphs
    again, _ = graphprune.run_pass(loaded, "add_common_metadata", {"seq_len": 16})
    assert again.meta["common"] == tiny_graph.meta["common"]


def test_manifest_records_versions_source_passes_and_checksums(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format"] == "graphprune-checkpoint" and manifest["format_version"] == checkpoint.FORMAT_VERSION
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert manifest["versions"]["transformers"] and manifest["versions"]["graphprune"]
    assert [h["pass"] for h in manifest["history"]] == ["add_common_metadata"]
    assert set(manifest["files"]) == {"graph.json", "model.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert sorted(p.name for p in saved.iterdir()) == ["graph.json", "manifest.json", "model.safetensors"]


def test_fresh_process_gives_bit_identical_outputs(saved, tiny_graph, tmp_path):
    model = make_model()
    inputs = padded_inputs(model, 2, 9)
    labels = torch.tensor([1, 0])
    torch.save({"inputs": inputs, "labels": labels}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = [
            tiny_graph.module(**inputs).logits,
            tiny_graph.module(inputs["input_ids"], inputs["attention_mask"], labels=labels, return_dict=False),
        ]
    script = textwrap.dedent(
        f"""
        import torch, graphprune
        graph = graphprune.load({str(saved)!r})
        data = torch.load({str(tmp_path / 'inputs.pt')!r})
        inputs, labels = data["inputs"], data["labels"]
        with torch.no_grad():
            out = [
                graph.module(**inputs).logits,
                graph.module(inputs["input_ids"], inputs["attention_mask"], labels=labels, return_dict=False),
            ]
        torch.save(out, {str(tmp_path / 'out.pt')!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    logits, (loss, tuple_logits) = torch.load(tmp_path / "out.pt")
    assert torch.equal(logits, expected[0])
    assert torch.equal(loss, expected[1][0]) and torch.equal(tuple_logits, expected[1][1])


def test_call_signature_survives_save_and_load(tmp_path):
    model = make_model("BertForQuestionAnswering")
    graph = trace_once(model)
    graph.save(tmp_path / "qa")
    again = graphprune.load(tmp_path / "qa")
    assert again.module.code == graph.module.code
    inputs = padded_inputs(model, 2, 7)
    positions = {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 5])}
    with torch.no_grad():
        out, ref = again.module(input_ids=inputs["input_ids"], **positions), model(input_ids=inputs["input_ids"], **positions)
    assert type(out) is type(ref) and torch.equal(out.loss, ref.loss) and torch.equal(out.end_logits, ref.end_logits)


def test_format_1_checkpoints_load_with_their_models_call(tmp_path):
    # A graph as graphprune 0.1 saved it: export's own signature (every traced input
    # required, no labels) and format_version 1 in the manifest.
    from graphprune.ir.graph import Graph, source_info
    from graphprune.ir.lifting import lift_leaf_modules
    from graphprune.ir.tracing import _dynamic_shapes

    model = make_model("RobertaForSequenceClassification")
    inputs = padded_inputs(model, 2, 8)
    traced = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    exported = torch.export.export(model, (), traced, dynamic_shapes=_dynamic_shapes(traced), strict=False)
    old = Graph(lift_leaf_modules(exported.module(), model), source=source_info(model)).eval()
    old.save(tmp_path / "v1")
    assert json.loads((tmp_path / "v1" / "graph.json").read_text())["call"] is None
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    manifest["format_version"] = 1
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TypeError):
        old.module(input_ids=inputs["input_ids"])  # what 0.1 users had
    graph = graphprune.load(tmp_path / "v1")
    labels = torch.tensor([0, 1])
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = graph.module(input_ids=ids, labels=labels)
        # what the model does when the mask and token types are left out, done by hand on the old graph
        ref = old.module(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, torch.nn.functional.cross_entropy(ref.logits, labels))
    with pytest.raises(graphprune.InputError, match="traced without it"):
        graph.module(**inputs, position_ids=torch.arange(8)[None])


def test_tied_weights_stay_tied(tmp_path):
    model = make_model("BertForMaskedLM")
    graph = trace_once(model)
    graph.save(tmp_path / "mlm")
    loaded = graphprune.load(tmp_path / "mlm")
    decoder = loaded.module.get_submodule("cls.predictions.decoder").weight
    assert decoder is loaded.module.get_submodule("bert.embeddings.word_embeddings").weight
    inputs = padded_inputs(model, 2, 7)
    with torch.no_grad():
        assert max_diff(loaded.module(**inputs), model(**inputs)) <= 1e-6


@pytest.mark.parametrize("name", ["AlbertForSequenceClassification", "DebertaV2ForSequenceClassification", "DistilBertForSequenceClassification"])
def test_other_families_round_trip(tmp_path, name):
    model = make_model(name)
    trace_once(model).save(tmp_path / "ck")
    loaded = graphprune.load(tmp_path / "ck")
    inputs = padded_inputs(model, 3, 10)
    with torch.no_grad():
        assert max_diff(loaded.module(**inputs), model(**inputs)) <= 1e-6


def test_graph_with_changed_shapes_round_trips(tmp_path):
    """A narrower FFN (as structured pruning will make) is described by the checkpoint itself."""
    model = make_model()
    graph = trace_once(model).copy()
    keep = torch.arange(0, 64, 2)  # keep every other FFN neuron of layer 0
    up = graph.module.get_submodule("bert.encoder.layer.0.intermediate.dense")
    down = graph.module.get_submodule("bert.encoder.layer.0.output.dense")
    new_up, new_down = nn.Linear(32, len(keep)), nn.Linear(len(keep), 32)
    with torch.no_grad():
        new_up.weight.copy_(up.weight[keep]), new_up.bias.copy_(up.bias[keep])
        new_down.weight.copy_(down.weight[:, keep]), new_down.bias.copy_(down.bias)
    inner = graph.module.get_submodule("bert.encoder.layer.0")
    inner.intermediate.dense, inner.output.dense = new_up, new_down
    graph.module.recompile()
    graph.record_edit({"op": "prune_ffn", "layer": 0, "kept": keep.tolist()})
    inputs = padded_inputs(model, 2, 8)
    with torch.no_grad():
        expected = graph.module(**inputs).logits
    graph.save(tmp_path / "narrow")
    loaded = graphprune.load(tmp_path / "narrow")
    assert loaded.edits == [{"op": "prune_ffn", "layer": 0, "kept": keep.tolist()}]
    with torch.no_grad():
        assert torch.equal(loaded.module(**inputs).logits, expected)
    analysed, _ = graphprune.run_pass(loaded, "add_common_metadata")
    assert [layer["ffn_width"] for layer in analysed.meta["common"]["layers"]] == [32, 64]


def test_truncated_tensor_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(graphprune.CheckpointError, match="model.safetensors.*truncated"):
        graphprune.load(saved)


def test_tampered_graph_file(saved):
    text = (saved / "graph.json").read_text().replace("aten.gelu.default", "aten.relu.default")
    (saved / "graph.json").write_text(text)
    with pytest.raises(graphprune.CheckpointError, match="graph.json does not match its checksum"):
        graphprune.load(saved)


def test_truncated_manifest(saved):
    text = (saved / "manifest.json").read_text()
    (saved / "manifest.json").write_text(text[:100])
    with pytest.raises(graphprune.CheckpointError, match="manifest.json is corrupted"):
        graphprune.load(saved)


@pytest.mark.parametrize("name", ["manifest.json", "graph.json", "model.safetensors"])
def test_missing_files(saved, name):
    (saved / name).unlink()
    with pytest.raises(graphprune.CheckpointError, match=f"{name}.*missing|missing.*{name}|{name} is missing"):
        graphprune.load(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(graphprune.CheckpointError, match="not a directory"):
        graphprune.load(tmp_path / "nothing")


def test_future_format_version(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["format_version"] = checkpoint.FORMAT_VERSION + 1
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(graphprune.CheckpointError, match=f"format {checkpoint.FORMAT_VERSION + 1}.*upgrade graphprune"):
        graphprune.load(saved)


def test_unknown_call_target_is_refused(tmp_path, tiny_graph):
    body, tensors = serialize.graph_to_json(tiny_graph.module)
    entry = next(n for n in body["nodes"] if n["op"] == "call_function")
    entry["target"] = "os.system"
    with pytest.raises(graphprune.CheckpointError, match="unknown call target 'os.system'"):
        serialize.graph_from_json(body, tensors)


def test_crash_mid_save_leaves_no_checkpoint(tmp_path, tiny_graph, monkeypatch):
    path = tmp_path / "ckpt"
    calls = []
    real_write = checkpoint._write

    def failing_write(file, data):
        calls.append(file.name)
        if file.name == "graph.json":
            raise KeyboardInterrupt  # the process is interrupted halfway through
        real_write(file, data)

    monkeypatch.setattr(checkpoint, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        tiny_graph.save(path)
    assert calls == ["model.safetensors", "graph.json"]
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_crash_while_overwriting_keeps_the_old_checkpoint(saved, tiny_graph, monkeypatch):
    before = (saved / "manifest.json").read_text()

    def failing_write(file, data):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write", failing_write)
    with pytest.raises(graphprune.CheckpointError, match="disk full"):
        tiny_graph.save(saved)
    assert (saved / "manifest.json").read_text() == before
    graphprune.load(saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_overwrite_replaces_an_earlier_checkpoint(saved, tiny_graph):
    graph, _ = graphprune.run_pass(tiny_graph, "init_metadata")
    graph.save(saved)
    assert [h["pass"] for h in graphprune.load(saved).history] == ["add_common_metadata", "init_metadata"]
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_refuses_to_overwrite_something_else(tmp_path, tiny_graph):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(graphprune.CheckpointError, match="not a graphprune checkpoint"):
        tiny_graph.save(target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_unsaveable_module_is_reported_before_writing(tmp_path):
    graph = trace_once(make_model()).copy()

    class Custom(nn.Linear):
        pass

    graph.module.get_submodule("bert.encoder.layer.0").intermediate.dense = Custom(32, 64)
    with pytest.raises(graphprune.CheckpointError, match="Custom.*register_module_type"):
        graph.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_pass_on_a_masked_graph_leaves_it_runnable_and_unchanged():
    """parametrize shares a module's class between deep copies: quantize's bias parametrization on the copy
    must not reach the masked original (it did, as a KeyError 'bias' on the original's next call)."""
    graph, _ = graphprune.run_pass(trace_once(make_model()), "prune_weight", {"method": "l1", "sparsity": 0.5})
    inputs = padded_inputs(make_model(), 2, 8)
    with torch.no_grad():
        before = graph.module.eval()(**inputs)["logits"]
    entry = {"config": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4, "weight_width": 4, "weight_frac_width": 4,
                        "bias_width": 8, "bias_frac_width": 4}}
    quantized, _ = graphprune.run_pass(graph, "quantize", {"linear": entry})
    with torch.no_grad():
        assert torch.equal(graph.module(**inputs)["logits"], before)
        assert not torch.equal(quantized.module.eval()(**inputs)["logits"], before)
