"""Deployment: every runtime a compressed MiniLM can ship in, side by side, on the whole test split.

One run on the cached fine-tuned baseline (built on first use). Models: the dense
graph and K-prune at 0.5, 0.4 and 0.3 of the FLOPs, each after the same distilled
recovery (``RECOVERY_STEPS``). Runtimes for each: torch eager fp32, torch compiled
fp32, graphprune ``lower`` int8 (torch.compile), AOTInductor fp32 and int8 (the
lowered graph), ONNX Runtime fp32 (transformer optimizer where it is correct), ONNX
Runtime int8 dynamic and static. Every artefact is exported with ``graph.export``
(which checks it in a fresh process) and run here in its own runtime.

Per row: test accuracy, whether its predictions equal its fp32 source's, file size,
latency at batch 8 x 128 and batch 1 x 64 (all runtimes of a model interleaved with
the two references, medians), ratios to dense torch fp32 eager and to dense ONNX
Runtime int8 (the peer), export time. The CPU and its flags first. Writes
``bench/results/deploy.json`` and ``bench/results/deploy.png`` (accuracy against
measured speed-up, the Pareto front marked).

Run: ``python bench/deploy.py [--quick] [--smoke] [--out DIR]`` (``--quick``: one budget,
300 test snippets, few steps; ``--smoke``: the tiny BERT, one budget, torch eager, ``lower``
int8 and ONNX Runtime int8 dynamic only, seconds; neither gives the benchmark's numbers).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import graphprune
from graphprune.app.export import load_artefact
from graphprune.ir.runtime import compile_module
from graphprune.training.batches import make_batches
from graphprune.training.timing import time_interleaved
from common import Bench, arguments, log, machine_line, save_figure, table  # bench/common.py

BUDGETS = (0.5, 0.4, 0.3)
RECOVERY_STEPS = 60
SHAPES = {"b8x128": (8, 128), "b1x64": (1, 64)}
RUNTIMES = ("torch eager fp32", "torch compiled fp32", "lower int8", "aoti fp32", "aoti int8", "ort fp32", "ort int8 dynamic", "ort int8 static")
# a smoke run's runtimes: the compiled and AOTInductor ones spend tens of seconds in inductor even on the tiny BERT,
# and each further ONNX export is checked in a fresh process
SMOKE_RUNTIMES = ("torch eager fp32", "lower int8", "ort int8 dynamic")
PEER = ("dense", "ort int8 dynamic")
REFERENCE = ("dense", "torch eager fp32")


def shape_inputs(test, tokenizer) -> dict[str, dict]:
    inputs = {}
    for name, (rows, length) in SHAPES.items():
        texts = [test.texts[i] for i in range(rows)]
        inputs[name] = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))
    return inputs


def graph_runner(graph):
    return lambda given: graph.module(**{k: torch.as_tensor(v) for k, v in given.items()}).logits.numpy()


def artefact_runner(folder):
    artefact = load_artefact(folder, threads=torch.get_num_threads())
    return lambda given: artefact({k: np.asarray(v) for k, v in given.items() if k in artefact.inputs})["logits"]


@torch.no_grad()
def predictions(run, batches) -> np.ndarray:
    return np.concatenate([run({k: v for k, v in b.items() if k != "labels"}).argmax(-1) for b in batches])


def runtimes_of(model: str, graph, calibration, folder: Path, wanted=RUNTIMES, lower: dict | None = None) -> dict:
    """Each runtime of one model (those ``wanted``): ``{name: (runner, file bytes, export seconds)}``."""
    found = {"torch eager fp32": (graph_runner(graph), None, 0.0)}
    if "torch compiled fp32" in wanted:
        compiled = graph.copy(share_tensors=True)
        compile_module(compiled.module, freezing=False, no_grad=True)
        found["torch compiled fp32"] = (graph_runner(compiled), None, 0.0)
    started = time.perf_counter()
    lowered, info = graphprune.run_pass(graph, "lower", {"precision": "int8", **(lower or {})}, data=calibration)
    found["lower int8"] = (graph_runner(lowered), info["weight_bytes"], time.perf_counter() - started)
    exports = {
        "aoti fp32": (graph, {"format": "aoti"}),
        "aoti int8": (lowered, {"format": "aoti"}),
        "ort fp32": (graph, {"format": "onnx"}),
        "ort int8 dynamic": (graph, {"format": "onnx", "quantize": "dynamic"}),
        "ort int8 static": (graph, {"format": "onnx", "quantize": "static", "data": calibration}),
    }
    for name, (source, options) in exports.items():
        if name not in wanted:
            continue
        target = folder / f"{model}-{name.replace(' ', '-')}"
        manifest = source.export(target, **options)
        note = (manifest.get("optimizer") or {}).get("reason") or ""
        log(f"  {model} {name}: exported in {manifest['export_seconds']} s, {manifest['model_bytes'] / 1e6:.1f} MB, "
            f"check max abs diff {manifest['verification']['max_abs_diff']:.3g} {note}")
        found[name] = (artefact_runner(target), manifest["model_bytes"], manifest["export_seconds"])
    return found


def measure(model: str, graph, runtimes: dict, batches, labels, inputs, references: dict, iters: dict) -> list[dict]:
    rows, preds = [], {}
    for name, (run, size, seconds) in runtimes.items():
        preds[name] = predictions(run, batches)
        rows.append({"model": model, "runtime": name, "accuracy": float((preds[name] == labels).mean()),
                     "size_mb": None if size is None else size / 1e6, "export_s": round(seconds, 1),
                     "params_m": graphprune.count_parameters(graph)[0] / 1e6})
        if name.endswith("fp32") and name != "torch eager fp32":
            rows[-1]["same_predictions"] = bool((preds[name] == preds["torch eager fp32"]).all())
    for shape, given in inputs.items():
        calls = {name: (lambda run=run, given=given: run(given)) for name, (run, *_rest) in runtimes.items()}
        if model != REFERENCE[0]:  # the dense model's own rows are the references
            calls.update({f"ref:{key}": (lambda run=run, given=given: run(given)) for key, run in references.items()})
        with torch.no_grad():
            ms = time_interleaved(calls, iters=iters[shape], warmup=3)
        eager, peer = (ms[REFERENCE[1]], ms[PEER[1]]) if model == REFERENCE[0] else (ms["ref:eager"], ms["ref:peer"])
        for row in rows:
            row[f"ms_{shape}"] = ms[row["runtime"]]
            row[f"vs_eager_{shape}"] = eager / ms[row["runtime"]]
            row[f"vs_peer_{shape}"] = peer / ms[row["runtime"]]
    return rows


def pareto(rows: list[dict], key: str) -> list[dict]:
    ordered = sorted(rows, key=lambda r: (-r[key], -r["accuracy"]))
    front, best = [], -1.0
    for row in ordered:
        if row["accuracy"] > best:
            front.append(row)
            best = row["accuracy"]
    return front


def plot(rows: list[dict], path: Path, dense_accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = dict(zip(RUNTIMES, "os^vD<>p"))
    for ax, shape in zip(axes, SHAPES):
        key = f"vs_eager_{shape}"
        for runtime in RUNTIMES:
            points = [(r[key], r["accuracy"]) for r in rows if r["runtime"] == runtime]
            if not points:  # a runtime a smoke run leaves out
                continue
            ax.scatter(*zip(*points), marker=markers[runtime], label=runtime, s=36)
        front = sorted((r[key], r["accuracy"]) for r in pareto(rows, key))
        ax.plot(*zip(*front), color="black", linewidth=1, linestyle="--", label="Pareto front")
        ax.axhline(dense_accuracy, color="grey", linewidth=1, linestyle=":", label="dense fp32")
        ax.axhline(dense_accuracy - 0.01, color="red", linewidth=1, linestyle=":", label="1 point below dense")
        ax.set_xscale("log")
        ax.set_xlabel(f"measured speed-up vs dense torch fp32 eager ({shape.replace('b', 'batch ').replace('x', ' x ')} tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (whole split)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle("MiniLM on Rotten Tomatoes: dense and K-prune (0.5, 0.4, 0.3 FLOPs) in every runtime")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, quick="a shorter run: one budget, 300 test snippets, 10 steps").parse_args(argv)
    bench = Bench(args)
    machine, base, tokenizer, splits = bench.machine, bench.baseline(), bench.tokenizer, bench.splits
    test = splits["test"].subset(300) if args.quick else splits["test"]
    calibration = bench.calibration()
    batches = list(make_batches(test, tokenizer, batch_size=64, max_length=64))
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    inputs = shape_inputs(splits["test"], tokenizer)
    budgets, steps = ((0.4,), bench.pick(10, 2)) if args.quick or bench.smoke else (BUDGETS, RECOVERY_STEPS)
    samples = bench.pick({"num_samples": 1024}, {"num_samples": 32, "score_samples": 16, "reconstruct_samples": 32})
    wanted, iters = bench.pick(RUNTIMES, SMOKE_RUNTIMES), bench.pick({"b8x128": 15, "b1x64": 40}, {"b8x128": 2, "b1x64": 3})
    models = {"dense": base}
    for keep in budgets:
        pruned, info = graphprune.run_pass(base, "structured_search", {"method": "kprune", "flops": keep, "progress": False, **samples}, data=calibration)
        graphprune.finetune(pruned, splits["train"], tokenizer, teacher=base, max_steps=steps, learning_rate=5e-5, warmup_ratio=0.1, progress=False)
        models[f"kprune {keep}"] = pruned
        log(f"kprune {keep}: searched in {info['seconds']} s, FLOPs ratio {info['flops_ratio']:.3f}, recovered {steps} steps")
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphprune-deploy-") as tmp:
        dense_runtimes = runtimes_of("dense", base, calibration, Path(tmp), wanted, bench.lower_options)
        # every model's runtimes are timed interleaved with these two, so that each ratio is side by side
        references = {"eager": dense_runtimes[REFERENCE[1]][0], "peer": dense_runtimes[PEER[1]][0]}
        for model, graph in models.items():
            found = dense_runtimes if model == "dense" else runtimes_of(model, graph, calibration, Path(tmp), wanted, bench.lower_options)
            rows += measure(model, graph, found, batches, labels, inputs, references, iters)
            log(table([r for r in rows if r["model"] == model], ["model", "runtime", "accuracy", "size_mb", "ms_b8x128", "vs_eager_b8x128", "vs_peer_b8x128", "ms_b1x64", "vs_eager_b1x64", "vs_peer_b1x64"], digits=3))
    dense_accuracy = next(r["accuracy"] for r in rows if (r["model"], r["runtime"]) == REFERENCE)
    for row in rows:
        source = next(r for r in rows if r["model"] == row["model"] and r["runtime"] == "torch eager fp32")
        row["drop_vs_source_points"] = round((source["accuracy"] - row["accuracy"]) * 100, 2)
        row["drop_vs_dense_points"] = round((dense_accuracy - row["accuracy"]) * 100, 2)
    columns = ["model", "runtime", "accuracy", "drop_vs_dense_points", "size_mb", "ms_b8x128", "vs_eager_b8x128", "vs_peer_b8x128",
               "ms_b1x64", "vs_eager_b1x64", "vs_peer_b1x64", "export_s"]
    log(f"\n{machine_line(machine)}\nall runtimes, test split ({len(labels)} snippets); vs_eager / vs_peer: speed-up over dense torch fp32 eager / dense ONNX Runtime int8 dynamic")
    log(table(rows, columns, digits=3))
    targets = evaluate_targets(rows, dense_accuracy)
    for name, target in targets.items():
        lower = target.get("lower_is_better", False)
        bench.claim(name, target["value"], target["target"], at_most=lower, met=target["met"],
                    **({"artefact": target["artefact"]} if "artefact" in target else {}))
    results = {"machine": machine, "test_examples": int(len(labels)), "recovery_steps": steps, "dense_accuracy": dense_accuracy,
               "shapes": SHAPES, "rows": rows, "targets": targets, "seconds": round(bench.seconds())}
    suffix = "_quick" if args.quick else ""
    path = bench.write(f"deploy{suffix}.json", results)
    plot(rows, bench.out / f"deploy{suffix}.png", dense_accuracy)
    log(f"wrote {path} and .png ({results['seconds']} s)")


def evaluate_targets(rows: list[dict], dense_accuracy: float) -> dict:
    fp32 = [r for r in rows if "same_predictions" in r and r["runtime"] in ("aoti fp32", "ort fp32")]
    int8 = [r for r in rows if "int8" in r["runtime"] and r["runtime"] != "lower int8"]
    within = [r for r in rows if r["accuracy"] >= dense_accuracy - 0.01]
    fp32_file = next((r["size_mb"] for r in rows if (r["model"], r["runtime"]) == ("dense", "ort fp32")), None)  # None: not run (--smoke)
    targets = {
        "fp32_artefacts_identical_predictions": {"value": sum(r["same_predictions"] for r in fp32), "target": len(fp32)},
        "int8_artefacts_worst_drop_vs_fp32_source_points": {"value": max(r["drop_vs_source_points"] for r in int8), "target": 0.5, "lower_is_better": True},
        "int8_onnx_file_share_of_fp32": {"value": fp32_file and round(next(r["size_mb"] for r in rows if (r["model"], r["runtime"]) == PEER) / fp32_file, 3),
                                         "target": 0.30, "lower_is_better": True},
    }
    for shape in SHAPES:
        fastest = max(within, key=lambda r: r[f"vs_eager_{shape}"])
        label = f"{fastest['model']} / {fastest['runtime']}"
        targets[f"fastest_within_1pt_vs_eager_{shape}"] = {"value": round(fastest[f"vs_eager_{shape}"], 2), "target": 4.0, "artefact": label}
        targets[f"fastest_within_1pt_vs_ort_int8_{shape}"] = {"value": round(fastest[f"vs_peer_{shape}"], 2), "target": 2.0, "artefact": label}
    for target in targets.values():
        value = target["value"]
        better = value is not None and (value <= target["target"] if target.get("lower_is_better") else value >= target["target"])
        target["met"] = bool(better)
    return targets


if __name__ == "__main__":
    main()
