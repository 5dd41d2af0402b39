"""``graphprune search`` against the hand-picked pipelines of the other benchmarks, MiniLM baseline, this machine.

One run on the cached fine-tuned baseline:

1. the hand-picked pipelines, rebuilt here: ``bench/structured.py``'s fastest K-prune
   within a point (FLOPs 0.3, eager), ``bench/quantize.py``'s int8 points (dense int8,
   K-prune 0.5 + int8), ``bench/deploy.py``'s K-prune 0.3 + int8, and the demo's
   pipeline (K-prune 0.3, a 60-step distilled recovery, int8);
2. a search (TPE, fixed seed) over K-prune's FLOPs budget, an optional unstructured
   Wanda sparsity, an optional distilled recovery (steps as a choice) and whether and
   how to lower to int8 (static or dynamic activations); objectives validation accuracy
   and measured latency (interleaved with the dense graph), at most 1 point lost on
   the validation split; its front re-run on the test split;
3. the search's best pipeline under its (validation) constraint against the fastest
   hand-picked pipeline within 1 point on the test split, timed side by side.

Every latency is batch 8 of real snippets (padded to their longest, at most 128 tokens),
median of interleaved calls. Prints the tables and the target (the search's best within
1 point on the test split at least 15% faster than the best hand-picked one within the
same point), writes ``bench/results/search.json``, ``search.png`` (test accuracy against
speed-up: the front and the hand-picked points) and ``search_pareto.png`` (Optuna's plot,
validation split). Mixed precision against uniform widths is ``bench/mixed_precision.py``.

Run: ``python bench/search.py [--trials 16] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import graphprune
from graphprune.infra.pipeline import run_pass
from graphprune.ir.masks import commit_masks
from graphprune.training.baseline import load_baseline
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import load_rotten_tomatoes
from graphprune.training.models import load_minilm, load_tokenizer
from graphprune.training.timing import compare_latency, time_interleaved
from graphprune.app.workflow import latency_batch
from report import machine as describe_machine, machine_line, save_figure, table, write_json  # bench/report.py

RESULTS = Path(__file__).resolve().parent / "results"
RECOVERY = {"learning_rate": 5e-5, "warmup_ratio": 0.1}  # the demo's recovery


def log(*args):
    print(*args, flush=True)


def job_text(trials: int, quick: bool) -> str:
    samples = "num_samples = 64\nscore_samples = 32\nreconstruct_samples = 64\n" if quick else ""
    return f"""
[model]
name = "{'minilm' if quick else 'baseline'}"

[data]
name = "rotten_tomatoes"
{'eval_limit = 64' if quick else ''}
{'test_limit = 64' if quick else ''}
max_length = 64

[search]
trials = {trials}
sampler = "tpe"
seed = 0
objectives = ["accuracy", "latency"]
constraints = {{ accuracy_drop = {50.0 if quick else 1.0} }}
latency = {{ batch_size = 8, max_length = 128, iters = {3 if quick else 10} }}
cache_size = 6

[[passes]]
name = "structured_search"
method = "kprune"
flops = {{ choice = [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5] }}
progress = false
{samples}
[[passes]]
name = "prune_weight"
optional = true
method = "wanda"
sparsity = {{ range = [0.1, 0.5], step = 0.1 }}
{'num_samples = 32' if quick else ''}

[[passes]]
name = "lower"
optional = true
activations = {{ choice = ["static", "dynamic"] }}

