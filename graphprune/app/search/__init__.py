"""``graphprune search job.toml``: a budgeted, multi-objective search over pass pipelines with Optuna.

    >>> result = graphprune.search("job.toml")            # or: graphprune search job.toml --workers 2
    >>> print(result["table"])                             # the Pareto front, validation and test

The job file is described in :mod:`graphprune.app.search.job`; running and storage in
:mod:`graphprune.app.search.study`; what is reported in :mod:`graphprune.app.search.report`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

from tqdm.auto import tqdm

from ..job_inputs import load_inputs
from ..workflow import check_labels, latency_batch, shape_batch
from .budget import deadline_gate
from .job import SearchJob, read_search_job
from .objectives import Reference
from .report import report
from .storage import StorageLost, storage_errors
from .study import Worker, completed, fail_dead_trials, open_storage, open_study

__all__ = ["StorageLost", "read_search_job", "search"]


def _setup(job: SearchJob):
    loaded = load_inputs(job.path, job.model, job.data, log=lambda line: None)
    dense, tokenizer, splits = loaded.dense, loaded.tokenizer, loaded.splits
    validation = splits["validation"].subset(job.data.get("eval_limit"))
    check_labels(dense, validation)
    lat = job.latency
    if lat.get("padded"):
        inputs = shape_batch(validation, tokenizer, batch_size=lat["batch_size"], length=lat["max_length"])
    else:
        inputs = latency_batch(validation, tokenizer, batch_size=lat["batch_size"], max_length=lat["max_length"])
    reference = Reference(dense, validation, tokenizer, job.data.get("max_length", 64), inputs, lat["iters"])
    reference.check_names(list(job.objectives) + list(job.constraints), f"{job.path}: [search]")
    return Worker(job, dense, tokenizer, splits, reference)


def search(path, *, storage: str | None = None, workers: int = 1, trials: int | None = None, report_front: bool = True,
           progress: bool = True, worker_index: int = 0, stop_at: float | None = None, trial_estimate: float = 0.0, log=print) -> dict:
    """Run (or resume) the search of a job file until ``trials`` trials have completed; report the front.

    ``storage``: an Optuna RDB URL instead of the journal file beside the job. ``workers``:
    worker processes started here (1: this process runs the trials). ``stop_at`` (seconds since
    the epoch): start no trial that would not end by then, trials estimated from the finished
    ones (before any, ``trial_estimate`` seconds). Returns the report
    (see :func:`graphprune.app.search.report.report`), or ``{}`` with ``report_front=False``.
    An RDB that cannot be reached, at the start or mid-search, raises :class:`StorageLost`
    (its finished trials are kept: the same call resumes the study once it is back).
    """
    job = read_search_job(path)
    if trials is not None:
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise ValueError(f"search: trials = {trials!r} is not allowed; expected an integer >= 1")
        job = replace(job, trials=trials)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"search: workers = {workers!r} is not allowed; expected an integer >= 1")
    url = storage or job.storage
    with storage_errors(url, opening=True):
        store = open_storage(job, storage)
        study = open_study(job, store, worker_index)
    with storage_errors(url):
        if workers > 1:
            _run_workers(job, path, storage, workers, trials, log)
            worker = _setup(job) if report_front else None
        else:
            worker = _setup(job)
            bar = tqdm(total=job.trials, initial=completed(study), desc="search", unit="trial", disable=not progress)
            gate = None if stop_at is None else deadline_gate(stop_at, trial_estimate)  # a compress run's time budget
            with bar:
                worker.work(study, store, progress=bar, log=log, may_start=gate)
        if not report_front:
            return {}
        fail_dead_trials(study)
        return report(job, study, worker, log=log)


def _run_workers(job: SearchJob, path, storage, workers: int, trials, log) -> None:
    """N worker processes on this study; a worker that dies leaves its trial failed and the others go on."""
    command = [sys.executable, "-m", "graphprune", "search", str(path), "--worker-only", "--no-progress"]
    command += ["--storage", storage] if storage else []
    command += ["--trials", str(trials)] if trials else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))}
    procs = [subprocess.Popen(command + ["--worker-index", str(i)], env=env) for i in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        log(f"search: {sum(1 for c in codes if c)} of {workers} workers exited with an error (codes {codes}); their running trials are failed")
