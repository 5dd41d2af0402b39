"""graphprune search on a real PostgreSQL (a server of the test's own, tests/postgres.py): workers sharing a study,
a killed worker found by its heartbeats, and a server that stops mid-study (a clear error, then a resumed study)."""

import os
import signal
import subprocess
import sys
import time

import pytest

import graphprune
from graphprune.app.search.job import read_search_job
from graphprune.app.search.study import open_storage, optuna

from ..postgres import PostgresServer
from .test_search import WORKER_HOOK, checkpoint, needs_rt, write_job  # noqa: F401 (checkpoint: the tiny model, a fixture)

pytestmark = needs_rt


@pytest.fixture(scope="module")
def postgres():
    """One server for the module; each test makes its own database."""
    server = PostgresServer.start_new()
    yield server
    server.remove()


def trials_in(store, job):
    """The study's trials, or [] before a worker has created it (one storage object, polled)."""
    try:
        return optuna().load_study(study_name=job.study, storage=store).get_trials(deepcopy=False)
    except KeyError:
        return []


def wait_for(condition, what, worker=None, timeout=120):
    """Poll until ``condition()``; fail with ``what`` (and the worker's stderr if it exited first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if worker is not None and worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}) before {what}:\n{worker.stderr.read()[-2000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting until {what}")


def test_two_workers_on_postgres_run_each_trial_once(tmp_path, checkpoint, postgres, monkeypatch):
    url = postgres.database("two_workers")
    hook = tmp_path / "hook"  # both workers hold their first trial until both have claimed one (test_search.py's hook)
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WORKER_HOOK.format(folder=str(hook)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    path = write_job(tmp_path, checkpoint, search='trials = 4\nsampler = "random"')
    graphprune.search(path, storage=url, workers=2, report_front=False, progress=False, log=lambda *a: None)
    job = read_search_job(path)
    trials = trials_in(open_storage(job, url), job)
    complete = sorted(t.number for t in trials if t.state.name == "COMPLETE")
    assert len(complete) == 4, [(t.number, t.state.name, t.user_attrs) for t in trials]
    # a trial either ran (once) or was a surplus claim, failed before it ran: no claim ran twice or was lost
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name != "COMPLETE")
    runs = [line.split() for line in (hook / "trials.log").read_text().splitlines()]
    assert sorted(int(number) for _, number, _ in runs) == complete
    pids = {int(pid) for pid, _, _ in runs}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {int(t.user_attrs["worker"].rpartition(":")[2]) for t in trials if t.state.name == "COMPLETE"} == pids


def test_on_postgres_a_killed_workers_trial_is_failed_by_its_stale_heartbeat(tmp_path, checkpoint, postgres, monkeypatch):
    """As on another machine: the worker's pid cannot be checked, so only its heartbeats tell it is gone."""
    from graphprune.app.search import study as study_module

    url = postgres.database("killed_worker")
    slow = "[finetune]\nbatch_size = 2\nmax_steps = 100000"
    path = write_job(tmp_path, checkpoint, search='trials = 1\nsampler = "random"', finetune=slow)
    job = read_search_job(path)
    store = open_storage(job, url)
    command = [sys.executable, "-m", "graphprune", "search", str(path), "--worker-only", "--no-progress", "--storage", url]
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # claimed: its first heartbeat is recorded before its worker attribute
        wait_for(lambda: any(t.state.name == "RUNNING" and "worker" in t.user_attrs for t in trials_in(store, job)),
                 "it claimed a trial", worker)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        worker.stderr.close()
    monkeypatch.setattr(study_module, "_alive", lambda pid: True)  # the pid check would catch it first on this machine
    monkeypatch.setattr(study_module, "GRACE_S", 2)  # instead of waiting the default 30 s
    time.sleep(3)
    write_job(tmp_path, checkpoint, search='trials = 1\nsampler = "random"', finetune=slow.replace("100000", "1"))
    result = graphprune.search(path, storage=url, report_front=False, progress=False, log=lambda *a: None)
    assert result == {}
    states = [t.state.name for t in trials_in(store, job)]
    assert states == ["FAIL", "COMPLETE"]


# Loaded by the search process through PYTHONPATH: heartbeats every second, a trial taken as lost after 4 s without
# one (instead of 10 and 30), and trials from number 1 on held (as a long fine-tune would be) until interrupted.
HOLD_HOOK = """
import os, sys, time
if "search" in sys.argv:
    sys.path.insert(0, os.getcwd())
    from graphprune.app.search import study
    study.HEARTBEAT_S, study.GRACE_S = 1, 4
    original = study.Worker.objective

    def objective(self, trial):
        deadline = time.monotonic() + 240
        while trial.number >= 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        return original(self, trial)

    study.Worker.objective = objective
"""


@pytest.mark.skipif(os.environ.get("PYTEST_XDIST_WORKER") is not None,
                    reason="beside the rest of make test on 2 cores the search exceeded 240 s twice (cause not found); .ci/run runs it alone")
def test_a_postgres_server_stopped_mid_study_is_a_clear_error_and_the_study_resumes(tmp_path, checkpoint, postgres):
    url = postgres.database("stopped", password="hunter2")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_HOOK)
    path = write_job(tmp_path, checkpoint, search='trials = 3\nsampler = "random"')
    job = read_search_job(path)
    store = open_storage(job, url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "graphprune", "search", str(path), "--storage", url, "--no-progress"]
    search = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [t.state.name for t in trials_in(store, job)] == ["COMPLETE", "RUNNING"], "trial 0 completed and 1 ran", search)
        first = trials_in(store, job)[0]
        postgres.stop()
        stopped = time.monotonic()
        # about 15 s on an idle machine; once, beside the rest of `make test -n 2` on 2 cores, over 90 s (cause not found
        # yet): the bound here is what the suite can hold, the minute is checked where the machine is quiet
        _, errors = search.communicate(timeout=240)
        seconds = time.monotonic() - stopped
    finally:
        if search.poll() is None:
            search.kill()
            search.communicate()
        postgres.start()
    assert search.returncode != 0 and seconds < 200, (search.returncode, seconds, errors[-2000:])
    line = errors.strip().splitlines()[-1]
    assert line.startswith(f"graphprune: error: search: lost the study's storage {postgres.dialect}://graphprune:***@127.0.0.1:"), errors[-2000:]
    assert "rerun the same command" in line and "hunter2" not in errors and "Traceback" not in errors, errors[-2000:]
    # the server is back: the same search resumes; trial 1's worker is gone, so that trial is failed and not counted
    result = graphprune.search(path, storage=url, progress=False, log=lambda *a: None)
    trials = trials_in(open_storage(job, url), job)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].values == first.values and trials[0].params == first.params
    assert result["completed"] == 3 and result["failed"] == 1
