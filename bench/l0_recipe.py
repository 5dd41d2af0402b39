"""Which l0_structured recipe works with a short budget: CoFi's five kinds of gate or heads and neurons, a uniform start or Fisher ranks.

A 2 x 2 comparison on the fine-tuned MiniLM baseline, every point trained the same
way as ``bench/learned.py``'s l0 points (``--epochs`` of the 10k training snippets,
three quarters with the gates under the Lagrangian, distilled from the dense graph
with logits and hidden states, then a quarter fine-tuning the committed graph):

- units: CoFi's heads, attention, neurons, ffn and hidden against heads and neurons;
- init_from: none (every gate at ``init``) against fisher (ranked by Fisher importance).

Prints validation and test accuracy of each committed graph, the FLOPs it kept and
its measured speed-up (``bench/learned.py``'s ``measure``), and the expected size the
gates reached against the target; writes ``bench/results/l0_recipe.json``.

Run: ``cd bench && PYTHONPATH=.. python l0_recipe.py [--epochs 0.5] [--target 0.75] [--smoke] [--out DIR]``
(``--smoke``: two of the variants on the tiny BERT, seconds).
"""

from __future__ import annotations

import time

import graphprune
from common import Bench, arguments, log, table  # bench/common.py
from learned import Setup, measure  # bench/learned.py

COFI = ["heads", "attention", "neurons", "ffn", "hidden"]
VARIANTS = {
    "CoFi units, uniform start": (COFI, "none"),
    "CoFi units, Fisher ranks": (COFI, "fisher"),
    "heads+neurons, uniform start": (["heads", "neurons"], "none"),
    "heads+neurons, Fisher ranks": (["heads", "neurons"], "fisher"),
}


def run(setup: Setup, name: str, units: list[str], init_from: str, target: float, epochs: float) -> dict:
    started = time.perf_counter()
    config = {"target": target, "units": units, "init_from": init_from}
    graph, _ = graphprune.run_pass(setup.base, "l0_structured", config, data=setup.calibration if init_from != "none" else None)
    setup.finetune(graph, 0.75 * epochs, kd_hidden_weight=1.0)
    trained = graph.meta["gates"]["trained"]
    gated_validation = setup.accuracy(graph, setup.validation)
    committed, info = graphprune.run_pass(graph, "commit_gates")
    setup.finetune(committed, 0.25 * epochs)
    layers = committed.summary().rows[1:-2]
    row = {"method": name, "point": f"target {target}", "epochs": epochs, "expected_fraction": round(trained["expected_fraction"], 3),
           "target_fraction": round(1 - target, 3), "gated_validation": round(gated_validation, 4),
           "heads_per_layer": [r["heads"] for r in layers], "ffn_width_per_layer": [r["ffn_width"] for r in layers],
           "hidden_removed": info["hidden_removed"], "train_seconds": round(time.perf_counter() - started)}
    return measure(setup, committed, row)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--epochs", type=float, default=0.5, help="training budget of every point, in epochs (default 0.5)")
    parser.add_argument("--target", type=float, default=0.75, help="share of the FLOPs to remove (default 0.75)")
    args = parser.parse_args(argv)
    bench = Bench(args)
    setup = Setup(bench, quick=False)
    variants = dict(list(VARIANTS.items())[1::2]) if bench.smoke else VARIANTS  # a smoke run: both units, Fisher ranks
    log(f"MiniLM baseline: validation {setup.dense['validation']:.4f}, test {setup.dense['test']:.4f}")
    rows = [run(setup, name, units, init_from, args.target, args.epochs) for name, (units, init_from) in variants.items()]
    columns = ["method", "accuracy_validation", "accuracy", "drop_points", "expected_fraction", "flops_ratio", "hidden_removed",
               "speedup_b8", "speedup_b1", "train_seconds"]
    log(f"\nl0_structured recipes, {args.epochs} epoch(s) at target {args.target}; MiniLM on Rotten Tomatoes "
        f"(dense validation {setup.dense['validation']:.4f}, test {setup.dense['test']:.4f})")
    log(table(rows, columns, digits=4))
    for r in rows:
        log(f"  {r['method']}: heads {r['heads_per_layer']}, ffn {r['ffn_width_per_layer']}")
    best = max(rows, key=lambda r: r["accuracy_validation"])
    bench.claim("best_recipe_drop_points", best["drop_points"], 1.0, at_most=True,
                words=f"points lost by the recipe best on validation ({best['method']})")
    path = bench.write("l0_recipe.json", {"machine": bench.machine, "dense": setup.dense, "epochs": args.epochs, "target": args.target,
                                          "rows": rows, "seconds": bench.seconds()})
    log(f"\nwrote {path} ({bench.seconds():.0f} s)")


if __name__ == "__main__":
    main()
