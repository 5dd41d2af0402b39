"""Quantization on the fine-tuned MiniLM baseline: simulated formats for accuracy, lowered int8/bf16 for speed.

One run, on the cached baseline (built on first use, about 14 minutes), test split:

1. fp32: accuracy; latency eager and compiled (inductor, freezing, dynamic shapes).
2. Simulated integer fixed point on every encoder Linear (``quantize``; weights per
   channel, frac widths fitted with ``"auto"`` from ``profile_statistics``; inputs 8-bit):
   8, 6 and 4-bit weights after PTQ, then after a short QAT (``--qat-steps`` distilled
   steps, under one epoch).
3. Other simulated formats, weights and inputs, PTQ (accuracy only): minifloat,
   block floating point, MX (mxint8, mxfp8 E4M3, mxfp4).
4. ``lower``: int8 static (calibrated) and dynamic, bf16 (where the CPU has it natively;
   otherwise the error is recorded and bf16 is measured emulated, marked so); K-prune at
   half the FLOPs then int8. Accuracy, and latency at batch 8 / seq 128 and batch 1 /
   seq 64 against fp32 eager and against fp32 compiled the same way (interleaved).

Prints the CPU and its int8/bf16 flags, the table, where fp32 compiled and int8 spend
their time (Linear kernels, attention, the rest) and the targets; writes
``bench/results/quantize.json`` and a PNG of accuracy against average weight bits.

Run: ``python bench/quantize.py [--quick] [--smoke] [--out DIR]`` (``--quick``: 300 test
snippets, few steps; ``--smoke``: the tiny BERT, uncompiled, seconds; neither gives the
benchmark's numbers).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import graphprune
from graphprune.training.timing import compare_latency
from common import Bench, arguments, log, save_figure, table  # bench/common.py: this script runs from bench/

QAT_STEPS = 100  # batch 32: a third of an epoch of the 10k training snippets
ENCODER_LINEARS = r"bert\.encoder\.layer\.\d+\..*\.(query|key|value|dense)"  # module paths; pooler and classifier stay float


def latency_inputs(test, tokenizer, batch: int, seq: int) -> dict:
    texts = [test.texts[i] for i in range(batch)]
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))


def integer_entry(weight_bits: int) -> dict:
    return {
        "name": "integer",
        "data_in_width": 8, "data_in_frac_width": "auto", "data_in_range": "percentile",
        "weight_width": weight_bits, "weight_frac_width": "auto", "weight_per_channel": True,
        "bias_width": 16, "bias_frac_width": "auto",
    }


FORMATS = {  # weights and Linear inputs in the same format, PTQ
    "minifloat e4m3": {"name": "minifloat_ieee", **{f"{p}_{k}": v for p in ("data_in", "weight", "bias") for k, v in (("width", 8), ("exponent_width", 4))}},
    "block_fp 8b/16": {"name": "block_fp", **{f"{p}_{k}": v for p in ("data_in", "weight", "bias") for k, v in (("width", 8), ("exponent_width", 8), ("block_size", 16))}},
    "mxint8": {"name": "mxint8"},
    "mxfp8 e4m3": {"name": "mxfp8_e4m3"},
    "mxfp4": {"name": "mxfp4"},
}


def simulate(base, profiled, entry: dict):
    """The encoder Linears (weights, inputs, biases) in ``entry``'s format; "auto" widths read the profile."""
    config = {"by": "regex", "default": {"config": {"name": None}}, ENCODER_LINEARS: {"config": entry}}
    graph = profiled if "auto" in entry.values() else base
    return graphprune.run_pass(graph, "quantize", config)[0]


def weight_bits(graph) -> float | None:
    """Average bits per encoder-layer weight (embeddings and the head stay fp32 and are left out)."""
    layers = (graph.meta.get("quantize") or {}).get("layers") or []
    weights = sum(r["weights"] for r in layers)
    return round(sum(r["weight_bits"] * r["weights"] for r in layers if r["weight_bits"]) / weights, 3) if weights else None


def timings(candidate, eager, compiled, lat8, lat1, iters: tuple[int, int] = (10, 30)) -> dict:
    """Latency at batch 8 and batch 1 against fp32 eager and fp32 compiled (interleaved; ``iters`` calls each)."""
    out = {}
    for tag, inputs, iters in (("b8", lat8, iters[0]), ("b1", lat1, iters[1])):
        vs_eager = compare_latency(candidate.module, eager.module, inputs, iters=iters, warmup=3)
        vs_compiled = compare_latency(candidate.module, compiled.module, inputs, iters=iters, warmup=3)
        out[f"ms_{tag}"] = round(vs_eager["candidate_ms"], 2)
        out[f"speedup_{tag}_vs_eager"] = round(1 / vs_eager["ratio"], 3)
        out[f"speedup_{tag}_vs_compiled"] = round(1 / vs_compiled["ratio"], 3)
    return out


