"""``graphprune compress``: the budget on a fake clock, the choice against a hand-built study, and a whole run on a tiny model."""

import json
import math
import random
import re
import shutil

import optuna
import pytest
import torch

import graphprune
from graphprune.app.cli import main
from graphprune.app.search.budget import AIM, HIGH, LOW, MIN_ROUNDS, Budget, parse_duration
from graphprune.app.compress.choose import candidates, choose, speedups
from graphprune.app.compress.spec import parse_max_drop, parse_runtimes, parse_shapes
from graphprune.app.export import evaluate_artefact
from graphprune.training.user_data import load_data

from ..models import sentiment_data, tiny_tokenizer
from .test_user_jobs import sentiment_folder, write_csv


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("2.5m", 150), (45, 45), ("600", 600)])
def test_durations_read_as_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0s", "5 minutes", None, True])
def test_a_bad_duration_names_the_option_and_the_forms(text):
    with pytest.raises(ValueError, match=r"--time = .* expected a duration such as 90s, 30m, 1h"):
        parse_duration(text)


def test_bad_limits_shapes_and_runtimes_are_named():
    assert parse_max_drop(1) == (1.0, False) and parse_max_drop("0.5%") == (0.5, True)
    assert parse_shapes("8x128,1x64") == ((8, 128), (1, 64)) and parse_runtimes("torch,onnx") == ("onnx", "torch")
    for call, value, words in ((parse_max_drop, "-1", "max-drop"), (parse_max_drop, "one", "max-drop"), (parse_shapes, "8by128", "batch x length"),
                               (parse_shapes, "8x128,8x128", "distinct"), (parse_runtimes, "tensorrt", "onnx, aoti, torch")):
        with pytest.raises(ValueError, match=words):
            call(value)


@pytest.mark.parametrize("total, trial, setup, finale", [(600, 30, 40, 30), (1800, 120, 60, 60), (1800, 300, 60, 60), (3600, 200, 120, 90)])
def test_on_a_fake_clock_no_trial_ends_past_the_finale_and_the_run_ends_within_its_budget(total, trial, setup, finale):
    """Trials of varying length (as recovery steps vary), a finale that takes what was estimated: the run ends in [LOW, HIGH]."""
    rng = random.Random(total + trial)
    clock = FakeClock()
    budget = Budget(total, clock)
    clock.t += setup
    budget.prior, budget.finale = trial, finale
    durations, starts = [], []
    while budget.may_start(durations):
        starts.append(budget.elapsed())
        duration = rng.uniform(0.6, 1.0) * trial  # never above the slowest-so-far times the margin: the first is the prior
        clock.t += duration
        durations.append(duration)
        assert budget.elapsed() <= total - finale  # the trial ended before the finale had to begin
    assert durations, "the budget held a trial"
    round_s = 0.8
    rounds = budget.rounds(round_s, after=finale - 30 * round_s)
    assert rounds >= MIN_ROUNDS
    clock.t += rounds * round_s + finale - 30 * round_s
    assert LOW * total <= budget.elapsed() <= HIGH * total
    assert budget.elapsed() <= AIM * total + round_s + 1e-9 or rounds == MIN_ROUNDS


def test_a_budget_that_cannot_hold_one_trial_says_what_it_needs():
    budget = Budget(120, FakeClock())
    with pytest.raises(ValueError, match=r"--time 2m is too short for one trial: about 3m20s is needed .* give at least --time 4m"):
        budget.check_fits(fixed=50, trial=100, finale=50)
    budget.check_fits(fixed=10, trial=60, finale=40)  # 110 s fits


def _trial(number, accuracy, latency, drop, limit=1.0, repeat_of=None):
    attrs = {"metrics": {"accuracy": accuracy, "latency": latency, "accuracy_drop": drop}}
    if repeat_of is not None:
        attrs["repeat_of"] = repeat_of
    return optuna.trial.create_trial(values=[accuracy, latency], user_attrs=attrs, constraints={"accuracy_drop": drop - limit})


