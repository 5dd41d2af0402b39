"""Tutorial 3: quantization-aware training of the fine-tuned MiniLM (MASE's tutorial 3), then real int8 kernels.

MASE's tutorial, run with its own config on graphprune: measure the baseline,
quantize every Linear to 8-bit fixed point (4 fraction bits) in simulation, measure,
train with the quantizers in place (QAT), measure. Then what MASE cannot do: widths
fitted per tensor from profiled statistics instead of a hand-picked 4, and the
``lower`` pass, which puts the graph on real int8 kernels (torchao PT2E + inductor)
and measures the speed-up on this CPU; the int8 checkpoint is saved and reloaded.

    python tutorials/tutorial_3_qat.py [--quick]

The full run uses the cached fine-tuned baseline (built on first use, about 14
minutes) and the whole test split. ``--quick`` (what the tests run) starts from
MiniLM with an untrained head, takes few steps, scores 32 snippets and lowers without
compiling (the same int8 arithmetic, no speed-up): it shows the workflow, not the numbers.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import graphprune
from graphprune.training.baseline import baseline_or_pretrained
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import load_rotten_tomatoes
from graphprune.training.timing import compare_latency

MASE_CONFIG = {  # MASE tutorial 3, as written
    "by": "type",
    "default": {"config": {"name": None}},
    "linear": {
        "config": {
            "name": "integer",
            "data_in_width": 8, "data_in_frac_width": 4,
            "weight_width": 8, "weight_frac_width": 4,
            "bias_width": 8, "bias_frac_width": 4,
        }
    },
}
CALIBRATED = {  # widths from the profiled ranges; one scale per weight row
    "by": "type",
    "default": {"config": {"name": None}},
    "linear": {
        "config": {
            "name": "integer",
            "data_in_width": 8, "data_in_frac_width": "auto", "data_in_range": "percentile",
            "weight_width": 8, "weight_frac_width": "auto", "weight_per_channel": True,
            "bias_width": 16, "bias_frac_width": "auto",
        }
    },
}


def main(quick: bool) -> None:
    splits = load_rotten_tomatoes()
    test = splits["test"].subset(32) if quick else splits["test"]
    graph, tokenizer = baseline_or_pretrained(quick)
    calibration = CalibrationData(splits["train"], tokenizer)

    def accuracy(g) -> float:
        return graphprune.evaluate(g, test, tokenizer, progress=False)["accuracy"]

    rows = [("fp32 baseline", accuracy(graph))]
    print(f"[1] baseline: accuracy {rows[-1][1]:.4f} on {len(test)} test snippets")

    # 2. MASE's config, unchanged: 8-bit fixed point with 4 fraction bits on every Linear.
    quantized, _ = graphprune.run_pass(graph, "quantize", MASE_CONFIG)
    rows.append(("MASE config: integer 8-bit, 4 fraction bits (PTQ)", accuracy(quantized)))
    print(f"[2] after quantize: accuracy {rows[-1][1]:.4f}")
    print(quantized.summary())

    # 3. QAT: fine-tune with the quantizers in place (straight-through gradients), distilled from fp32.
    steps = 2 if quick else 150
    graphprune.finetune(quantized, splits["train"], tokenizer, teacher=graph, max_steps=steps, learning_rate=2e-5, warmup_ratio=0.1, progress=False)
    rows.append((f"  + QAT, {steps} steps", accuracy(quantized)))
    print(f"[3] after QAT: accuracy {rows[-1][1]:.4f}")

    # 4. Calibrated widths: profile the ranges once, let each tensor pick its fraction bits.
    profiled, _ = graphprune.run_pass(graph, "profile_statistics", {"num_samples": 16 if quick else 128}, data=calibration)
    calibrated, info = graphprune.run_pass(profiled, "quantize", CALIBRATED)
    rows.append(("integer 8-bit, calibrated widths (PTQ)", accuracy(calibrated)))
    print(f"[4] calibrated widths: accuracy {rows[-1][1]:.4f}; e.g. {next(iter(info['frac_widths'].items()))}")

    # 5. Real int8 kernels: lower the QAT graph (its trained weights), measure accuracy and speed.
    start = time.perf_counter()
    lowered, info = graphprune.run_pass(quantized, "lower", {"num_samples": 16 if quick else 256, "compile": not quick}, data=calibration)
    rows.append(("QAT graph lowered to int8 kernels", accuracy(lowered)))
    print(f"[5] lowered ({info['lowered_linears']} Linears int8, {time.perf_counter() - start:.0f} s{' with compilation' if not quick else ''}): accuracy {rows[-1][1]:.4f}")
    if not quick:
        batch = dict(tokenizer(test.texts[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
        timing = compare_latency(lowered.module, graph.module, batch, iters=10, warmup=3)
        print(f"    batch 8 x 128 tokens: fp32 eager {timing['reference_ms']:.0f} ms, int8 {timing['candidate_ms']:.0f} ms: "
              f"{1 / timing['ratio']:.2f}x faster")

    with tempfile.TemporaryDirectory() as tmp:
        lowered.save(Path(tmp) / "int8")
        again = graphprune.load(Path(tmp) / "int8")
        size = (Path(tmp) / "int8" / "model.safetensors").stat().st_size
        inputs = dict(tokenizer(test.texts[:8], padding=True, truncation=True, max_length=64, return_tensors="pt"))
        with torch.no_grad():
            same = torch.equal(again.module(**inputs).logits, lowered.module(**inputs).logits)
        print(f"[6] int8 checkpoint: {size / 1e6:.1f} MB (fp32: {info['float_weight_bytes'] / 1e6:.1f} MB; the word "
              f"embeddings stay fp32) and reloaded: accuracy {accuracy(again):.4f}, outputs bit-identical = {same}")

    width = max(len(r[0]) for r in rows)
    print(f"\n{'stage'.ljust(width)}  accuracy")
    for stage, acc in rows:
        print(f"{stage.ljust(width)}  {acc:8.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM with an untrained head and few examples instead of the cached baseline (used by the tests)")
    main(parser.parse_args().quick)
