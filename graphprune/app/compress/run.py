"""``graphprune compress``: from a model and its data to the fastest artefact within a stated loss, in a time budget.

    >>> result = graphprune.compress("runs/my-bert", "job.toml", max_drop=1, time="30m", out="compressed")
    >>> result["chosen"]["speedups"]["8x128"]   # {'vs_eager_fp32': ..., 'vs_ort_int8': ..., 'vs_aoti_fp32': ...}

The run: load the model and data; measure the dense model (validation metric, the dense
references exported and timed); search the default space of the task (``space.py``) with
Optuna, objectives the main metric and latency at the first shape, at most ``max_drop``
points lost on the whole validation split, until the budget (``budget.py``) says the next
trial would not end in time; time the fastest candidates again side by side and choose
(``choose.py``); score the choice on test, export it and evaluate the artefact in its own
runtime; write the output folder (``outputs.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ...ir.graph import load
from ...ir.runtime import RUNTIME
from ..export import evaluate_artefact
from ..job_inputs import load_inputs
from ..search.job import read_search_job, sample
from ..search.objectives import Exported, Reference
from ..search.storage import storage_errors
from ..search.study import Worker, open_storage, open_study, optuna
from ...training.evaluate import main_metric
from ..workflow import check_labels, shape_batch
from ..search.budget import MIN_ROUNDS, Budget, format_seconds
from .choose import CANDIDATES, REFERENCES, candidates, choose, prepare, speedups, time_side_by_side
from .estimates import TYPICAL_STEPS, Estimates
from .outputs import TrialBar, search_job_text, write_outputs
from .spec import CompressSpec, data_argument, make_spec, model_argument, read_compress_job

PROBE_ROUNDS = 3  # timed first to learn a round's seconds, so the rounds fill the time the trials left
REPEATS_IN_A_ROW = 10  # consecutive trials that only drew pipelines already run: the space is exhausted


DEFAULTS = {"max_drop": 1.0, "time": "30m", "trials": None, "shapes": "8x128,1x64", "runtimes": "onnx,aoti,torch", "out": "compressed",
            "storage": None, "workers": 1, "seed": 0}


def compress(model, data=None, *, task=None, max_drop=None, time=None, trials=None, shapes=None, runtimes=None, out=None, storage=None,
             workers=None, seed=None, progress=True, log=print, clock=None) -> dict:
    """Compress ``model`` (a built-in name, a checkpoint or save_pretrained folder, or a job file with ``[compress]``)
    on ``data`` (a built-in data set or a job file naming files); returns the run's JSON (also written to ``out``).

    Defaults: ``max_drop=1`` point (``"1%"``: relative to dense), ``time="30m"``, ``shapes="8x128,1x64"``,
    ``runtimes="onnx,aoti,torch"``, ``out="compressed"``; options given here override a job file's ``[compress]``.
    """
    import time as _time

    clock = clock or _time.monotonic
    start = clock()
    given = {k: v for k, v in {"max_drop": max_drop, "time": time, "trials": trials, "shapes": shapes, "runtimes": runtimes, "out": out,
                               "storage": storage, "workers": workers, "seed": seed}.items() if v is not None}
    if isinstance(model, CompressSpec):
        spec = model
    elif str(model).endswith(".toml"):
        spec = read_compress_job(model, **given)
    else:
        spec = make_spec(model_argument(str(model), task), data_argument(data), **{**DEFAULTS, **given})
    return Compression(spec, Budget(spec.seconds, clock, start=start), progress=progress, log=log).run()


class CompressWorker(Worker):
    """A search worker that also keeps the graphs of the fastest feasible trials: the finale times them again."""

    def keep(self, study, number: int, graph) -> None:
        if graph is not None:
            self.kept[number] = graph
        done = study.get_trials(deepcopy=False, states=(optuna().trial.TrialState.COMPLETE,))
        wanted = {t.number for t in candidates(done)}
        for n in [n for n in self.kept if n not in wanted]:
            dropped = self.kept.pop(n)
            if isinstance(dropped, Exported):
                shutil.rmtree(dropped.folder, ignore_errors=True)


class Compression:
    def __init__(self, spec: CompressSpec, budget: Budget, *, progress: bool, log):
        self.spec, self.budget, self.progress, self.log = spec, budget, progress, log
        self.phases: dict[str, float] = {}
        self.stopped, self.started = None, 0

    def run(self) -> dict:
        with warnings.catch_warnings():
            # Inductor's int8 lowering copies its zero points with torch.tensor(tensor) and warns on every compile
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            self.setup()
            with storage_errors(self.spec.storage):  # a server gone mid-run: one clear error, the trials kept there
                self.search()
                return self.finale()

    # --- before the trials: load, check the budget, measure the dense model -------------------------------------------
    def setup(self) -> None:
        spec, budget = self.spec, self.budget
        inputs = load_inputs(spec.out / "search_job.toml", spec.model, spec.data, log=lambda *a: None)
        self.dense, self.tokenizer, self.splits, self.task = inputs.dense, inputs.tokenizer, inputs.splits, inputs.task
        validation = self.splits["validation"]
        check_labels(self.dense, validation)
        self.max_length = spec.data.get("max_length", 64)
        self.shapes = {f"{b}x{n}": shape_batch(validation, self.tokenizer, batch_size=b, length=n) for b, n in spec.shapes}
        job = self.check_job(main_metric(self.dense, validation))  # a mistake in the user's narrowing, before any work
        self.estimates = Estimates.measure(self.dense, validation, self.splits["test"], self.tokenizer, self.max_length, self.shapes)
        budget.prior = self.estimates.trial(**_smallest_trial(job))
        budget.check_fits(budget.elapsed() + self.estimates.setup(), budget.prior, self.estimates.finale(compiles="torch" in spec.runtimes), "compress")
        self.reference = Reference(self.dense, validation, self.tokenizer, self.max_length, self.shapes[next(iter(self.shapes))], 10)
        self.metric = self.reference.main
        dense_value = self.reference.quality[self.metric]
        self.limit = spec.max_drop * dense_value if spec.relative else spec.max_drop  # points
        self.references = self.export_references()
        self.peer = self.score_peer(dense_value)
        spec.out.mkdir(parents=True, exist_ok=True)
        job_path = spec.out / "search_job.toml"
        _write(job_path, search_job_text(spec, self.task, self.metric, self.limit))
        self.job = read_search_job(job_path)  # the default space and the user's narrowing, checked like any search job
        self.worker = CompressWorker(self.job, self.dense, self.tokenizer, self.splits, self.reference)
        self.phases["setup"] = budget.elapsed()
        # a lowered graph compiled in torch is compiled again when its checkpoint loads for the test scoring
        self.compiles = any(name == "lower" and config.get("compile", True) for _, name, config, _ in self.job.passes)
        budget.finale = self.estimates.finale(compiles=self.compiles)
        self.log(f"compress: {self.task}, {self.metric} on validation {dense_value:.4f} (dense), at most {self.limit:.2f} points lost; "
                 f"budget {format_seconds(budget.total)}, {format_seconds(budget.left())} left after setup")

    def check_job(self, metric: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "search_job.toml"
            path.write_text(search_job_text(self.spec, self.task, metric, 1.0))
            try:
                return read_search_job(path)
            except ValueError as error:  # named after the user's own file, where the narrowing came from
                raise ValueError(str(error).replace(str(path), f"{self.spec.source or 'compress'}")) from None

    def export_references(self) -> dict:
        """The dense model as the peers a user would otherwise pick: ONNX Runtime int8 and AOTInductor fp32."""
        folder = self.spec.out / "dense_references"
        started = time.perf_counter()
        made = {REFERENCES[0]: self.dense}
        for name, options in ((REFERENCES[1], {"format": "onnx", "quantize": "dynamic"}), (REFERENCES[2], {"format": "aoti"})):
            target = folder / name.replace(" ", "_")
            shutil.rmtree(target, ignore_errors=True)
            self.dense.export(target, tokenizer=self.tokenizer, **options)
            made[name] = target
        self.estimates.export_seconds = (time.perf_counter() - started) / 2
        return made

    def score_peer(self, dense_value: float) -> dict:
        """The dense model in ONNX Runtime int8 on validation: the peer a user would otherwise pick is a candidate too,
        delivered when it keeps the limit and no trial is faster, so the run never ends slower than it."""
        exported = Exported(self.dense, self.references[REFERENCES[1]])
        value = exported.score(self.reference)[self.metric]
        drop = round(100 * (dense_value - value), 4)
        return {"model": exported, "validation": value, "drop_points": drop, "feasible": drop <= self.limit}

    # --- the trials -----------------------------------------------------------------------------------------------------
    def search(self) -> None:
        with storage_errors(self.spec.storage, opening=True):
            store = open_storage(self.job, self.spec.storage)
            study = open_study(self.job, store)
        started = self.budget.elapsed()
        threads, others = torch.get_num_threads(), self.start_workers()
        if others:  # the cores are shared among the workers while the trials run, as `search --workers` shares them
            torch.set_num_threads(max(1, threads // self.spec.workers))
        try:
            with TrialBar(self.progress, self.budget, self.metric, self.limit) as bar:
                bar.watch(study)
                self.worker.work(study, store, progress=bar, log=self.log, may_start=self.may_start, fits=self.fits)
        finally:
            torch.set_num_threads(threads)
            codes = [p.wait() for p in others]  # they start no trial past the same deadline
        if any(codes):
            self.log(f"compress: {sum(1 for c in codes if c)} of {len(others)} other workers exited with an error; their running trials are failed")
        self.stopped = self.stopped or "trials"
        self.study = study
        self.phases["trials"] = self.budget.elapsed() - started

    def start_workers(self) -> list:
        """``workers - 1`` more processes on this study (``graphprune search --worker-only``), stopping by the same deadline."""
        if self.spec.workers == 1:
            return []
        stop_at = time.time() + self.budget.left() - self.budget.finale
        command = [sys.executable, "-m", "graphprune", "search", str(self.job.path), "--worker-only", "--no-progress",
                   "--stop-at", f"{stop_at:.1f}", "--trial-estimate", f"{self.budget.prior:.1f}"]
        command += ["--storage", self.spec.storage] if self.spec.storage else []
        command += ["--trials", str(self.spec.trials)] if self.spec.trials else []
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.spec.workers))}
        return [subprocess.Popen(command + ["--worker-index", str(i)], env=env) for i in range(1, self.spec.workers)]

    def may_start(self, study) -> bool:
        trials = study.get_trials(deepcopy=False, states=(optuna().trial.TrialState.COMPLETE, optuna().trial.TrialState.FAIL))
        recent = [t for t in sorted(trials, key=lambda t: t.number)][-REPEATS_IN_A_ROW:]
        if len(recent) == REPEATS_IN_A_ROW and all("repeat_of" in t.user_attrs for t in recent):
            self.stopped = "space"
            return False
        rebuild = self.rebuild_seconds(trials)  # the candidates another process ran are built again here for the timing
        self.budget.finale += rebuild
        fits = self.budget.may_start([t.user_attrs.get("seconds") for t in trials if "repeat_of" not in t.user_attrs])
        self.budget.finale -= rebuild
        if self.started and not fits:
            self.stopped = "budget"
            return False
        self.started += 1  # the first trial always runs: the budget was checked to hold one before any work
        return True

    # --- after the trials: time the candidates again, choose, test, export -------------------------------------------------
    def finale(self) -> dict:
        started = self.budget.elapsed()
        done = self.study.get_trials(deepcopy=False, states=(optuna().trial.TrialState.COMPLETE,))
        chosen, timed, test = None, {}, {"dense": self.reference.score(self.dense, self.splits["test"])[self.metric]}
        ready = self.available(candidates(done))
        picks, models = [t for t, _ in ready], dict(self.references)
        models.update({f"trial {t.number}": model for t, model in ready})
        names = [f"trial {t.number}" for t in picks] + ([REFERENCES[1]] if self.peer["feasible"] else [])
        if names:
            # after the timing: the test scoring, twice; a torch graph is compiled again when its checkpoint is loaded
            compiles = any(not isinstance(m, Exported) and (m.meta.get(RUNTIME) or {}).get("compile")
                           for name, m in models.items() if name.startswith("trial"))
            after = self.estimates.test_seconds() * 2 + (self.estimates.export_seconds if compiles else 2.0)
            calls = prepare(models, self.shapes)
            time_side_by_side(calls, 1, warmup=1)  # first calls allocate and tune: not a round's cost
            began = time.perf_counter()
            time_side_by_side(calls, PROBE_ROUNDS, warmup=0)  # what a round takes here, now, with these models
            rounds = MIN_ROUNDS  # the trials ran out before the time: no reason to wait for it
            if self.stopped == "budget":  # the time left after the last trial that fitted goes to the timing
                rounds = self.budget.rounds((time.perf_counter() - began) / PROBE_ROUNDS, after=after)
            timed = time_side_by_side(calls, rounds)
            name = choose(timed, names)
            trial = next((t for t in picks if f"trial {t.number}" == name), None)  # None: the dense peer
            chosen = self.deliver(trial, models[name] if trial else self.peer["model"], name, timed, test)
            chosen["timing_rounds"] = rounds
        self.phases["finale"] = self.budget.elapsed() - started
        result = write_outputs(self, done, picks, timed, chosen, test)
        return result

    def fits(self, trial) -> bool:
        """Whether this claimed trial, by its own recovery steps, ends before the finale must begin. Trials differ
        most by their recovery (240 steps took 345 s where 60 took 160 on MiniLM): a trial costs a base plus its
        steps, the base read off the finished trials and a step's cost estimated from the dense model."""
        steps = _recovery_steps(sample(self.job, trial)[1])  # the values the trial will run with (Optuna keeps them)
        done = [t for t in trial.study.get_trials(deepcopy=False, states=(optuna().trial.TrialState.COMPLETE,))
                if "repeat_of" not in t.user_attrs and t.user_attrs.get("seconds")]
        if not done:
            return True  # the first trial: the budget was checked to hold one before any work
        per_step = self.estimates.step_seconds((self.job.finetune or {}).get("batch_size", 32))
        base = min(t.user_attrs["seconds"] - per_step * _recovery_steps(t.user_attrs.get("finetune")) for t in done)
        need = self.budget.margin * (max(base, 0.0) + per_step * steps)
        if self.budget.left() - self.budget.finale - self.rebuild_seconds(done) >= need:
            return True
        self.stopped = "budget"
        return False

    def rebuild_seconds(self, trials: list) -> float:
        done = [t for t in trials if t.state == optuna().trial.TrialState.COMPLETE]
        return sum(self.budget.margin * (t.user_attrs.get("seconds") or 0) for t in candidates(done) if t.number not in self.worker.kept)

    def available(self, picks: list) -> list:
        """The candidates this process holds, and those another process ran that can be built again in the time left
        (at least the fastest: something is delivered)."""
        out = []
        for trial in picks:
            if trial.number in self.worker.kept:
                out.append((trial, self.worker.kept[trial.number]))
            elif not out or self.budget.left() - self.budget.finale >= self.budget.margin * (trial.user_attrs.get("seconds") or 0):
                out.append((trial, self.rebuild(trial)))
            else:
                self.log(f"compress: trial {trial.number} (another worker's) is not timed again: no time left to build it here")
        return out

    def rebuild(self, trial):
        """A candidate another process ran (or an earlier run of a resumed study): built again from its pipeline."""
        export = trial.user_attrs.get("export")
        return self.worker.build([tuple(s) for s in trial.user_attrs["steps"]], trial.user_attrs.get("finetune"), export,
                                 self.worker.artefact_folder(trial.number) if export else None)

    def deliver(self, trial, model, name: str, timed: dict, test: dict) -> dict:
        """Score the chosen trial's graph on test, write its artefact, evaluate the artefact in its own runtime on test."""
        target = self.spec.out / "artefact"
        tmp = target.with_name(".artefact.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        graph = model.graph if isinstance(model, Exported) else model
        test["graph"] = self.reference.score(graph, self.splits["test"])[self.metric]
        if isinstance(model, Exported):
            shutil.copytree(model.folder, tmp)
        else:
            graph.save(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        if isinstance(model, Exported):
            scores = evaluate_artefact(target, self.splits["test"], self.tokenizer, max_length=self.max_length, progress=False, reference=self.dense)
        else:
            scores = self.reference.score(load(target), self.splits["test"])
        test["artefact"] = scores[self.metric]
        return {"trial": trial.number if trial else None, "name": name, "graph": graph, "exported": isinstance(model, Exported),
                "speedups": speedups(timed, name)}


def _write(path: Path, text: str) -> None:
    from ..search.report import _atomic_write

    _atomic_write(path, text)



def _recovery_steps(options: dict | None) -> int:
    return int((options or {}).get("max_steps") or 0)


def _smallest_trial(job) -> dict:
    """The K-prune calibration size and the fewest recovery steps (at most TYPICAL_STEPS) the job's space tries:
    what the budget must hold one trial of."""
    def least(value, default):
        return min(value["choice"]) if isinstance(value, dict) and "choice" in value else \
            min(value.get("range") or value.get("int") or [default]) if isinstance(value, dict) else value

    kprune = next((config for _, name, config, _ in job.passes if name == "structured_search"), None)
    samples = 0 if kprune is None else least(kprune.get("num_samples", 2048), 2048)
    steps = least((job.finetune or {}).get("max_steps", 0), 0) if job.finetune is not None else 0
    return {"samples": int(samples), "steps": int(min(steps, TYPICAL_STEPS)), "batch": int((job.finetune or {}).get("batch_size", 32))}
