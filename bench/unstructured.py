"""Unstructured pruning on the fine-tuned MiniLM baseline: accuracy per method and sparsity, recovery, costs.

One run, on the cached baseline (built on first use, about 14 minutes), test split:

1. one-shot accuracy at weight sparsity 0.3, 0.5, 0.7, 0.9 for random, l1 (local and
   global), taylor, wanda and sparsegpt, element-wise, and 2:4 for l1, wanda and
   sparsegpt, with ``torch.nn.utils.prune`` L1 as a reference column and the time
   each pass took;
2. the best one-shot method at 0.7 and 0.9 followed by a distilled recovery
   fine-tune of at most one epoch, and gradual movement pruning to 0.9 over one
   epoch (distilled);
3. costs: forward latency after commit vs dense, activation pruning's latency cost,
   checkpoint bytes dense vs 50% sparse, and ``l1`` 50% pass time on a bert-base
   sized model built from a config.

Prints the tables, writes ``bench/results/unstructured.json`` and a PNG plot of
accuracy against sparsity per method (``bench/results/unstructured.png``).

Run: ``python bench/unstructured.py [--quick] [--smoke] [--out DIR]`` (``--quick``: fewer
test snippets and steps; ``--smoke``: the tiny BERT, seconds; neither gives the benchmark's numbers).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

import graphprune
from graphprune.app.workflow import latency_batch
from graphprune.ir.metadata import common
from graphprune.training.timing import compare_latency
from common import Bench, arguments, log, save_figure, table  # bench/common.py: this script runs from bench/

SPARSITIES = (0.3, 0.5, 0.7, 0.9)
METHODS = {
    "random": {"method": "random"},
    "l1 local": {"method": "l1"},
    "l1 global": {"method": "l1", "scope": "global"},
    "taylor": {"method": "taylor"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
}
N_M = {"l1 2:4": {"method": "l1", "granularity": "2:4"}, "wanda 2:4": {"method": "wanda", "granularity": "2:4"}, "sparsegpt 2:4": {"method": "sparsegpt", "granularity": "2:4"}}
ENCODER = ("query", "key", "value", "attention_output", "ffn_up", "ffn_down")


def torch_l1_reference(graph, sparsity: float):
    """torch.nn.utils.prune.l1_unstructured on every encoder Linear of a copy: the reference column."""
    ref, _ = graphprune.run_pass(graph, "init_metadata")  # roles; run_pass copies the graph
    for node in ref.nodes:
        if node.op == "call_module" and common(node).get("role") in ENCODER:
            prune.l1_unstructured(ref.module.get_submodule(node.target), "weight", amount=sparsity)
    return ref


def one_shot(base, test, tokenizer, calibration, quick: bool) -> list[dict]:
    rows = []
    for name, config in {**METHODS, **N_M}.items():
        sparsities = (0.5,) if name in N_M else SPARSITIES
        for sparsity in sparsities:
            full = {**config} if name in N_M else {**config, "sparsity": sparsity}
            start = time.perf_counter()
            pruned, info = graphprune.run_pass(base, "prune_weight", full, data=calibration)
            seconds = time.perf_counter() - start
            metrics = graphprune.evaluate(pruned, test, tokenizer, progress=False)
            rows.append({"method": name, "sparsity": sparsity, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                         "achieved": info["weight_sparsity"], "prune_seconds": round(seconds, 2)})
            log(f"  {name:14s} {sparsity:.1f}: accuracy {metrics['accuracy']:.4f}  ({seconds:.1f} s)")
    for sparsity in SPARSITIES:
        start = time.perf_counter()
        reference = torch_l1_reference(base, sparsity)
        seconds = time.perf_counter() - start
        metrics = graphprune.evaluate(reference, test, tokenizer, progress=False)
        rows.append({"method": "torch prune L1 (reference)", "sparsity": sparsity, "accuracy": metrics["accuracy"],
                     "loss": metrics["loss"], "achieved": sparsity, "prune_seconds": round(seconds, 2)})
        log(f"  torch L1 ref   {sparsity:.1f}: accuracy {metrics['accuracy']:.4f}")
    return rows


def recovery(base, splits, test, tokenizer, calibration, best: str, quick: bool) -> list[dict]:
    steps = 20 if quick else None  # None: one epoch
    options = dict(epochs=1.0, learning_rate=5e-5, warmup_ratio=0.1, progress=False, **({"max_steps": steps} if steps else {}))
    rows = []
    for sparsity in (0.7, 0.9):
        pruned, _ = graphprune.run_pass(base, "prune_weight", {**METHODS[best], "sparsity": sparsity}, data=calibration)
        before = graphprune.evaluate(pruned, test, tokenizer, progress=False)["accuracy"]
        start = time.perf_counter()
        result = graphprune.finetune(pruned, splits["train"], tokenizer, teacher=base, **options)
        after = graphprune.evaluate(pruned, test, tokenizer, progress=False)["accuracy"]
        rows.append({"method": f"{best} + recovery", "sparsity": sparsity, "accuracy_one_shot": before, "accuracy": after,
                     "steps": result.steps, "train_seconds": round(time.perf_counter() - start, 1)})
        log(f"  {best} {sparsity}: one-shot {before:.4f} -> after {result.steps} distilled steps {after:.4f}")
    # gradual movement pruning to 0.9 within one epoch, distilled from the dense graph
    graph = base.copy()
    total = steps or len(splits["train"]) // 32 + 1
    schedule = graphprune.GradualPruning("prune_weight", 0.0, 0.9, start_step=0, end_step=int(total * 0.8), every=max(1, total // 20),
                                         config={"method": "movement"})
    start = time.perf_counter()
    result = graphprune.finetune(graph, splits["train"], tokenizer, teacher=base, callbacks=[schedule], **options)
    after = graphprune.evaluate(graph, test, tokenizer, progress=False)["accuracy"]
    rows.append({"method": "movement (gradual)", "sparsity": 0.9, "accuracy_one_shot": None, "accuracy": after,
                 "steps": result.steps, "train_seconds": round(time.perf_counter() - start, 1)})
    log(f"  movement gradual 0.9 over {result.steps} steps: {after:.4f}")
    return rows


def costs(bench: Bench, base, test, tokenizer, calibration, best: str, quick: bool) -> dict:
    inputs = latency_batch(test, tokenizer)
    out = {}
    pruned, _ = graphprune.run_pass(base, "prune_weight", {**METHODS[best], "sparsity": 0.5}, data=calibration)
    masked = compare_latency(pruned.module, base.module, inputs, iters=10)
    committed, _ = graphprune.run_pass(pruned, "commit_masks")
    after = compare_latency(committed.module, base.module, inputs, iters=10)
    acts, _ = graphprune.run_pass(base, "prune_activation", {"sparsity": 0.5, "method": "l1"})
    act = compare_latency(acts.module, base.module, inputs, iters=10)
    out["latency"] = {"batch": list(inputs["input_ids"].shape), "dense_ms": after["reference_ms"],
                      "masked_vs_dense": masked["ratio"], "committed_vs_dense": after["ratio"], "activation_l1_50_vs_dense": act["ratio"]}
    with tempfile.TemporaryDirectory() as tmp:
        base_copy = base.copy()
        graphprune.commit_masks(base_copy)
        base_copy.save(Path(tmp) / "dense")
        committed.save(Path(tmp) / "sparse")
        dense_bytes = sum(f.stat().st_size for f in (Path(tmp) / "dense").iterdir())
        sparse_bytes = sum(f.stat().st_size for f in (Path(tmp) / "sparse").iterdir())
        again = graphprune.load(Path(tmp) / "sparse")
        with torch.no_grad():
            identical = torch.equal(again.module(**inputs).logits, committed.module(**inputs).logits)
    out["checkpoint"] = {"dense_bytes": dense_bytes, "sparse_50_bytes": sparse_bytes, "ratio": sparse_bytes / dense_bytes, "reload_identical": identical}
    # l1 50% pass time on a bert-base sized model (random weights, built from a config)
    bert = bench.large_graph()
    timing = {}
    for scope in ("local", "global"):
        in_place, functional = [], []
        for _ in range(1 if quick else 5):
            work = bert.copy()  # the pass itself, in place, as MASE's and Torch-Pruning's run
            start = time.perf_counter()
            graphprune.run_pass(work, "prune_weight", {"method": "l1", "sparsity": 0.5, "scope": scope}, inplace=True)
            in_place.append(time.perf_counter() - start)
            start = time.perf_counter()  # run_pass's default: on a copy, the input graph untouched
            graphprune.run_pass(bert, "prune_weight", {"method": "l1", "sparsity": 0.5, "scope": scope})
            functional.append(time.perf_counter() - start)
        timing[f"{scope}_seconds"] = statistics.median(in_place)
        timing[f"{scope}_with_copy_seconds"] = statistics.median(functional)
    out["bert_base_l1_50"] = {"params": sum(p.numel() for p in bert.module.parameters()), **timing}
    return out


def plot(rows: list[dict], dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["sparsity"], r["accuracy"]) for r in rows if r["method"] == method)
        if len(points) > 1:
            ax.plot(*zip(*points), marker="o", label=method)
        else:
            ax.scatter(*zip(*points), marker="s", label=method, zorder=3)
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("weight sparsity (encoder Linear layers)")
    ax.set_ylabel("test accuracy")
    ax.set_title("One-shot unstructured pruning, MiniLM on Rotten Tomatoes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, quick="a shorter run: 200 test snippets, few steps").parse_args(argv)
    bench = Bench(args)
    quick = args.quick or bench.smoke
    base, tokenizer, splits = bench.baseline(), bench.tokenizer, bench.splits
    test = splits["test"].subset(200) if args.quick else splits["test"]
    calibration = bench.calibration()
    dense = graphprune.evaluate(base, test, tokenizer, progress=False)["accuracy"]
    log(f"MiniLM baseline: test accuracy {dense:.4f} on {len(test)} snippets")

    log("\n1. one-shot pruning of the encoder's Linear weights")
    shot = one_shot(base, test, tokenizer, calibration, quick)
    for row in shot:
        row["drop_points"] = round((dense - row["accuracy"]) * 100, 2)
    candidates = [r for r in shot if r["sparsity"] == 0.7 and r["method"] in METHODS]
    best = max(candidates, key=lambda r: r["accuracy"])["method"]
    log(f"\nbest one-shot method at 0.7: {best}")

    log("\n2. recovery fine-tuning (at most one epoch, distilled from the dense graph)")
    rec = recovery(base, splits, test, tokenizer, calibration, best, quick)
    for row in rec:
        row["drop_points"] = round((dense - row["accuracy"]) * 100, 2)

    log("\n3. costs")
    cost = costs(bench, base, test, tokenizer, calibration, best, quick)

    wide = []
    for method in dict.fromkeys(r["method"] for r in shot):
        row = {"method": method}
        for r in shot:
            if r["method"] == method:
                row[f"acc@{r['sparsity']}"] = r["accuracy"]
        row["prune_s@0.5"] = next((r["prune_seconds"] for r in shot if r["method"] == method and r["sparsity"] == 0.5), None)
        wide.append(row)
    columns = ["method"] + [f"acc@{s}" for s in SPARSITIES] + ["prune_s@0.5"]
    log(f"\nOne-shot test accuracy (dense {dense:.4f}); 2:4 rows are at 0.5")
    log(table(wide, columns))
    log("\nRecovery (test accuracy)")
    log(table(rec, ["method", "sparsity", "accuracy_one_shot", "accuracy", "drop_points", "steps", "train_seconds"]))
    lat, ck, bb = cost["latency"], cost["checkpoint"], cost["bert_base_l1_50"]
    log("\nCosts")
    log(f"  forward, batch {lat['batch']}: dense {lat['dense_ms']:.1f} ms; masked (uncommitted) {lat['masked_vs_dense']:.3f}x; "
        f"committed {lat['committed_vs_dense']:.3f}x; activation l1 50% {lat['activation_l1_50_vs_dense']:.3f}x dense")
    log(f"  checkpoint: dense {ck['dense_bytes'] / 1e6:.1f} MB, 50% sparse {ck['sparse_50_bytes'] / 1e6:.1f} MB "
        f"({ck['ratio']:.3f}x; target <= 0.8x), reload bit-identical {ck['reload_identical']}")
    log(f"  bert-base ({bb['params'] / 1e6:.1f}M params) prune_weight l1 50%, in place: local {bb['local_seconds']:.2f} s, "
        f"global {bb['global_seconds']:.2f} s (target < 1 s; MASE: 10.4 s, global impossible above 2^24 weights); "
        f"on a copy (run_pass's default): {bb['local_with_copy_seconds']:.2f} s / {bb['global_with_copy_seconds']:.2f} s")
    best50 = max((r for r in shot if r["sparsity"] == 0.5 and r["method"] in METHODS), key=lambda r: r["accuracy"])
    rec70 = next(r for r in rec if r["sparsity"] == 0.7)
    targets = {
        "one_shot_50_drop_points": {"method": best50["method"], "value": round((dense - best50["accuracy"]) * 100, 2), "target": 0.5},
        "recovery_70_drop_points": {"method": rec70["method"], "value": round((dense - rec70["accuracy"]) * 100, 2), "target": 1.0},
        "checkpoint_ratio": {"value": round(ck["ratio"], 3), "target": 0.8},
        "bert_base_l1_seconds": {"value": round(bb["local_seconds"], 3), "target": 1.0},
    }
    log("\nClaims")
    bench.claim("one_shot_50_drop_points", targets["one_shot_50_drop_points"]["value"], 0.5, at_most=True,
                words=f"points lost by the best one-shot method at 50% ({best50['method']})")
    bench.claim("recovery_70_drop_points", targets["recovery_70_drop_points"]["value"], 1.0, at_most=True,
                words=f"points lost at 70% after recovery ({rec70['method']})")
    bench.claim("checkpoint_ratio", targets["checkpoint_ratio"]["value"], 0.8, at_most=True, unit="x",
                words="50% sparse checkpoint against dense")
    bench.claim("bert_base_l1_seconds", targets["bert_base_l1_seconds"]["value"], 1.0, at_most=True, unit=" s",
                words="prune_weight l1 50% on bert-base, in place")
    suffix = "_quick" if args.quick else ""
    plot(shot, dense, bench.out / f"unstructured{suffix}.png")
    results = {
        "machine": bench.machine,
        "test_examples": len(test), "dense_accuracy": dense, "one_shot": shot, "recovery": rec, "costs": cost, "targets": targets,
        "seconds": bench.seconds(),
    }
    path = bench.write(f"unstructured{suffix}.json", results)
    log(f"\nwrote {path} and {path.with_suffix('.png').name} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