def test_the_candidates_are_the_fastest_feasible_trials_and_the_choice_is_the_geometric_mean_of_the_re_timing():
    study = optuna.create_study(directions=["maximize", "minimize"])
    rows = [(0.83, 0.30, 0.2), (0.80, 0.10, 3.0), (0.82, 0.20, 0.9), (0.82, 0.15, 1.0), (0.83, 0.25, 0.1), (0.81, 0.12, 1.5)]
    for number, (accuracy, latency, drop) in enumerate(rows):
        study.add_trial(_trial(number, accuracy, latency, drop))
    study.add_trial(_trial(6, 0.82, 0.15, 1.0, repeat_of=3))  # a repeat is one pipeline, once
    done = study.get_trials(deepcopy=False)
    # feasible (drop <= 1): trials 0, 2, 3, 4 (and the repeat); the fastest three by latency: 3 (0.15), 2 (0.20), 4 (0.25)
    assert [t.number for t in candidates(done)] == [3, 2, 4]
    timed = {"dense eager fp32": {"8x128": 100.0, "1x64": 10.0}, "dense ort int8": {"8x128": 40.0, "1x64": 5.0}, "dense aoti fp32": {"8x128": 50.0, "1x64": 4.0},
             "trial 3": {"8x128": 12.0, "1x64": 4.0}, "trial 2": {"8x128": 15.0, "1x64": 2.5}, "trial 4": {"8x128": 11.0, "1x64": 5.0}}
    means = {n: math.sqrt(timed[n]["8x128"] / 100 * timed[n]["1x64"] / 10) for n in ("trial 3", "trial 2", "trial 4")}
    assert choose(timed, list(means)) == min(means, key=means.get) == "trial 2"  # fastest at 1x64 outweighs 8x128
    assert speedups(timed, "trial 2")["1x64"] == {"vs_eager_fp32": 4.0, "vs_ort_int8": 2.0, "vs_aoti_fp32": 1.6}


SPACE = """
[[passes]]
name = "structured_search"
optional = true
method = "kprune"
flops = {{ choice = [0.4, 0.7] }}
num_samples = 32
score_samples = 16
reconstruct_samples = 16
seq_len = 16
progress = false

[[passes]]
name = "lower"
activations = {{ choice = ["static", "dynamic"] }}
num_samples = 16
compile = false

[finetune]
distill = true
max_steps = {{ choice = [0, 3] }}
batch_size = 8

[export]
optional = true
format = "onnx"
quantize = {{ choice = ["dynamic", "static"] }}
"""


def _user_job(root, time="90s", extra=""):
    sentiment_folder(root)  # the tiny classifier as a save_pretrained folder, root / "model"
    for split, seed, n in (("train", 0, 96), ("validation", 2, 32), ("test", 1, 32)):
        d = sentiment_data(n, seed=seed)
        write_csv(root / f"{split}.csv", [(t, d.label_names[y]) for t, y in zip(d.texts, d.labels)], ["review", "sentiment"])
    path = root / "job.toml"
    path.write_text(f"""
[model]
path = "model"

[data]
train = "train.csv"
validation = "validation.csv"
test = "test.csv"
columns = {{ text = "review", label = "sentiment" }}
max_length = 16

[compress]
max_drop = 50
time = "{time}"
shapes = ["4x16", "1x8"]
runtimes = ["onnx", "torch"]
{extra}
""" + SPACE.format())
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    path = _user_job(root, extra="workers = 2")
    result = graphprune.compress(path, progress=False, log=lambda *a: None)
    return root, path, result


def test_a_run_keeps_its_budget_and_writes_every_output(run):
    root, path, result = run
    out = root / "job_compressed"
    assert {p.name for p in out.iterdir()} >= {"artefact", "run.toml", "search_job.toml", "front.json", "compress.json", "report.html"}
    assert json.loads((out / "compress.json").read_text()) == json.loads(json.dumps(result, default=str))
    budget = result["budget"]
    assert budget["stopped"] in ("budget", "space") and (LOW <= budget["share"] <= HIGH or budget["stopped"] == "space"), budget
    assert result["trials"] and all(t["state"] in ("COMPLETE", "FAIL") for t in result["trials"])
    assert len({t["worker"] for t in result["trials"]}) == 2  # --workers 2: this process and one more shared the study