def time_breakdown(module, inputs, calls: int = 5) -> dict:
    """Milliseconds per call in Linear kernels, in attention, and in everything else, from torch's profiler.

    Shows where a lowered graph's remaining time goes: int8 speeds up the Linears only.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(2):
            module(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                module(**inputs)
    parts = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key
        part = ("linear" if any(k in name for k in ("qlinear", "linear_pointwise", "aten::addmm", "aten::mm", "aten::linear"))
                else "attention" if "scaled_dot_product" in name else "other")
        parts[part] += event.self_cpu_time_total / 1e3 / calls  # microseconds over all calls -> ms per call
    return {k: round(v, 2) for k, v in parts.items()}


def plot(rows: list[dict], dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("ptq", "o"), ("qat", "s"), ("format", "^"), ("lowered", "*")):
        points = [r for r in rows if r.get("kind") == kind and r.get("weight_bits")]
        if points:
            ax.scatter([r["weight_bits"] for r in points], [r["accuracy"] for r in points], marker=marker, s=60, label=kind)
            for r in points:
                ax.annotate(r["method"], (r["weight_bits"], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(dense, color="grey", linestyle="--", label=f"fp32 {dense:.4f}")
    ax.set_xlabel("average bits per encoder-layer weight")
    ax.set_ylabel("test accuracy")
    ax.set_title("MiniLM on Rotten Tomatoes: accuracy against weight bits")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, quick="a shorter run: 300 test snippets, few steps")
    parser.add_argument("--qat-steps", type=int, default=QAT_STEPS, help=f"distilled QAT steps per width (default {QAT_STEPS})")
    args = parser.parse_args(argv)
    bench = Bench(args)
    machine = bench.machine
    base, tokenizer, splits = bench.baseline(), bench.tokenizer, bench.splits
    test = splits["test"].subset(300) if args.quick else splits["test"]
    calibration = bench.calibration()
    lat8, lat1 = latency_inputs(splits["test"], tokenizer, 8, 128), latency_inputs(splits["test"], tokenizer, 1, 64)
    steps = 10 if args.quick or bench.smoke else args.qat_steps
    iters, calls = bench.pick((10, 30), (2, 3)), bench.pick(5, 1)  # timed calls per latency and per profile
    samples = bench.pick(128, 16)  # calibration snippets of the profile (and, doubled, of each lowering)

    def accuracy(graph) -> float:
        return graphprune.evaluate(graph, test, tokenizer, progress=False)["accuracy"]

    dense = accuracy(base)
    compiled = base.copy()
    bench.compile(compiled.module)  # fp32 compiled the same way as the lowered graphs
    rows = [{"method": "fp32 eager", "kind": "fp32", "accuracy": dense, "weight_bits": 32.0}]
    log(f"fp32: accuracy {dense:.4f} on {len(test)} snippets")
    rows.append({"method": "fp32 compiled", "kind": "fp32", "accuracy": accuracy(compiled), "weight_bits": 32.0,
                 **timings(compiled, base, compiled, lat8, lat1, iters)})
    log(f"fp32 compiled: {rows[-1]}")

    profiled, _ = graphprune.run_pass(base, "profile_statistics", {"num_samples": samples, "progress": False}, data=calibration)
    for bits in (8, 6, 4):
        graph = simulate(base, profiled, integer_entry(bits))
        row = {"method": f"integer w{bits}a8 PTQ", "kind": "ptq", "accuracy": accuracy(graph), "weight_bits": weight_bits(graph)}
        rows.append(row)
        log(f"{row['method']}: {row['accuracy']:.4f} ({row['weight_bits']} bits per weight)")
        started = time.perf_counter()
        graphprune.finetune(graph, splits["train"], tokenizer, teacher=base, max_steps=steps, learning_rate=2e-5, warmup_ratio=0.1, progress=False)
        row = {"method": f"integer w{bits}a8 QAT", "kind": "qat", "accuracy": accuracy(graph), "weight_bits": weight_bits(graph),
               "qat_steps": steps, "qat_seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        log(f"{row['method']} ({steps} steps, {row['qat_seconds']:.0f} s): {row['accuracy']:.4f}")

    for name, entry in FORMATS.items():
        graph = simulate(base, profiled, entry)
        rows.append({"method": name, "kind": "format", "accuracy": accuracy(graph), "weight_bits": weight_bits(graph)})
        log(f"{name}: {rows[-1]['accuracy']:.4f} ({rows[-1]['weight_bits']} bits per weight)")

    lowerings = [("int8 static", {"precision": "int8"}), ("int8 dynamic", {"precision": "int8", "activations": "dynamic"}),
                 ("bf16", {"precision": "bf16"})]
    for name, config in lowerings:
        try:
            graph, info = graphprune.run_pass(base, "lower", {**config, "num_samples": 2 * samples, **bench.lower_options}, data=calibration)
        except Exception as error:
            if config["precision"] != "bf16":
                raise
            rows.append({"method": name, "kind": "lowered", "accuracy": None, "note": f"not run: {error}"})
            log(f"bf16: {error}")
            name, config = "bf16 (emulated)", {**config, "allow_emulated_bf16": True, **bench.lower_options}
            graph, info = graphprune.run_pass(base, "lower", config)
        row = {"method": name, "kind": "lowered", "accuracy": accuracy(graph),
               "weight_bits": 8.0 if config["precision"] == "int8" else 16.0, "lower_seconds": info["seconds"],
               **timings(graph, base, compiled, lat8, lat1, iters)}
        rows.append(row)
        log(f"{name}: {row}")
        if name == "int8 static":
            breakdown = {"fp32 compiled": time_breakdown(compiled.module, lat8, calls), "int8 static": time_breakdown(graph.module, lat8, calls)}
        del graph
        torch._dynamo.reset()

    small = {"num_samples": 32, "score_samples": 16, "reconstruct_samples": 32} if bench.smoke else {}
    searched, search_info = graphprune.run_pass(base, "structured_search", {"method": "kprune", "flops": 0.5, "progress": False, **small},
                                                data=calibration)
    pruned_acc = accuracy(searched)
    graph, info = graphprune.run_pass(searched, "lower", {"precision": "int8", "num_samples": 2 * samples, **bench.lower_options}, data=calibration)
    rows.append({"method": "K-prune 0.5 FLOPs fp32", "kind": "pruned", "accuracy": pruned_acc, **timings(searched, base, compiled, lat8, lat1, iters)})
    rows.append({"method": "K-prune 0.5 FLOPs + int8", "kind": "lowered", "accuracy": accuracy(graph), "weight_bits": 8.0,
                 **timings(graph, base, compiled, lat8, lat1, iters)})
    log(f"pruned: {rows[-2]}\npruned + int8: {rows[-1]}")

    for r in rows:
        if r.get("accuracy") is not None:
            r["drop_points"] = round((dense - r["accuracy"]) * 100, 2)
    columns = ["method", "weight_bits", "accuracy", "drop_points", "ms_b8", "speedup_b8_vs_eager", "speedup_b8_vs_compiled",
               "speedup_b1_vs_eager", "speedup_b1_vs_compiled"]
    log(f"\nQuantization, MiniLM on Rotten Tomatoes test (fp32 {dense:.4f}); CPU {machine['cpu']} ({' '.join(machine['flags'])}); "
        f"latency at batch 8 x 128 tokens and batch 1 x 64, ratios interleaved; QAT = {steps} distilled steps")
    log(table(rows, columns, digits=3))

    fp32_ms, int8_ms = breakdown["fp32 compiled"], breakdown["int8 static"]
    log("\nWhere batch 8 x 128 spends its time (ms per call, torch profiler): "
        + ", ".join(f"{part} fp32 compiled {fp32_ms[part]:.1f} -> int8 {int8_ms[part]:.1f} ({fp32_ms[part] / max(int8_ms[part], 1e-9):.2f}x)"
                    for part in fp32_ms))

    int8_ok = [r for r in rows if r["method"].startswith("int8") and r["drop_points"] <= 0.5]
    bf16 = next((r for r in rows if r["method"] == "bf16" and r.get("accuracy") is not None), None)
    targets = {
        "int8_speedup_vs_eager_within_0.5pt": {"value": max((r["speedup_b8_vs_eager"] for r in int8_ok), default=0.0), "target": 3.5},
        "int8_speedup_vs_compiled_within_0.5pt": {"value": max((r["speedup_b8_vs_compiled"] for r in int8_ok), default=0.0), "target": 1.8},
        "bf16_speedup_vs_eager_within_0.1pt": {"value": bf16["speedup_b8_vs_eager"] if bf16 and bf16["drop_points"] <= 0.1 else 0.0, "target": 2.5,
                                               "note": None if bf16 else "not run: no native bf16 on this CPU"},
        "w4_qat_drop_points": {"value": next(r["drop_points"] for r in rows if r["method"] == "integer w4a8 QAT"), "target": 1.0, "lower_is_better": True},
    }
    log("\nClaims")
    words = {"int8_speedup_vs_eager_within_0.5pt": "int8 speed-up over fp32 eager within 0.5 points",
             "int8_speedup_vs_compiled_within_0.5pt": "int8 speed-up over fp32 compiled within 0.5 points",
             "bf16_speedup_vs_eager_within_0.1pt": "bf16 speed-up over fp32 eager within 0.1 points",
             "w4_qat_drop_points": "points lost by 4-bit weights after QAT"}
    for name, t in targets.items():
        lower = t.get("lower_is_better", False)
        t["met"] = bench.claim(name, t["value"], t["target"], at_most=lower, unit="" if lower else "x", words=words[name],
                               **({"note": t["note"]} if t.get("note") else {}))["met"]
    suffix = "_quick" if args.quick else ""
    plot(rows, dense, bench.out / f"quantize{suffix}.png")
    results = {"machine": machine, "torch": torch.__version__, "test_examples": len(test), "dense_accuracy": dense, "qat_steps": steps,
               "search": {"flops_ratio": search_info["flops_ratio"], "seconds": search_info["seconds"]},
               "rows": rows, "time_breakdown_ms_b8": breakdown, "targets": targets, "seconds": bench.seconds()}
    path = bench.write(f"quantize{suffix}.json", results)
    log(f"\nwrote {path} and {path.with_suffix('.png').name} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
