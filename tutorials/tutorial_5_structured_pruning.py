"""Tutorial 5: structured pruning of the fine-tuned MiniLM: which heads matter, remove them, search a budget.

Unstructured zeros leave a dense CPU kernel as slow as before; removed heads and
neurons make it faster. This tutorial:

1. analyses every attention head of the baseline on validation snippets: its
   head-mask importance (Michel et al.), the accuracy lost when it alone is masked,
   and its attention entropy (a table, and heatmaps in ``runs/tutorial5/heads.png``);
2. removes the two least important heads of every layer by name, and measures;
3. runs the retraining-free search (K-prune) at two FLOPs budgets, and measures
   accuracy and the speed-up on this CPU;
4. saves the smallest graph (its layers now differ in width) and reloads it.

    python tutorials/tutorial_5_structured_pruning.py [--quick]

The full run uses the cached fine-tuned baseline (built on first use, about 14
minutes) and the whole test split. ``--quick`` (what the tests run) starts from
MiniLM with an untrained head and uses few examples: it shows the workflow, not the
numbers.
"""

import argparse
import tempfile
from pathlib import Path

import torch

import graphprune
from graphprune.training.baseline import baseline_or_pretrained
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import load_rotten_tomatoes
from graphprune.training.timing import compare_latency


def main(quick: bool) -> None:
    splits = load_rotten_tomatoes()
    test = splits["test"].subset(32) if quick else splits["test"]
    graph, tokenizer = baseline_or_pretrained(quick)
    texts = [splits["test"].texts[i] for i in range(8)]
    batch = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))

    def measure(g) -> tuple[float, float]:
        accuracy = graphprune.evaluate(g, test, tokenizer, progress=False)["accuracy"]
        with torch.no_grad():
            speedup = 1 / compare_latency(g.module, graph.module, batch, iters=3 if quick else 10)["ratio"]
        return accuracy, speedup

    rows = [("dense baseline", graphprune.evaluate(graph, test, tokenizer, progress=False)["accuracy"], 1.0, graph)]
    print(f"[0] baseline: accuracy {rows[0][1]:.4f} on {len(test)} test snippets")

    # 1. Which heads matter: three measures per head, on validation snippets.
    validation = CalibrationData(splits["validation"], tokenizer)
    plot = Path(tempfile.gettempdir() if quick else "runs/tutorial5") / "heads.png"
    analysed, info = graphprune.run_pass(graph, "analyze_heads", {"num_samples": 16 if quick else 512, "plot": str(plot)}, data=validation)
    print(f"[1] head analysis on {analysed.meta['heads']['examples']} validation snippets (heatmaps: {plot})")
    print(info["table"])

    # 2. Remove the two least important heads of every layer, by index.
    importance = analysed.meta["heads"]["importance"]
    weakest = {layer: sorted(range(len(row)), key=row.__getitem__)[:2] for layer, row in enumerate(importance)}
    fewer, _ = graphprune.run_pass(graph, "remove_heads", {"heads": weakest})
    rows.append(("remove the 2 weakest heads per layer", *measure(fewer), fewer))
    print(f"[2] removed heads {weakest}: accuracy {rows[-1][1]:.4f}, {rows[-1][2]:.2f}x faster")

    # 3. The retraining-free search under a FLOPs budget: heads and FFN neurons, repaired by least squares.
    calibration = CalibrationData(splits["train"], tokenizer)
    options = {"num_samples": 32, "score_samples": 16, "reconstruct_samples": 32} if quick else {}
    for keep in (0.6,) if quick else (0.6, 0.4):  # --quick: one budget keeps the test suite short
        searched, info = graphprune.run_pass(graph, "structured_search", {"method": "kprune", "flops": keep, "progress": False, **options}, data=calibration)
        rows.append((f"kprune, {keep:.0%} of the FLOPs kept", *measure(searched), searched))
        print(f"[3] kprune {keep}: heads {info['heads_per_layer']}, FFN widths {info['ffn_width_per_layer']} "
              f"-> accuracy {rows[-1][1]:.4f}, {rows[-1][2]:.2f}x faster (searched in {info['seconds']:.0f} s)")
    print(searched.summary())

    # 4. Layers of different widths save and reload as they are.
    with tempfile.TemporaryDirectory() as tmp:
        searched.save(Path(tmp) / "small")
        again = graphprune.load(Path(tmp) / "small")
        with torch.no_grad():
            same = torch.equal(again.module(**batch).logits, searched.module(**batch).logits)
    print(f"[4] saved and reloaded: outputs bit-identical = {same}")

    width = max(len(r[0]) for r in rows)
    print(f"\n{'stage'.ljust(width)}  accuracy  speed-up (batch 8 x 128, this CPU)   params")
    for stage, accuracy, speedup, g in rows:
        params = sum(p.numel() for p in g.module.parameters()) / 1e6
        print(f"{stage.ljust(width)}  {accuracy:8.4f}  {speedup:6.2f}x{'':29}{params:6.2f}M")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM with an untrained head and few examples instead of the cached baseline (used by the tests)")
    main(parser.parse_args().quick)