def test_the_chosen_artefact_scores_on_test_what_its_own_runtime_gives(run):
    root, path, result = run
    chosen = result["chosen"]  # a trial timed again, or the dense ONNX Runtime int8 peer when it was faster and kept the limit
    assert chosen is not None and chosen["trial"] in [c["trial"] for c in result["candidates"]] + [None]
    test = load_data("text-classification", train=str(root / "train.csv"), validation=str(root / "validation.csv"), test=str(root / "test.csv"),
                     columns={"text": "review", "label": "sentiment"}, model_label_names=("neg", "pos"), log=lambda *a: None).splits["test"]
    artefact = root / "job_compressed" / "artefact"
    if chosen["export"]:
        again = evaluate_artefact(artefact, test, max_length=16, progress=False)["accuracy"]
    else:
        again = graphprune.evaluate(graphprune.load(artefact), test, tiny_tokenizer(), max_length=16, progress=False)["accuracy"]
    assert again == pytest.approx(chosen["test_artefact"], abs=1e-9)
    assert chosen["drop_test_points"] == pytest.approx(100 * (result["dense"]["test"] - chosen["test_artefact"]), abs=1e-6)
    for shape, ratios in chosen["speedups"].items():  # the speed-ups are the side-by-side timings' ratios
        assert ratios["vs_eager_fp32"] == pytest.approx(result["dense"]["ms"]["dense eager fp32"][shape] / chosen["ms"][shape], rel=1e-2)


def test_the_report_is_self_contained_and_shows_the_runs_numbers(run):
    root, path, result = run
    page = (root / "job_compressed" / "report.html").read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page) + re.findall(r"url\(([^)]+)\)", page)
    assert urls and all(u.startswith("data:") or u.startswith("#") for u in urls), [u[:40] for u in urls if not u.startswith("data:")]
    cells = {m for m in re.findall(r'data-v="([^"]*)"', page)}
    chosen = result["chosen"]
    for value in (result["dense"]["validation"], result["dense"]["test"], chosen["test_artefact"], chosen["validation"],
                  *chosen["ms"].values(), *(r["vs_eager_fp32"] for r in chosen["speedups"].values())):
        assert str(value) in cells, value
    assert all(str(t["trial"]) in cells for t in result["trials"])
    # `graphprune report DIR` writes the same page again from the JSON
    before = page
    (root / "job_compressed" / "report.html").unlink()
    assert main(["report", str(root / "job_compressed")]) == 0
    assert (root / "job_compressed" / "report.html").read_text() == before


def test_a_budget_too_small_is_refused_before_anything_is_written(tmp_path, capsys):
    path = _user_job(tmp_path, time="3s")
    assert main(["compress", str(path), "--no-progress"]) == 2
    assert "too short for one trial" in capsys.readouterr().err
    assert not (tmp_path / "job_compressed").exists()


def test_an_unknown_compress_field_and_a_missing_model_are_clear_errors(tmp_path, capsys):
    path = _user_job(tmp_path, extra='budget = "5m"')
    assert main(["compress", str(path)]) == 2
    assert "[compress] has unknown field 'budget'" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nowhere"), "--data", "rotten_tomatoes"]) == 2
    assert "is neither a built-in model" in capsys.readouterr().err


def _browser():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_report_renders_in_headless_chromium_with_a_quiet_console_and_its_plots_drawn(run, tmp_path):
    import subprocess

    import matplotlib.image

    root, _, result = run
    page = root / "job_compressed" / "report.html"
    common = [_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600", "--hide-scrollbars"]
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    shot = subprocess.run(common + [f"--screenshot={tmp_path / 'page.png'}", page.as_uri()], capture_output=True, text=True, timeout=180, env=env)
    console = [line for line in shot.stderr.splitlines() if "CONSOLE" in line or "Refused to" in line or "Uncaught" in line]
    assert not console, console  # a script error or a resource that failed to load would be logged here
    pixels = matplotlib.image.imread(tmp_path / "page.png")[..., :3]
    blue = (abs(pixels - torch.tensor([31, 119, 180]).numpy() / 255).max(axis=-1) < 0.06).sum()
    assert blue > 200, "the plots' front markers and kept-unit bars (#1f77b4) are not drawn: the data: images did not render"
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180, env=env).stdout
    chosen = result["chosen"]
    for value in (chosen["test_artefact"], result["dense"]["test"]):
        assert f'data-v="{value}"' in dom  # the rendered page carries the run's own numbers


