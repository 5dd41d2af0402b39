"""int8 on every CPU: the ``lower`` pass's scheme per oneDNN ISA, on the fine-tuned MiniLM baseline.

oneDNN's u8 x s8 kernels accumulate in int32 only with VNNI or AMX; without it
(AVX2, AVX-512 without VNNI) they add products in pairs into int16, which 8-bit
activations times 8-bit weights saturate. ``lower`` therefore picks scheme ``u8s8``
where the CPU accumulates in int32, and where it does not one of the two exact
schemes, ``u7s8`` (7-bit activations, "reduce_range") or ``u8s7`` (7-bit weights):
this benchmark measures which keeps accuracy (``graphprune.ir.cpu.NON_VNNI_SCHEME``).

Each ISA runs in its own process, capped with ``ONEDNN_MAX_CPU_ISA`` (oneDNN reads it
once, at its first kernel), with MKL and ATen capped alike (``MKL_ENABLE_INSTRUCTIONS``,
``ATEN_CPU_CAPABILITY``) so that fp32 eager, the reference, runs as on such a CPU too.
Per ISA, on the test split: fp32 eager and compiled; int8 static and dynamic in each
of the three schemes (the one ``lower`` picks marked "auto"); for each, accuracy, how far
the compiled kernels are from the lowered graph's own reference arithmetic (the same
graph run eagerly: max abs and relative RMS over the logits of 256 test snippets),
how far that reference is from fp32, and latency at batch 8 x 128 and batch 1 x 64
against fp32 eager and fp32 compiled (interleaved medians). A Zen 5 capped at AVX2 is not
a Zen 3 (clocks, caches, MKL's code paths differ): absolute times are this machine's.

Run: ``python bench/int8_isa.py [--isas DEFAULT AVX2 AVX512_CORE] [--quick] [--smoke] [--out DIR]``; writes
``bench/results/int8_isa.json`` and ``int8_isa.png`` (``--smoke``: the tiny BERT, uncompiled, in this process at the
uncapped ISA only; seconds, meaningless numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import Bench, arguments, log, machine_line, save_figure, table, write_json  # bench/common.py: this script runs from bench/

CAPS = {  # ONEDNN_MAX_CPU_ISA -> the MKL and ATen caps of a CPU that tops out there
    "DEFAULT": {},
    "AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "AVX512_CORE": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


def measure(bench: Bench, quick: bool) -> dict:
    """One ISA's rows, in this process (its caps already in the environment)."""
    import torch

    import graphprune
    from graphprune.ir import cpu
    from quantize import latency_inputs, timings  # bench/quantize.py: the same latency batches and timings

    base, tokenizer, splits = bench.baseline(), bench.tokenizer, bench.splits
    test = splits["test"].subset(300) if quick else splits["test"]
    calibration = bench.calibration()
    lat8, lat1 = latency_inputs(splits["test"], tokenizer, 8, 128), latency_inputs(splits["test"], tokenizer, 1, 64)
    probe = dict(tokenizer(splits["test"].texts[:256], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    count = len(probe["input_ids"])  # 256 (a smoke run's test split holds fewer)
    iters = bench.pick((3, 10) if quick else (15, 40), (1, 2))

    def accuracy(graph) -> float:
        return graphprune.evaluate(graph, test, tokenizer, progress=False)["accuracy"]

    def logits(graph):
        with torch.no_grad():
            return torch.cat([graph.module(**{k: v[i:i + 32] for k, v in probe.items()}).logits for i in range(0, count, 32)])

    def latency(graph, eager, compiled) -> dict:
        return timings(graph, eager, compiled, lat8, lat1, iters)

    fp32_logits = logits(base)
    compiled = base.copy()
    bench.compile(compiled.module)
    rows = [{"method": "fp32 eager", "accuracy": accuracy(base)}]
    rows.append({"method": "fp32 compiled", "accuracy": accuracy(compiled), **latency(compiled, base, compiled)})
    log(f"  {rows[-1]}")
    auto = cpu.int8_scheme()
    for activations in ("static", "dynamic"):
        for scheme in [auto] if bench.smoke else cpu.SCHEMES:  # a smoke run: the scheme lower picks here, only
            config = {"activations": activations, "scheme": scheme, "num_samples": bench.pick(256, 32)}
            reference, _ = graphprune.run_pass(base, "lower", {**config, "compile": False}, data=calibration)
            fast, info = graphprune.run_pass(base, "lower", {**config, **bench.lower_options}, data=calibration)
            ref_logits, fast_logits = logits(reference), logits(fast)
            rms = lambda a, b: ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()  # noqa: E731
            row = {
                "method": f"int8 {activations} {scheme}" + (" (auto)" if scheme == auto else ""),
                "scheme": scheme, "auto": scheme == auto, "activations": activations,
                "exact_here": cpu.exact_at(scheme), "accuracy": accuracy(fast),
                "kernel_vs_reference_max": round((fast_logits - ref_logits).abs().max().item(), 5),
                "kernel_vs_reference_rms": round(rms(fast_logits, ref_logits), 5),
                "reference_vs_fp32_max": round((ref_logits - fp32_logits).abs().max().item(), 5),
                "reference_vs_fp32_rms": round(rms(ref_logits, fp32_logits), 5),
                "lower_seconds": info["seconds"], **latency(fast, base, compiled),
            }
            rows.append(row)
            log(f"  {row}")
            del reference, fast
            torch._dynamo.reset()
    dense = rows[0]["accuracy"]
    for r in rows:
        r["drop_points"] = round((dense - r["accuracy"]) * 100, 2)
    return {"machine": bench.machine, "isa": cpu.onednn_isa(), "auto_scheme": auto, "test_examples": len(test), "rows": rows}


def compare(runs: list[dict]) -> dict:
    """Per scheme and ISA: the compiled graph's distance from its reference, over the same distance where the
    kernels accumulate in int32 (the uncapped run): 1 means the kernels are as exact as VNNI's."""
    exact = next((run for run in runs if run["cap"] == "DEFAULT" and run["auto_scheme"] == "u8s8"), None)
    if exact is None:
        return {}
    base = {r["method"].replace(" (auto)", ""): r for r in exact["rows"] if "scheme" in r}
    out = {}
    for run in runs:
        for r in run["rows"]:
            key = r["method"].replace(" (auto)", "")
            # a smoke run's kernels are the reference itself (uncompiled): nothing to divide by
            if "scheme" in r and key in base and base[key]["kernel_vs_reference_rms"]:
                out[f"{run['cap']} {key}"] = round(r["kernel_vs_reference_rms"] / base[key]["kernel_vs_reference_rms"], 2)
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run, color in zip(runs, ("tab:blue", "tab:orange", "tab:green")):
        for r in run["rows"]:
            if "scheme" in r:
                marker = "o" if r["auto"] else "x"
                ax.scatter(r["speedup_b8_vs_eager"], r["accuracy"], color=color, marker=marker, s=60)
                ax.annotate(f"{r['activations']} {r['scheme']}", (r["speedup_b8_vs_eager"], r["accuracy"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.axhline(run["rows"][0]["accuracy"], color=color, linestyle="--", linewidth=0.8, label=f"{run['isa']}: fp32 (dashed), auto o, others x")
    ax.set_xlabel("speed-up vs fp32 eager on the same ISA (batch 8 x 128)")
    ax.set_ylabel("test accuracy")
    ax.set_title("MiniLM int8 per oneDNN ISA: the scheme lower picks (o) and the others (x)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, quick="a shorter run: 300 test snippets, few timing iterations")
    parser.add_argument("--isas", nargs="+", default=list(CAPS), choices=sorted(CAPS), help="ONEDNN_MAX_CPU_ISA values (default all three)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bench = Bench(args, announce=not args.child)
    if args.child:
        print("RESULT " + json.dumps(measure(bench, args.quick)), flush=True)
        return
    runs = []
    if bench.smoke:  # the uncapped ISA only, in this process: the caps need a fresh process each (oneDNN reads them once)
        runs.append({"cap": "DEFAULT", **measure(bench, quick=True)})
    for cap in [] if bench.smoke else args.isas:
        env = {**os.environ, **CAPS[cap], "ONEDNN_MAX_CPU_ISA": cap}
        log(f"\n== ONEDNN_MAX_CPU_ISA={cap} {' '.join(f'{k}={v}' for k, v in CAPS[cap].items())} (a fresh process)")
        child = subprocess.Popen([sys.executable, __file__, "--child"] + (["--quick"] if args.quick else []), env=env,
                                 stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
        result = None
        for line in child.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            else:
                print(line, end="", flush=True)
        if child.wait() != 0 or result is None:
            raise SystemExit(f"the run at ONEDNN_MAX_CPU_ISA={cap} failed (exit {child.returncode})")
        runs.append({"cap": cap, **result})
    suffix = "_quick" if args.quick else ""
    write_json(bench.out / f"int8_isa{suffix}.json", {"runs": runs})  # the raw rows, before any summary

    columns = ["method", "exact_here", "accuracy", "drop_points", "kernel_vs_reference_max", "kernel_vs_reference_rms", "reference_vs_fp32_max",
               "ms_b8", "speedup_b8_vs_eager", "speedup_b8_vs_compiled", "speedup_b1_vs_eager", "speedup_b1_vs_compiled"]
    targets, ratios = {}, compare(runs)
    for run in runs:
        log(f"\nint8 at ONEDNN_MAX_CPU_ISA={run['cap']}: {machine_line(run['machine'])}; MiniLM, Rotten Tomatoes test "
            f"({run['test_examples']} snippets); lower picks {run['auto_scheme']}")
        log(table(run["rows"], columns, digits=4))
        auto = [r for r in run["rows"] if r.get("auto")]
        exact = [r for r in run["rows"] if r.get("exact_here") and r["scheme"] != "u8s8"]
        targets[run["cap"]] = {
            "auto_rms_vs_exact_kernels": max((ratios.get(f"{run['cap']} {r['method'].replace(' (auto)', '')}", 1.0) for r in auto)),
            "auto_worst_drop_points": max(r["drop_points"] for r in auto),
            "accuracy_within_0.5pt_of_fp32": all(r["drop_points"] <= 0.5 for r in auto),
            "best_auto_speedup_b8_vs_eager": max(r["speedup_b8_vs_eager"] for r in auto),
            "best_auto_speedup_b8_vs_compiled": max(r["speedup_b8_vs_compiled"] for r in auto),
            "mean_drop_by_exact_7bit_scheme": {s: round(sum(r["drop_points"] for r in exact if r["scheme"] == s) / 2, 2)
                                               for s in ("u7s8", "u8s7")},
        }
    log("\nCompiled kernels' distance from the reference arithmetic (relative RMS), over the same with int32 accumulation "
        "(uncapped run); about 1 = as exact as VNNI, much more = saturating:")
    log("  " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    log("\nClaims (the scheme lower picks, per ISA)")
    for cap, t in targets.items():
        bench.claim(f"{cap}_auto_rms_vs_exact_kernels", t["auto_rms_vs_exact_kernels"], 1.5, at_most=True,
                    words=f"{cap}: kernels' distance from the reference over the same with int32 accumulation (rms ratio)")
        bench.claim(f"{cap}_auto_worst_drop_points", t["auto_worst_drop_points"], 0.5, at_most=True,
                    words=f"{cap}: points lost against fp32, worst of the scheme lower picks")
        log(f"  {cap}: best speed-up at batch 8 {t['best_auto_speedup_b8_vs_eager']}x vs fp32 eager, {t['best_auto_speedup_b8_vs_compiled']}x "
            f"vs fp32 compiled; mean drop of the exact 7-bit schemes {t['mean_drop_by_exact_7bit_scheme']}")
    plot(runs, bench.out / f"int8_isa{suffix}.png")
    results = {"machine": bench.machine, "runs": runs, "kernel_rms_vs_int32_accumulation": ratios, "targets": targets, "seconds": bench.seconds()}
    path = bench.write(f"int8_isa{suffix}.json", results)
    log(f"\nwrote {path} and {path.with_suffix('.png').name} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
