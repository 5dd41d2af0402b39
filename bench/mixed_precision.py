"""Hessian mixed precision against uniform widths at the same average weight bits, MiniLM baseline.

On the cached fine-tuned baseline: ``hessian_sensitivity`` on calibration snippets of
the training split (top eigenvalue over subsets, Q-BERT; Hutchinson trace, HAWQ-v2),
then, at each average weight width (4 and 6 by default), the encoder Linears' weights
quantized (integer, power-of-two per-channel scales; inputs on a near-float 16-bit grid
so that only the weights differ):

- ``uniform``: every Linear at that width;
- ``mixed (trace)`` and ``mixed (eigenvalue)``: ``mixed_precision`` widths from
  {3, 4, 5, 6, 8} per group under the same average.

``--granularity linear`` measures every encoder Linear alone: its traces come from the
same Hessian-vector products for all 36 Linears (``joint_trace``), and no eigenvalues
(36 power iterations would take the better part of an hour), so only ``mixed (trace)``.

Accuracy after PTQ, and after the same short distilled QAT (``--qat-steps``, 0 skips
it), on the validation and test splits. Prints the table, the target (mixed at 4 bits
more accurate than uniform 4-bit after PTQ), writes ``bench/results/mixed_precision.json``.

Run: ``python bench/mixed_precision.py [--granularity layer|linear] [--bits 4 6] [--qat-steps 100] [--iterations 10] [--trace-samples N] [--widths 2 3 4 5 6 8] [--reuse-sensitivity] [--quick] [--smoke] [--out DIR]``
(``--smoke``: the tiny BERT, seconds, meaningless numbers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import graphprune
from graphprune.training.calibration import CalibrationData
from common import Bench, arguments, log, table  # bench/common.py


LINEAR_TRACE_SAMPLES = 32  # probes of the joint per-Linear trace: 32 products in all, one per probe


def sensitivity(base, train, tokenizer, granularity: str = "layer", *, num_samples: int = 96, subsets: int = 3, iterations: int = 10,
                trace_samples: int | None = None, quick: bool = False):
    """``hessian_sensitivity`` on the baseline over training snippets: (the measured graph, its table, seconds).

    Per layer: eigenvalues and a trace per group (``trace_samples`` probes, default 4); per Linear: the joint
    trace only (default ``LINEAR_TRACE_SAMPLES`` probes)."""
    began = time.perf_counter()
    calibration = CalibrationData(train, tokenizer, batch_size=32)
    per_linear = granularity == "linear"
    if trace_samples is None:
        trace_samples = LINEAR_TRACE_SAMPLES if per_linear else 4
    measured, info = graphprune.run_pass(base, "hessian_sensitivity", {
        "granularity": granularity, "num_samples": 32 if quick else num_samples, "subsets": 1 if quick else subsets,
        "iterations": 3 if quick else iterations, "tolerance": 1e-2, "trace_samples": 2 if quick else trace_samples,
        "eigenvalue": not per_linear, "joint_trace": per_linear}, data=calibration)
    return measured, info["table"], time.perf_counter() - began


def compare_widths(measured, base, train, tokenizer, accuracy, *, bits=(4.0, 6.0), widths=None, qat_steps: int = 100,
                   granularity: str = "layer", uniform: bool = True, quick: bool = False) -> list[dict]:
    """Uniform (unless ``uniform`` is false) against mixed widths at each average, one row each; ``accuracy(graph, split)``
    scores one split. Mixed rows of per-Linear groups are labelled so ("mixed (trace, per Linear)").

    ``qat_steps`` of distilled QAT on ``train`` follow each PTQ (0: PTQ only)."""
    rows = []
    groups = measured.meta["sensitivity"]["groups"]
    criteria = [c for c, field in (("trace", "trace_per_param"), ("eigenvalue", "sensitivity")) if groups[0][field] is not None]
    scope = "" if granularity == "layer" else ", per Linear"
    for average in bits:
        variants = [("uniform", {"widths": [int(average)], "criterion": criteria[0]})] if uniform and average == int(average) else []
        chosen = {"widths": widths} if widths else {}
        variants += [(f"mixed ({c}{scope})", {"criterion": c, **chosen}) for c in criteria]
        for label, options in variants:
            quantized, q = graphprune.run_pass(measured, "mixed_precision", {"average_bits": average, **options})
            row = {"average_bits": average, "method": label, "bits_used": round(q["average_bits"], 3),
                   "widths": list(q["widths"].values()) if granularity == "layer" else sorted(set(q["widths"].values())),
                   "ptq_validation": accuracy(quantized, "validation"), "ptq_test": accuracy(quantized, "test")}
            if qat_steps:
                graphprune.finetune(quantized, train, tokenizer, teacher=base, max_steps=4 if quick else qat_steps,
                                    progress=False)
                row["qat_validation"], row["qat_test"] = accuracy(quantized, "validation"), accuracy(quantized, "test")
            log(f"  {average:g} bits {label:<32} PTQ test {row['ptq_test']:.4f}" + (f", QAT test {row['qat_test']:.4f}" if qat_steps else ""))
            rows.append(row)
    return rows


def four_bit_target(rows: list[dict]) -> dict | None:
    """The claim: mixed precision at 4 average bits more accurate on test than uniform 4-bit after PTQ."""
    uniform4 = next((r for r in rows if r["average_bits"] == 4 and r["method"] == "uniform"), None)
    mixed4 = [r for r in rows if r["average_bits"] == 4 and r["method"].startswith("mixed")]
    if not (uniform4 and mixed4):
        return None
    best = max(mixed4, key=lambda r: r["ptq_validation"])  # the criterion chosen on the validation split
    target = {"mixed_4bit_ptq_test": best["ptq_test"], "criterion": best["method"], "uniform_4bit_ptq_test": uniform4["ptq_test"],
              "met": best["ptq_test"] > uniform4["ptq_test"]}
    target["line"] = (f"Target: mixed precision at 4 average bits more accurate than uniform 4-bit after PTQ: {best['method']} "
                      f"(the mixed row best on validation: {best['ptq_validation']:.4f} vs uniform {uniform4['ptq_validation']:.4f}) "
                      f"on test {best['ptq_test']:.4f} vs {uniform4['ptq_test']:.4f}: {'met' if target['met'] else 'NOT met'}")
    return target


COLUMNS = ["average_bits", "method", "bits_used", "widths", "ptq_validation", "ptq_test"]


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, quick="a shorter run on small splits; its numbers are not the benchmark's")
    parser.add_argument("--granularity", choices=("layer", "linear"), default="layer")
    parser.add_argument("--bits", type=float, nargs="+", default=[4.0, 6.0], help="average weight widths compared")
    parser.add_argument("--qat-steps", type=int, default=100, help="distilled QAT steps after PTQ (0: PTQ only)")
    parser.add_argument("--num-samples", type=int, default=96, help="calibration snippets for the Hessian")
    parser.add_argument("--subsets", type=int, default=3, help="data subsets for the eigenvalue's mean + std (Q-BERT)")
    parser.add_argument("--iterations", type=int, default=10, help="power iterations per subset at most")
    parser.add_argument("--trace-samples", type=int, default=None,
                        help=f"Hutchinson probes (default 4 per layer group; per Linear {LINEAR_TRACE_SAMPLES}, shared by all of them)")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="widths mixed_precision chooses from (default its own, 3-8)")
    parser.add_argument("--reuse-sensitivity", action="store_true",
                        help="read the sensitivity from this granularity's results JSON instead of measuring it again")
    args = parser.parse_args(argv)
    bench = Bench(args)
    start, machine = bench.started, bench.machine
    if bench.smoke:
        args.quick, args.qat_steps = True, min(args.qat_steps, 2)
    base, tokenizer, splits = bench.baseline(), bench.tokenizer, bench.splits
    validation = splits["validation"].subset(128) if args.quick else splits["validation"]
    test = splits["test"].subset(128) if args.quick else splits["test"]

    scored = {"validation": validation, "test": test}

    def accuracy(graph, split: str) -> float:
        return graphprune.evaluate(graph, scored[split], tokenizer, progress=False)["accuracy"]

    dense = {"validation": accuracy(base, "validation"), "test": accuracy(base, "test")}
    log(f"MiniLM baseline: validation {dense['validation']:.4f}, test {dense['test']:.4f}")
    name = f"mixed_precision{'_quick' if args.quick else ''}{'' if args.granularity == 'layer' else '_linear'}"
    if args.reuse_sensitivity:
        measured = base.copy()
        measured.meta["sensitivity"] = json.loads((bench.out / f"{name}.json").read_text())["sensitivity"]
        sensitivity_table, sensitivity_seconds = f"(the sensitivity of {bench.out / f'{name}.json'})", 0.0
    else:
        measured, sensitivity_table, sensitivity_seconds = sensitivity(
            base, splits["train"], tokenizer, args.granularity, num_samples=args.num_samples, subsets=args.subsets, iterations=args.iterations,
            trace_samples=args.trace_samples, quick=args.quick)
    log(sensitivity_table)
    log(f"hessian_sensitivity: {sensitivity_seconds:.0f} s" + (" (read, not measured)" if args.reuse_sensitivity else ""))
    rows = compare_widths(measured, base, splits["train"], tokenizer, accuracy, bits=args.bits, widths=args.widths,
                          qat_steps=args.qat_steps, granularity=args.granularity, quick=args.quick)
    columns = COLUMNS + (["qat_validation", "qat_test"] if args.qat_steps else [])
    log(f"\nWeight widths, MiniLM on Rotten Tomatoes (dense test {dense['test']:.4f}); sensitivity per {args.granularity}")
    log(table(rows, columns, digits=4))
    target = four_bit_target(rows)
    if target:
        log("\n" + target["line"])
        bench.claim("mixed_4bit_beats_uniform_ptq", target["mixed_4bit_ptq_test"], f"> {target['uniform_4bit_ptq_test']:.4f} (uniform 4-bit)",
                    met=target["met"], words=f"test accuracy at 4 average bits after PTQ, {target['criterion']}")
    default_run = args.bits == [4.0, 6.0] and not args.widths
    name = name.replace("_quick", "") if bench.smoke else name
    file = f"{name}{'' if default_run else '_bits_' + '_'.join(f'{b:g}' for b in args.bits)}.json"  # (the defaults' file keeps its name)
    path = bench.write(file, {"machine": machine, "dense": dense, "granularity": args.granularity, "sensitivity": measured.meta["sensitivity"],
                      "sensitivity_seconds": round(sensitivity_seconds, 1), "rows": rows, "target": target,
                      "seconds": round(time.perf_counter() - start, 1)})
    log(f"wrote {path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
