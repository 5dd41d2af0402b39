"""Tutorial 6: compression learned during fine-tuning: CoFi-style gates, LayerDrop, factorization.

Retraining-free pruning (tutorial 5) picks structure from the dense model; here the
structure is learned while the model is fine-tuned, distilled from the dense graph.
This tutorial:

1. puts hard-concrete gates on every head and FFN neuron (``l0_structured``; CoFi
   also gates whole sublayers and the hidden dimension, which cost accuracy at this
   budget), started from the units' Fisher importance, with a FLOPs target, and
   shows them in the summary;
2. fine-tunes: the Lagrangian controller drives the expected FLOPs to the target
   while logits and hidden states are distilled from the dense graph;
3. commits the gates (``commit_gates``): the closed units are physically removed,
   and the committed graph computes what the gated one did; measures accuracy and
   the speed-up on this CPU, fine-tunes the committed graph a little more (CoFi's
   second phase), saves and reloads it;
4. fine-tunes with LayerDrop, then picks the depth afterwards (every other layer);
5. factorizes the FFN projections into rank-gated SVD factors (``factorize``).

    python tutorials/tutorial_6_learned_compression.py [--quick]

The full run uses the cached fine-tuned baseline (built on first use, about 14
minutes) and trains for a fraction of an epoch per method (about 15 minutes on 2
cores); ``bench/learned.py`` gives each method its full budget. ``--quick`` (what
the tests run) starts from MiniLM with an untrained head and a few steps: it shows
the workflow, not the numbers.
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
    train = splits["train"].subset(64) if quick else splits["train"]
    test = splits["test"].subset(32) if quick else splits["test"]
    dense, tokenizer = baseline_or_pretrained(quick)
    steps = 2 if quick else 160  # half an epoch of the 10k snippets at batch 32
    texts = [test.texts[i] for i in range(2 if quick else 8)]
    batch = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=16 if quick else 128, return_tensors="pt"))

    def accuracy(g) -> float:
        return graphprune.evaluate(g, test, tokenizer, progress=False)["accuracy"]

    def speedup(g) -> float:
        with torch.no_grad():
            return 1 / compare_latency(g.module, dense.module, batch, iters=3 if quick else 10)["ratio"]

    base_accuracy = accuracy(dense)
    print(f"[1] dense baseline: accuracy {base_accuracy:.4f} on {len(test)} test snippets")

    # 1. Gates on heads and FFN neurons, to remove 60% of the encoder's FLOPs; each gate starts lower the less
    #    its unit matters (Fisher ranks), so the Lagrangian closes the least important first. CoFi's default
    #    units add whole sublayers and the hidden dimension: at one or two epochs they lost accuracy (README).
    calibration = CalibrationData(train, tokenizer)
    config = {"target": 0.6, "units": ["heads", "neurons"], "init_from": "fisher", "num_samples": 32 if quick else 512}
    gated, info = graphprune.run_pass(dense, "l0_structured", config, data=calibration)
    print(f"    {info['gates']} gates; expected FLOPs kept {info['expected_fraction']:.3f}, target {info['target_fraction']:.2f}")

    # 2. Fine-tune with distillation (logits and layer-wise hidden states); the gates train too. lr 1e-4, twice
    #    finetune's default: chosen on the validation split for heavily pruned graphs (bench/learned.py).
    recipe = {"learning_rate": 1e-4, "kd_hidden_weight": 1.0}
    graphprune.finetune(gated, train, tokenizer, teacher=dense, max_steps=steps, progress=not quick, **recipe)
    trained = gated.meta["gates"]["trained"]
    print(f"[2] after {steps} steps: expected FLOPs kept {trained['expected_fraction']:.3f} (target {trained['target']:.2f}); "
          f"gated accuracy {accuracy(gated):.4f}")
    print(gated.summary())

    # 3. Commit: closed heads and neurons are removed (with CoFi's units also sublayers and hidden dimensions).
    committed, info = graphprune.run_pass(gated, "commit_gates")
    with torch.no_grad():
        gap = max((committed.module(**batch)[k] - gated.module.eval()(**batch)[k]).abs().max().item() for k in ("logits",))
    print(f"[3] committed: {info['hidden_removed']} hidden dimensions removed; max |committed - gated| = {gap:.2e}")
    print(committed.summary())
    print(f"    accuracy {accuracy(committed):.4f}, {speedup(committed):.2f}x faster than dense (eager, batch 8 x 128)")
    # CoFi's second phase: the committed graph, now fixed in shape, fine-tuned with the same distillation
    # (its hidden size is still the teacher's: no hidden gates here)
    graphprune.finetune(committed, train, tokenizer, teacher=dense, max_steps=max(1, steps // 3), progress=not quick, **recipe)
    print(f"    after {max(1, steps // 3)} more steps on the committed graph: accuracy {accuracy(committed):.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        committed.save(Path(tmp) / "cofi")
        again = graphprune.load(Path(tmp) / "cofi")
        with torch.no_grad():
            same = torch.equal(again.module.eval()(**batch).logits, committed.module.eval()(**batch).logits)
        print(f"    saved and reloaded: accuracy {accuracy(again):.4f}, outputs bit-identical = {same}")

    # 4. LayerDrop: train once with layers dropped at random, choose the depth afterwards.
    dropped = dense.copy()
    graphprune.finetune(dropped, train, tokenizer, teacher=dense, max_steps=steps, layerdrop=0.5, progress=not quick)
    shallow, info = graphprune.run_pass(dropped, "remove_layers", {"schedule": "every_other"})
    print(f"[4] LayerDrop 0.5, then layers {info['removed']} removed: accuracy {accuracy(shallow):.4f}, "
          f"{speedup(shallow):.2f}x faster")

    # 5. Factorization: the FFN projections as two smaller matrices with a gated rank.
    factored, _ = graphprune.run_pass(dense, "factorize", {"roles": ["ffn_up", "ffn_down"], "target": 0.5})
    graphprune.finetune(factored, train, tokenizer, teacher=dense, max_steps=steps, progress=not quick)
    factored, info = graphprune.run_pass(factored, "commit_gates")
    print(f"[5] factorized FFNs: parameters {info['params_dense'] / 1e6:.2f}M -> {info['params_after'] / 1e6:.2f}M, "
          f"accuracy {accuracy(factored):.4f}, {speedup(factored):.2f}x faster")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM with an untrained head and few examples instead of the cached baseline (used by the tests)")
    main(parser.parse_args().quick)