[finetune]
distill = true
max_steps = {{ choice = {[0, 2] if quick else [0, 60, 120]} }}
learning_rate = {RECOVERY['learning_rate']}
warmup_ratio = {RECOVERY['warmup_ratio']}
"""


def hand_picked(base, splits, tokenizer, quick: bool) -> dict:
    """The benchmarks' own pipelines: name -> graph."""
    calibration = CalibrationData(splits["train"], tokenizer)
    small = {"num_samples": 64, "score_samples": 32, "reconstruct_samples": 64} if quick else {}
    graphs = {}

    def kprune(flops):
        began = time.perf_counter()
        graph, _ = run_pass(base, "structured_search", {"method": "kprune", "flops": flops, "progress": False, **small}, data=calibration)
        log(f"  K-prune {flops}: {time.perf_counter() - began:.0f} s")
        return graph

    def lowered(graph):
        return run_pass(graph, "lower", {"precision": "int8"}, data=calibration)[0]

    k3, k5 = kprune(0.3), kprune(0.5)
    graphs["K-prune 0.3 (structured.py)"] = k3
    graphs["int8 static (quantize.py)"] = lowered(base)
    graphs["K-prune 0.5 + int8 (quantize.py)"] = lowered(k5)
    graphs["K-prune 0.3 + int8 (deploy.py)"] = lowered(k3)
    demo = k3.copy()
    graphprune.finetune(demo, splits["train"], tokenizer, teacher=base, max_steps=2 if quick else 60, progress=False, **RECOVERY)
    commit_masks(demo)
    graphs["demo: K-prune 0.3 + 60-step recovery + int8"] = lowered(demo)
    return graphs


