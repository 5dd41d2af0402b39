"""Running a search: the Optuna study and its storage, the trials of one worker, and the prefix cache.

Storage: by default a journal file beside the job (``<job>.journal``, Optuna's
``JournalStorage`` with a file backend, safe for several processes on one machine);
``storage = URL`` (or ``--storage``) for an RDB such as PostgreSQL or MySQL, which is
how workers on several machines share one study. A study resumes where it stopped.

Each trial is claimed under a lock when the journal is local (so N workers run exactly
``trials`` trials between them); a trial whose worker died is marked failed, never run
twice nor counted: on one machine from its worker's pid, on an RDB from Optuna's
heartbeats. Failed trials do not count toward ``trials``: the search runs until that
many have completed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

from ...infra.pipeline import run_pass, run_pipeline
from ...training.calibration import CalibrationData
from ...training.finetune import finetune
from .front import pareto_front
from .job import SearchJob, sample
from .objectives import METRICS, Exported, Reference, measure, needs_commit
from .report import describe_pipeline
from .storage import Heartbeat, engine_kwargs, storage_error

HEARTBEAT_S, GRACE_S = 10, 30  # RDB heartbeats: a trial silent for GRACE_S seconds is failed


def optuna():
    import optuna as module  # imported on first use: it takes a second, and only a search needs it

    module.logging.set_verbosity(module.logging.WARNING)
    warnings.filterwarnings("ignore", category=module.exceptions.ExperimentalWarning)
    return module


def journal_path(job: SearchJob):
    return job.path.with_suffix(".journal")


def open_storage(job: SearchJob, url: str | None = None):
    op = optuna()
    url = url or job.storage
    if url:
        return _open_rdb(op, url)
    from optuna.storages.journal import JournalFileBackend

    return op.storages.JournalStorage(JournalFileBackend(str(journal_path(job))))


def _open_rdb(op, url: str, attempts: int = 6):
    """Optuna's RDBStorage creates its tables and stamps their version on first open, and two
    processes opening a new database at once (workers started together) can both try: the
    loser fails on a duplicate version row or a locked file. The winner's schema is then
    there, so opening again succeeds. The engine times out its connects and pre-pings
    (:func:`graphprune.app.search.storage.engine_kwargs`): a server that is gone is an error, not a hang."""
    import random

    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            return op.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt * (1 + random.random()))  # jittered: the openers do not collide again


def make_sampler(job: SearchJob, worker: int = 0):
    op = optuna()
    seed = None if job.seed is None else job.seed + worker  # workers with one seed would draw the same trials
    if job.sampler == "random":
        return op.samplers.RandomSampler(seed=seed)
    if job.sampler == "nsga2":
        return op.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, job.trials // 2)))
    return op.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, job.trials // 3)),
                                  multivariate=True)


def space_key(job: SearchJob) -> str:
    """What a stored study must match to be resumed by this job."""
    return json.dumps({"params": [[p.name, p.kind, list(p.values), p.step] for p in job.params], "objectives": list(job.objectives),
                       "passes": [[i, n] for i, n, _, _ in job.passes]}, sort_keys=True)


def open_study(job: SearchJob, storage, worker: int = 0):
    op = optuna()
    study = op.create_study(storage=storage, sampler=make_sampler(job, worker), study_name=job.study, load_if_exists=True,
                            directions=[METRICS[o] for o in job.objectives])
    key = study.user_attrs.get("space")
    if key is None:  # a new study: the job's enqueued trials come first (once: a resumed study has its key)
        study.set_user_attr("space", space_key(job))
        for params in job.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    elif key != space_key(job):
        raise ValueError(f"{job.path}: study {job.study!r} in this storage was searched with another space or other objectives; "
                         "name a new study ([search] study = '...') or remove the old one")
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study) -> list[int]:
    """Mark failed the running trials whose worker on this machine is gone (and, on an RDB, the stale ones)."""
    op = optuna()
    op.storages.fail_stale_trials(study)
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(op.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(op.exceptions.UpdateFinishedTrialError, RuntimeError):
                study.tell(trial.number, state=op.trial.TrialState.FAIL)
                failed.append(trial.number)
    return failed


@contextlib.contextmanager
def claim_lock(job: SearchJob, storage):
    """One claimant at a time on this machine when the study lives in the local journal."""
    op = optuna()
    if not isinstance(storage, op.storages.JournalStorage):
        yield
        return
    with open(journal_path(job).with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def completed(study) -> int:
    op = optuna()
    return len(study.get_trials(deepcopy=False, states=(op.trial.TrialState.COMPLETE,)))


class PrefixCache:
    """Graphs after each prefix of a pipeline, least recently used dropped: a trial pays only for the steps that differ."""

    def __init__(self, graph, data, size: int):
        self.graph, self.data, self.size = graph, data, size
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.runs = 0

    def run(self, steps: list[tuple[str, dict]]):
        keys = [json.dumps(steps[: i + 1], sort_keys=True, default=str) for i in range(len(steps))]
        start, graph = 0, self.graph
        for i in range(len(steps), 0, -1):
            if keys[i - 1] in self.graphs:
                start, graph = i, self.graphs[keys[i - 1]]
                self.graphs.move_to_end(keys[i - 1])
                self.hits += 1
                break
        for i in range(start, len(steps)):
            graph, _ = run_pipeline(graph, [steps[i]], data=self.data)
            self.runs += 1
            if self.size:
                self.graphs[keys[i]] = graph
                while len(self.graphs) > self.size:
                    self.graphs.popitem(last=False)
        return graph


class Worker:
    """Runs trials of one study in this process, with the data, the reference figures and the cache loaded once."""

    def __init__(self, job: SearchJob, dense, tokenizer, splits, reference: Reference):
        self.job, self.dense, self.tokenizer, self.splits, self.reference = job, dense, tokenizer, splits, reference
        self.max_length = job.data.get("max_length", 64)
        calibration = CalibrationData(splits["train"], tokenizer, max_length=self.max_length)
        self.cache = PrefixCache(dense, calibration, job.cache_size)
        self.wanted = set(job.objectives) | set(job.constraints)
        self.kept: dict[int, object] = {}  # this worker's graphs on the current front: the report need not build them again
        self._artefacts = None  # a temporary folder for the trials' artefacts, made on first use

    def build(self, steps: list[tuple[str, dict]], finetune_options: dict | None, export: dict | None = None, folder=None):
        """The trial's graph: the passes before the first ``lower``, the fine-tune, then ``lower`` and the rest;
        with ``export``, the artefact of that graph in ``folder`` (an :class:`Exported`)."""
        cut = next((i for i, (name, _) in enumerate(steps) if name == "lower"), len(steps))
        graph = self.cache.run(steps[:cut])
        if finetune_options is not None:
            graph = graph.copy() if graph is self.dense or any(graph is g for g in self.cache.graphs.values()) else graph
            teacher = self.dense if self.job.distill else None
            finetune(graph, self.splits["train"], self.tokenizer, teacher=teacher, **{"max_length": self.max_length, "progress": False, **finetune_options})
        if cut < len(steps):
            graph, _ = run_pipeline(graph, steps[cut:], data=self.cache.data)
        if needs_commit(graph):  # measured as it ships: masks folded into the weights, not multiplied in each call
            graph, _ = run_pass(graph, "commit_masks")
        if export is None:
            return graph
        options = {k: v for k, v in export.items() if k != "format"}
        if options.get("quantize") == "static":
            options["data"] = self.cache.data
        graph.export(folder, format=export["format"], tokenizer=self.tokenizer, **options)
        return Exported(graph, Path(folder))

    def artefact_folder(self, number: int) -> Path:
        if self._artefacts is None:
            self._artefacts = tempfile.TemporaryDirectory(prefix="graphprune-search-")
        return Path(self._artefacts.name) / f"trial_{number}"

    def objective(self, trial) -> list[float]:
        steps, options, export = sample(self.job, trial)
        trial.set_user_attr("steps", [[name, config] for name, config in steps])
        trial.set_user_attr("finetune", options)
        trial.set_user_attr("export", export)
        trial.set_user_attr("pipeline", describe_pipeline(trial))  # what optuna-dashboard shows of the trial
        earlier = self.same_pipeline(trial)
        if earlier is not None:  # samplers draw a pipeline again (TPE often does): its figures, not another build
            trial.set_user_attr("repeat_of", earlier.number)
            graph, values = None, dict(earlier.user_attrs["metrics"])  # None: the first trial keeps its graph (and artefact)
        else:
            graph = self.build(steps, options, export, self.artefact_folder(trial.number) if export else None)
            values = measure(graph, self.reference, self.wanted)
        trial.set_user_attr("metrics", values)
        for key, bound in self.job.constraints.items():  # Optuna's samplers read them: feasible when <= 0
            trial.set_constraint(key, values[key] - bound)
        return [values[o] for o in self.job.objectives], graph

    @staticmethod
    def same_pipeline(trial):
        """A completed trial that ran the same steps, fine-tune and export (parameters of unused passes aside)."""
        op = optuna()

        def pipeline(t):
            return [t.user_attrs.get(k) for k in ("steps", "finetune", "export")]

        done = trial.study.get_trials(deepcopy=False, states=(op.trial.TrialState.COMPLETE,))
        return next((t for t in done if "metrics" in t.user_attrs and pipeline(t) == pipeline(trial)), None)

    def keep(self, study, number: int, graph) -> None:
        """Keep the graph of a trial while it is on the front (a few graphs, not one per trial)."""
        op = optuna()
        if graph is not None:
            self.kept[number] = graph
        front = {t.number for t in pareto_front(self.job, study.get_trials(deepcopy=False, states=(op.trial.TrialState.COMPLETE,)))}
        for n in [n for n in self.kept if n not in front]:
            dropped = self.kept.pop(n)
            if isinstance(dropped, Exported):
                shutil.rmtree(dropped.folder, ignore_errors=True)

    def work(self, study, storage, *, progress=None, log=print, may_start=None, fits=None) -> int:
        """Claim and run trials until the study has ``trials`` completed or running; returns how many this worker ran.

        ``may_start(study)``, when given, is asked before each claim: False stops this worker
        (a time budget that one more trial would overrun). ``fits(trial)`` is asked of the
        claimed trial once its pipeline is known: False fails it unrun and stops this worker."""
        op = optuna()
        from optuna.storages._heartbeat import is_heartbeat_enabled

        ran, host = 0, socket.gethostname()
        while True:
            if may_start is not None and not may_start(study):
                return ran
            with claim_lock(self.job, storage):
                fail_dead_trials(study)
                busy = study.get_trials(deepcopy=False, states=(op.trial.TrialState.COMPLETE, op.trial.TrialState.RUNNING))
                if len(busy) >= self.job.trials:
                    return ran
                trial = study.ask()
                if is_heartbeat_enabled(storage):  # at once: a worker killed before its heartbeat thread starts is still found
                    storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("worker", f"{host}:{os.getpid()}")
            # read again after the claim: on an RDB (no shared lock) another worker may have claimed since `busy`
            # was read, and Optuna numbers trials under a row lock, so every earlier claim is visible now
            earlier = [t for t in study.get_trials(deepcopy=False, states=(op.trial.TrialState.COMPLETE, op.trial.TrialState.RUNNING))
                       if t.number < trial.number]
            if len(earlier) >= self.job.trials:  # another machine claimed the last one meanwhile (RDB, no shared lock)
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=op.trial.TrialState.FAIL)
                return ran
            if fits is not None and not fits(trial):  # this pipeline (its recovery steps) would not end in time
                trial.set_user_attr("skipped", "would not end within the time budget")
                study.tell(trial, state=op.trial.TrialState.FAIL)
                return ran
            # heartbeats as study.optimize records them; a trial that cannot record one for GRACE_S is interrupted
            # (the other workers fail it then) and the search ends with StorageLost instead of running on blind
            with Heartbeat(storage, trial._trial_id, HEARTBEAT_S, GRACE_S):
                started = time.perf_counter()
                try:
                    values, graph = self.objective(trial)
                    trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))  # what a time budget estimates from
                except Exception as error:  # the trial fails, the search goes on
                    if storage_error(error) is not None:  # not the trial's fault: the storage is gone (ends the search)
                        raise
                    trial.set_user_attr("error", f"{type(error).__name__}: {str(error)[:300]}")
                    trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
                    study.tell(trial, state=op.trial.TrialState.FAIL)
                    log(f"trial {trial.number} failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
                else:
                    study.tell(trial, values)
                    self.keep(study, trial.number, graph)
            ran += 1
            if progress is not None:
                progress.n = completed(study)
                progress.refresh()
