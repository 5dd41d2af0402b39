"""Every benchmark's ``--smoke`` run: its results JSON lands in the ``--out`` folder, with its keys and its claims.

Each script's ``main`` is called in this process with an argv list (a fresh interpreter
per script would cost seconds of imports each). The smoke runs use a tiny BERT built in
code, so the numbers mean nothing and none is checked: what is checked is that the
script ran its code end to end, wrote what its full run writes (the keys the results
pages read) plus the claims under one common key, and left ``bench/results`` untouched.
Scripts whose smoke run takes more than seconds (they export artefacts checked in a
fresh process, or run ``graphprune compress``/``search`` through job files) run only
with ``GRAPHPRUNE_BENCH_SMOKE=1``, as ``tests/test_bench_tasks.py`` does.
"""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
SLOW = os.environ.get("GRAPHPRUNE_BENCH_SMOKE") != "1"
COMMON = {"machine", "claims", "smoke"}

# script -> (extra argv, results file, keys the full run's JSON has, slow)
CASES = {
    "trace_bench": ([], "trace.json", {"model", "params", "trace_vs_export", "graph_vs_eager", "reload_bit_identical"}, False),
    "unstructured": ([], "unstructured.json", {"dense_accuracy", "one_shot", "recovery", "costs", "targets", "seconds"}, False),
    "structured": ([], "structured.json", {"dense_accuracy", "rows", "bert_base", "targets", "seconds"}, False),
    "quantize": ([], "quantize.json", {"dense_accuracy", "rows", "time_breakdown_ms_b8", "targets", "search"}, False),
    "mixed_precision": ([], "mixed_precision.json", {"dense", "sensitivity", "rows", "target"}, False),
    "split_gap": (["--flops", "0.5"], "split_gap.json", {"rows", "resamples"}, False),
    "gpu_check": ([], "gpu_check_cpu.json", {"versions", "device", "rows", "passed"}, False),
    "learned": ([], "learned.json", {"dense", "methods", "rows", "complete", "targets"}, True),
    "l0_recipe": ([], "l0_recipe.json", {"dense", "epochs", "target", "rows"}, True),
    "onnx_static": ([], "onnx_static.json", {"rows"}, True),
    "int8_isa": ([], "int8_isa.json", {"runs", "kernel_rms_vs_int32_accumulation", "targets", "seconds"}, False),
    "deploy": ([], "deploy.json", {"test_examples", "recovery_steps", "dense_accuracy", "shapes", "rows", "targets", "seconds"}, True),
    "search": ([], "search.json", {"dense_test", "dense_validation", "job", "hand_picked", "front", "best", "trials", "target",
                                   "mixed_precision", "seconds"}, True),
    "compress": ([], "compress.json", {"budget", "runs", "targets", "seconds"}, True),
}
# bench/tasks.py keeps a smoke run of its own (MiniLM on tiny subsets of the real data, a cache folder set in the
# environment): tests/test_bench_tasks.py runs it in a fresh interpreter


def snapshot() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()} if RESULTS.exists() else {}


@pytest.fixture(scope="module")
def bench_path():
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("script", sorted(CASES))
def test_smoke_run_writes_its_results_and_claims(script, tmp_path, bench_path):
    argv, name, keys, slow = CASES[script]
    if slow and SLOW:
        pytest.skip("this smoke run takes tens of seconds (artefact exports checked in fresh processes): GRAPHPRUNE_BENCH_SMOKE=1 runs it")
    before = snapshot()
    out = tmp_path / "out"
    code = importlib.import_module(script).main(["--smoke", "--out", str(out), *argv])
    assert code in (None, 0), f"{script} exited {code}"
    results = json.loads((out / name).read_text())
    assert results["smoke"] is True
    assert (keys | COMMON) <= set(results), sorted((keys | COMMON) - set(results))
    assert results["claims"], f"{script} recorded no claim"
    for claim in results["claims"]:
        assert set(claim) >= {"name", "value", "target", "met"} and isinstance(claim["met"], bool), claim
    assert snapshot() == before, "a smoke run wrote into bench/results"


def test_smoke_refuses_bench_results(bench_path):
    common = importlib.import_module("common")
    with pytest.raises(SystemExit, match="another --out"):
        common.Bench(common.arguments("x").parse_args(["--smoke", "--out", str(RESULTS)]), announce=False)


def test_claim_words_and_record(bench_path, capsys, tmp_path):
    common = importlib.import_module("common")
    bench = common.Bench(common.arguments("x").parse_args(["--smoke", "--out", str(tmp_path)]), announce=False)
    bench.claim("speedup", 3.1, 3, unit="x", words="speed-up within 1 point")
    bench.claim("drop", 1.5, 1.0, at_most=True)
    bench.claim("missing", None, 2.0)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["speed-up within 1 point: 3.10x, claim >= 3x: met", "drop: 1.5, claim <= 1: not met", "missing: not measured, claim >= 2: not met"]
    assert [(c["name"], c["met"]) for c in bench.claims] == [("speedup", True), ("drop", False), ("missing", False)]