def plot(hand_rows: list[dict], front: list[dict], dense_test: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["speedup"] for r in hand_rows], [r["test_accuracy"] for r in hand_rows], marker="s", color="tab:gray", label="hand-picked (benchmarks)")
    for r in hand_rows:
        ax.annotate(r["pipeline"].split(" (")[0].split(":")[0], (r["speedup"], r["test_accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([m["speedup"] for m in front], [m["test_accuracy"] for m in front], color="tab:red", label="search front (re-run on test)")
    ax.axhline(dense_test, color="k", lw=0.8, label="dense")
    ax.axhline(dense_test - 0.01, color="k", lw=0.8, ls="--", label="1 point below dense")
    ax.set_xlabel("speed-up over dense fp32 eager (batch 8, measured)")
    ax.set_ylabel("test accuracy")
    ax.set_title("graphprune search vs hand-picked pipelines, MiniLM on Rotten Tomatoes")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run (MiniLM with an untrained head, small samples); its numbers are not the benchmark's")
    args = parser.parse_args()
    start = time.perf_counter()
    machine = describe_machine()
    log(machine_line(machine))
    tokenizer = load_tokenizer("minilm")
    base = graphprune.trace(load_minilm(num_labels=2)[0]) if args.quick else load_baseline()
    splits = load_rotten_tomatoes()
    test = splits["test"].subset(64) if args.quick else splits["test"]
    inputs = latency_batch(splits["validation"], tokenizer, batch_size=8, max_length=128)  # the search's latency batch

    def accuracy(graph) -> float:
        return graphprune.evaluate(graph, test, tokenizer, progress=False)["accuracy"]

    dense_test = accuracy(base)
    log(f"dense baseline: test {dense_test:.4f}\n\n1. hand-picked pipelines")
    began = time.perf_counter()
    graphs = hand_picked(base, splits, tokenizer, args.quick)
    hand_rows = []
    with torch.no_grad():
        for name, graph in graphs.items():
            ratio = compare_latency(graph.module, base.module, inputs, iters=3 if args.quick else 10)["ratio"]
            row = {"pipeline": name, "test_accuracy": accuracy(graph), "latency": ratio, "speedup": 1 / ratio}
            row["drop_points"] = round((dense_test - row["test_accuracy"]) * 100, 2)
            hand_rows.append(row)
            log(f"  {name}: test {row['test_accuracy']:.4f}, {row['speedup']:.2f}x")
    hand_seconds = time.perf_counter() - began

    log(f"\n2. the search ({args.trials} trials)")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "search.toml"
        job.write_text(job_text(args.trials, args.quick))
        result = graphprune.search(job, progress=True)
        search_seconds = time.perf_counter() - began
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "_quick" if args.quick else ""
        if (result["output"] / "pareto.png").exists():
            shutil.copyfile(result["output"] / "pareto.png", RESULTS / f"search_pareto{suffix}.png")
        best = next((m for m in result["front"] if m["trial"] == result["best"]), None)
        best_graph = graphprune.load(result["output"] / "best") if best is not None else None
        job_spec = job.read_text()
    front = [{**m, "speedup": 1 / m.get("latency_rerun", m["latency"])} for m in result["front"]]

    log("\n3. the search's best (chosen on validation) against the fastest hand-picked pipeline within 1 point on test")
    within = [r for r in hand_rows if r["drop_points"] <= 1.0]
    peer = max(within, key=lambda r: r["speedup"]) if within else None
    target = {"met": False}
    if best is not None and peer is not None:
        with torch.no_grad():
            runs = {"search best": lambda: best_graph.module(**inputs), peer["pipeline"]: lambda: graphs[peer["pipeline"]].module(**inputs),
                    "dense": lambda: base.module(**inputs)}
            ms = time_interleaved(runs, iters=5 if args.quick else 30)
        best_drop = round((dense_test - best["test_accuracy"]) * 100, 2)
        target = {"search_best": best["pipeline"], "search_best_test_accuracy": best["test_accuracy"], "search_best_drop_points": best_drop,
                  "peer": peer["pipeline"], "peer_test_accuracy": peer["test_accuracy"], "peer_drop_points": peer["drop_points"],
                  "ms": {k: round(v, 3) for k, v in ms.items()}, "faster_than_peer": ms[peer["pipeline"]] / ms["search best"],
                  "search_best_speedup": ms["dense"] / ms["search best"], "peer_speedup": ms["dense"] / ms[peer["pipeline"]]}
        target["met"] = best_drop <= 1.0 and target["faster_than_peer"] >= 1.15
        log(f"  search best: {best['pipeline']}: test {best['test_accuracy']:.4f} ({best_drop:+.2f} pts), {target['search_best_speedup']:.2f}x dense")
        log(f"  hand-picked: {peer['pipeline']}: test {peer['test_accuracy']:.4f} ({peer['drop_points']:+.2f} pts), {target['peer_speedup']:.2f}x dense")

    log(f"\nHand-picked pipelines, MiniLM on Rotten Tomatoes, test split (dense {dense_test:.4f}); speed-up over dense eager fp32, batch 8")
    log(table(hand_rows, ["pipeline", "test_accuracy", "drop_points", "speedup"], digits=4))
    log(f"\nSearch front ({result['completed']} trials, {result['failed']} failed; prefix cache {result['cache']}), validation then test")
    log(table(front, ["trial", "pipeline", "val_accuracy", "accuracy_drop", "test_accuracy", "latency", "latency_rerun", "speedup"], digits=4))
    if best is None or peer is None:
        log("\nTarget: not measured (" + ("no search trial met the constraint" if best is None else "no hand-picked pipeline within 1 point") + ")")
    else:
        log(f"\nTarget: the search's best within 1 point on test at least 15% faster than the best hand-picked within 1 point: "
            f"{target['search_best_drop_points']:+.2f} pts, {target['faster_than_peer']:.3f}x the hand-picked: {'met' if target['met'] else 'NOT met'}")
    seconds = time.perf_counter() - start
    log(f"Whole benchmark {seconds / 60:.1f} min (hand-picked {hand_seconds:.0f} s, search and its test re-run {search_seconds:.0f} s); "
        f"target under 60 min: {'met' if seconds <= 3600 else 'NOT met'}")
    suffix = "_quick" if args.quick else ""
    plot(hand_rows, front, dense_test, RESULTS / f"search{suffix}.png")
    write_json(RESULTS / f"search{suffix}.json", {
        "machine": machine, "dense_test": dense_test, "job": job_spec, "hand_picked": hand_rows,
        "front": [{k: v for k, v in m.items() if k != "run_file"} for m in front], "best": result["best"],
        "trials": result["trials"], "cache": result["cache"], "target": target,
        "seconds": {"hand_picked": round(hand_seconds, 1), "search": round(search_seconds, 1), "total": round(seconds, 1)}})
    log(f"wrote {RESULTS / f'search{suffix}.json'} and search{suffix}.png")


if __name__ == "__main__":
    main()
