"""The demo's workflow on a tiny model and synthetic data (the real run is `make demo`)."""

import json

import pytest

import graphprune
from graphprune.app.demo import check_stages, run_demo
from graphprune.ir.runtime import cxx_compiler

from ..models import make_model, sentiment_data, tiny_tokenizer, trace_once


@pytest.mark.skipif(cxx_compiler() is None, reason="the deploy stage compiles C++ (lower, AOTInductor)")
def test_demo_workflow_produces_the_table_and_the_artefacts(tmp_path):
    tokenizer = tiny_tokenizer()
    graph = trace_once(make_model())
    splits = {"train": sentiment_data(64, seed=0), "validation": sentiment_data(16, seed=1), "test": sentiment_data(40, seed=2)}
    graphprune.finetune(graph, splits["train"], tokenizer, epochs=8, batch_size=16, learning_rate=3e-3, progress=False)
    lines = []
    table = run_demo(baseline=graph, tokenizer=tokenizer, splits=splits, recovery_steps=3, progress=False, log=lines.append,
                     stages=("deploy", "unstructured", "kprune"), output=tmp_path / "out")
    assert [(row["stage"], row["runtime"]) for row in table.rows] == [
        ("dense baseline", "torch eager fp32"),
        ("sparsegpt 50% weights + recovery (3 steps, KD)", "torch eager fp32"),
        ("kprune 30% FLOPs kept + recovery (3 steps, KD)", "torch eager fp32"),
        ("dense baseline", "ONNX Runtime int8 dynamic (artefact)"),
        ("kprune 30% FLOPs kept int8", "graphprune lower int8 (torch.compile)"),
        ("kprune 30% FLOPs kept int8", "ONNX Runtime int8 dynamic (artefact)"),
        ("kprune 30% FLOPs kept int8", "AOTInductor int8 (artefact)"),
    ]
    dense, sparse, structured, peer, lowered, onnx8, aoti8 = table.rows
    assert structured["params"] < dense["params"] == sparse["params"]  # heads and neurons really removed
    assert lowered["params"] == onnx8["params"] == aoti8["params"] == structured["params"]
    assert onnx8["bytes"] < peer["bytes"] < dense["bytes"]
    assert dense["speedup_vs_dense"] == 1.0 and peer["speedup_vs_ort_int8"] == 1.0
    assert all(row["latency_ms"] > 0 and row["accuracy"] is not None for row in table.rows)
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == ["dense-onnx-int8", "kprune-aoti-int8", "kprune-onnx-int8"]
    for folder, row in zip(folders, (peer, aoti8, onnx8)):
        manifest = json.loads((tmp_path / "out" / folder / "artefact.json").read_text())
        assert manifest["accuracy"]["toy/test"]["accuracy"] == pytest.approx(row["accuracy"], abs=1e-4)  # measured in its runtime
    assert "speedup_vs_ort_int8" in lines[-2]
    assert all(not n.meta.get("graphprune.sparsity") for n in graph.nodes)  # the baseline is untouched


def test_stages_are_checked():
    assert check_stages(["deploy", "kprune"]) == ("kprune", "deploy")
    with pytest.raises(ValueError, match=r"demo: stages \['prune'\] are not a selection of \['unstructured', 'kprune', 'deploy'\]"):
        check_stages(["prune"])


def test_the_command_runs_compress_unless_the_fixed_pipeline_is_asked_for(monkeypatch, tmp_path):
    import graphprune.app.demo as demo
    from graphprune.app.cli import main

    calls = []
    monkeypatch.setattr(demo, "run_compress_demo", lambda cache, **kw: calls.append(("compress", kw)) or {"chosen": {}})
    monkeypatch.setattr(demo, "run_demo", lambda cache, **kw: calls.append(("fixed", kw)))
    assert main(["demo", "--output", str(tmp_path)]) == 0
    assert main(["demo", "--time", "7m"]) == 0
    assert main(["demo", "--stages", "unstructured,kprune"]) == 0
    assert main(["demo", "--recovery-steps", "5"]) == 0
    assert [c[0] for c in calls] == ["compress", "compress", "fixed", "fixed"]
    assert calls[0][1]["output"] == str(tmp_path) and calls[1][1]["time"] == "7m"
    assert calls[2][1]["stages"] == ["unstructured", "kprune"] and calls[2][1]["recovery_steps"] == 60
    assert calls[3][1]["stages"] == ["kprune", "deploy"] and calls[3][1]["recovery_steps"] == 5


def test_the_compress_demo_enqueues_a_pipeline_of_the_default_space(tmp_path):
    from graphprune.app.compress.space import default_space
    from graphprune.app.demo import DEMO_TRIAL

    space = default_space("text-classification", ("onnx", "aoti", "torch"))
    kprune, wanda, lower = space["passes"]
    assert DEMO_TRIAL["structured_search.flops"] in kprune["flops"]["choice"] and "wanda.use" in DEMO_TRIAL and wanda["id"] == "wanda"
    assert DEMO_TRIAL["finetune.max_steps"] in space["finetune"]["max_steps"]["choice"]
    assert DEMO_TRIAL["lower.activations"] in lower["activations"]["choice"] and DEMO_TRIAL["export.format"] in space["export"]["format"]["choice"]
