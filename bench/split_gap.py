"""Why structured pruning loses more on the validation split than on test: flips and movie-clustered intervals.

On the cached fine-tuned baseline, K-prune at a few FLOPs budgets (retraining-free, as
``bench/structured.py``), each snippet of the validation and test splits scored by the
dense and the pruned graph. For each split: the accuracy drop in points, how many
snippets the pruning broke (dense right, pruned wrong) and fixed (the reverse), and a
95% interval for the drop from a bootstrap over movies (the splits are drawn by movie,
so snippets of one movie are not independent). Two drops whose intervals overlap are
not shown to differ by the split.

Prints the table, writes ``bench/results/split_gap.json``.

Run: ``python bench/split_gap.py [--flops 0.3 0.5] [--resamples 2000] [--smoke] [--out DIR]``
(``--smoke``: the tiny BERT and 200 resamples, seconds).
"""

from __future__ import annotations

import random

import numpy as np

from graphprune.infra.pipeline import run_pass
from graphprune.training.batches import make_batches
from common import Bench, arguments, table  # bench/common.py
from deploy import graph_runner, predictions  # bench/deploy.py


def correct(graph, data, tokenizer) -> list[bool]:
    """Per snippet, whether the graph's prediction is its label (in the split's order)."""
    batches = make_batches(data, tokenizer, batch_size=64, max_length=64)
    graph.module.eval()
    return (predictions(graph_runner(graph), batches) == np.asarray(data.labels)).tolist()


def movie_interval(groups: list[str], dense: list[bool], pruned: list[bool], resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the drop in points, resampling whole movies."""
    by_movie: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_movie.setdefault(g, []).append(i)
    movies, rng, drops = list(by_movie), random.Random(seed), []
    for _ in range(resamples):
        picked = [i for m in rng.choices(movies, k=len(movies)) for i in by_movie[m]]
        drops.append(100 * sum(dense[i] - pruned[i] for i in picked) / len(picked))
    drops.sort()
    return drops[int(0.025 * resamples)], drops[int(0.975 * resamples) - 1]


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--flops", type=float, nargs="+", default=[0.3, 0.5], help="K-prune FLOPs budgets")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    bench = Bench(args)
    if bench.smoke:
        args.resamples = min(args.resamples, 200)
    base, tokenizer, splits = bench.baseline(), bench.tokenizer, bench.splits
    calibration = bench.calibration()
    scored = {s: splits[s] for s in ("validation", "test")}
    dense = {s: correct(base, d, tokenizer) for s, d in scored.items()}
    rows = []
    for flops in args.flops:
        pruned_graph, _ = run_pass(base, "structured_search", {"method": "kprune", "flops": flops, "progress": False}, data=calibration)
        for split, data in scored.items():
            pruned = correct(pruned_graph, data, tokenizer)
            d = dense[split]
            low, high = movie_interval(data.groups, d, pruned, args.resamples)
            rows.append({"flops": flops, "split": split, "snippets": len(d), "movies": len(set(data.groups)),
                         "dense_accuracy": sum(d) / len(d), "pruned_accuracy": sum(pruned) / len(pruned),
                         "drop_points": 100 * (sum(d) - sum(pruned)) / len(d),
                         "broken": sum(a and not b for a, b in zip(d, pruned)), "fixed": sum(b and not a for a, b in zip(d, pruned)),
                         "drop_low": low, "drop_high": high})
            print(f"  K-prune {flops} {split}: drop {rows[-1]['drop_points']:.2f} points [{low:.2f}, {high:.2f}]", flush=True)
    print("\nK-prune (no retraining), drop in points with a 95% interval over movies; broken/fixed: snippets whose prediction changed")
    print(table(rows, ["flops", "split", "snippets", "movies", "dense_accuracy", "pruned_accuracy", "drop_points", "drop_low", "drop_high",
                       "broken", "fixed"], digits=4))
    for flops in args.flops:
        val, test = (next(r for r in rows if r["flops"] == flops and r["split"] == s) for s in ("validation", "test"))
        apart = val["drop_low"] > test["drop_high"] or test["drop_low"] > val["drop_high"]
        bench.claim(f"split_gap_{flops}", round(val["drop_points"] - test["drop_points"], 2), "intervals overlap", met=not apart,
                    words=f"K-prune {flops}: validation drop minus test drop, points")
    path = bench.write("split_gap.json", {"machine": bench.machine, "rows": rows, "resamples": args.resamples, "seconds": bench.seconds()})
    print(f"wrote {path} ({bench.seconds():.0f} s)")


if __name__ == "__main__":
    main()