def test_optuna_dashboard_lists_the_study_with_each_trials_pipeline(run):
    """The study lives where Optuna's own tools read it: optuna-dashboard on the journal shows the pipelines."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install optuna-dashboard)")
    root, _, result = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    journal = root / "job_compressed" / "search_job.journal"
    launcher = "import sys; from optuna_dashboard._cli import main; sys.exit(main())"  # the optuna-dashboard command
    server = subprocess.Popen([sys.executable, "-c", launcher, str(journal), "--storage-class", "JournalFileStorage", "--host", "127.0.0.1",
                               "--port", str(port), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and studies is None:
            try:
                studies = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer"
        study = next(s for s in studies if s["study_name"] == "compress")
        detail = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}?after=0", timeout=10).read())
        shown = {t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]} for t in detail["trials"]}
        for row in result["trials"]:
            assert shown[row["trial"]]["pipeline"] == row["pipeline"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "question-answering", "feature-extraction"])
@pytest.mark.parametrize("runtimes", ["onnx,aoti,torch", "torch", "onnx", "aoti,torch"])
def test_the_default_space_is_a_valid_search_job_for_every_task_and_runtime_set(tmp_path, task, runtimes):
    from graphprune.app.compress.outputs import search_job_text
    from graphprune.app.compress.spec import make_spec
    from graphprune.app.search.job import read_search_job, sample

    spec = make_spec({"path": str(tmp_path / "model"), "task": task}, {"train": str(tmp_path / "train.csv")}, runtimes=runtimes, out=tmp_path / "out")
    path = tmp_path / "job.toml"
    path.write_text(search_job_text(spec, task, "f1", 1.0))
    job = read_search_job(path)  # every pass config is built at each choice and range end here
    formats = set()
    rng = random.Random(0)
    for _ in range(40):
        steps, finetune, export = sample(job, optuna.trial.FixedTrial({p.name: rng.choice(p.values) if p.kind == "choice" else p.values[0]
                                                                        for p in job.params}))
        formats.add(export["format"] if export else "torch")
        assert (export is None or export["format"] != "onnx") == ("lower" in [name for name, _ in steps])  # ONNX Runtime quantizes itself
        assert export is None or export["format"] == "onnx" or "quantize" not in export
        pruned = {name for name, _ in steps} & {"structured_search", "prune_weight"}
        assert finetune is None or pruned  # a recovery only follows a pruning pass
    assert formats == set(runtimes.split(","))
    # the enqueued first trials (the benchmarks' best pipelines) passed the job's own check above; they prune, recover and
    # run in the first exported runtime asked for
    assert len(job.enqueue) == 2
    for params in job.enqueue:
        steps, finetune, export = sample(job, optuna.trial.FixedTrial({**{p.name: p.values[0] for p in job.params}, **params}))
        assert steps[0][0] == "structured_search" and finetune["max_steps"] in (120, 240)
        assert (export or {}).get("format", "torch") == ("aoti" if "aoti" in runtimes else "onnx" if "onnx" in runtimes else "torch")


def test_a_recovery_follows_only_the_passes_named_in_after(tmp_path):
    from graphprune.app.search.job import read_search_job, sample

    job_text = """
[model]
name = "baseline"
[data]
name = "rotten_tomatoes"
[search]
objectives = ["accuracy", "latency"]
[[passes]]
name = "remove_heads"
optional = true
fraction = 0.25
[[passes]]
name = "lower"
[finetune]
max_steps = 10
after = {after}
"""
    path = tmp_path / "job.toml"
    path.write_text(job_text.format(after='["remove_heads"]'))
    job = read_search_job(path)
    assert sample(job, optuna.trial.FixedTrial({"remove_heads.use": True}))[1] == {"max_steps": 10}
    assert sample(job, optuna.trial.FixedTrial({"remove_heads.use": False}))[1] is None
    for bad in ('["lower", "quantize"]', '[]', '"remove_heads"'):
        path.write_text(job_text.format(after=bad))
        with pytest.raises(ValueError, match=r"\[finetune\] after = .* is not allowed; expected a non-empty list of the job's pass ids \['remove_heads', 'lower'\]"):
            read_search_job(path)


def test_a_narrowed_space_keeps_the_recovery_after_the_users_own_pruning_passes():
    from graphprune.app.compress.space import default_space, narrowed

    space = default_space("text-classification", ("onnx",))
    assert narrowed(space, {"passes": [{"name": "structured_search", "flops": 0.3}]})["finetune"]["after"] == ["structured_search"]
    assert "after" not in narrowed(space, {"passes": [{"name": "lower"}]})["finetune"]
    assert narrowed(space, {"passes": [], "finetune": {"max_steps": 5}})["finetune"] == {"max_steps": 5}


def test_a_stopped_run_resumes_its_study(tmp_path):
    path = _user_job(tmp_path, time="5m")
    first = graphprune.compress(path, trials=2, progress=False, log=lambda *a: None)
    before = {t["trial"]: t["pipeline"] for t in first["trials"] if t["state"] == "COMPLETE"}
    again = graphprune.compress(path, trials=3, progress=False, log=lambda *a: None)
    after = {t["trial"]: t["pipeline"] for t in again["trials"] if t["state"] == "COMPLETE"}
    assert first["budget"]["stopped"] == again["budget"]["stopped"] == "trials" and len(before) == 2 and len(after) == 3
    assert {n: p for n, p in after.items() if n in before} == before  # the earlier trials kept, one more run
    assert again["budget"]["share"] < LOW  # out of trials, not of time: it did not wait for the budget


def test_when_no_trial_keeps_the_limit_the_dense_int8_peer_is_delivered(tmp_path, monkeypatch):
    import graphprune.app.compress.run as compress_run

    path = _user_job(tmp_path, time="5m")
    monkeypatch.setattr(compress_run, "candidates", lambda done, *a: [])  # as if every trial lost more than the limit
    result = graphprune.compress(path, trials=1, progress=False, log=lambda *a: None)
    out, peer = tmp_path / "job_compressed", result["dense"]["ort_int8"]
    assert peer["feasible"] and peer["drop_points"] <= 50
    chosen = result["chosen"]
    assert chosen["trial"] is None and chosen["pipeline"].startswith("the dense model") and chosen["validation"] == peer["validation"]
    manifest = json.loads((out / "artefact" / "artefact.json").read_text())
    assert manifest["artefact"] == "onnx" and manifest.get("quantize") == "dynamic", manifest
    test = load_data("text-classification", train=str(tmp_path / "train.csv"), validation=str(tmp_path / "validation.csv"), test=str(tmp_path / "test.csv"),
                     columns={"text": "review", "label": "sentiment"}, model_label_names=("neg", "pos"), log=lambda *a: None).splits["test"]
    assert evaluate_artefact(out / "artefact", test, max_length=16, progress=False)["accuracy"] == pytest.approx(chosen["test_artefact"], abs=1e-9)
    assert chosen["speedups"]["4x16"]["vs_ort_int8"] == 1.0  # it is the reference it is timed against
    assert "dense model" in (out / "run.toml").read_text() and "dense model" in (out / "report.html").read_text()


def test_a_mistake_in_the_narrowed_space_is_named_before_any_work(tmp_path, capsys):
    path = _user_job(tmp_path)
    path.write_text(path.read_text().replace('method = "kprune"', 'method = "kprune"\nflops_typo = 0.3'))
    assert main(["compress", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "flops_typo" in err
    assert not (tmp_path / "job_compressed").exists()
