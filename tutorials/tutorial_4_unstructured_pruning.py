"""Tutorial 4: unstructured pruning of the fine-tuned MiniLM, MASE's workflow and better criteria.

MASE's pruning tutorial, run as written on graphprune: measure the baseline, prune
50% of the encoder's weights and activations by L1 norm with MASE's own config,
measure, fine-tune briefly, measure. Then the same 50% of the weights with the
criteria that need no retraining at all: Wanda (|W| times the input's norm) and
SparseGPT (an OBS weight update that reconstructs each layer), side by side.

    python tutorials/tutorial_4_unstructured_pruning.py [--quick]

The full run uses the cached fine-tuned baseline (built on first use, about 14
minutes) and the whole test split. ``--quick`` (what the tests run) starts from
MiniLM with an untrained head, takes few steps and scores 32 snippets: it shows the
workflow, not the numbers.
"""

import argparse
import time

import torch

import graphprune
from graphprune.training.baseline import baseline_or_pretrained
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import load_rotten_tomatoes


def main(quick: bool) -> None:
    splits = load_rotten_tomatoes()
    test = splits["test"].subset(32) if quick else splits["test"]
    graph, tokenizer = baseline_or_pretrained(quick)

    def accuracy(g) -> float:
        return graphprune.evaluate(g, test, tokenizer, progress=False)["accuracy"]

    rows = [("dense baseline", accuracy(graph), "")]
    print(f"[1] baseline: accuracy {rows[-1][1]:.4f} on {len(test)} test snippets")

    # 2. MASE's tutorial config, unchanged: the `prune` pass speaks it.
    mase_config = {
        "weight": {"sparsity": 0.5, "method": "l1-norm", "scope": "local"},
        "activation": {"sparsity": 0.5, "method": "l1-norm", "scope": "local"},
    }
    pruned, info = graphprune.run_pass(graph, "prune", mase_config)
    rows.append(("MASE config: l1 50% weights + activations", accuracy(pruned), f"{info['activation']['rewritten']} Linear inputs rewritten"))
    print(f"[2] after MASE's l1 config: accuracy {rows[-1][1]:.4f}")
    print(pruned.summary())

    # 3. A short fine-tune, distilled from the dense graph; the masks hold throughout.
    steps = 2 if quick else 200
    graphprune.finetune(pruned, splits["train"], tokenizer, teacher=graph, max_steps=steps, learning_rate=5e-5, progress=False)
    rows.append((f"  + {steps} fine-tuning steps (distilled)", accuracy(pruned), ""))
    print(f"[3] after {steps} steps: accuracy {rows[-1][1]:.4f}")

    # 4. The same 50% of the weights, one-shot, with criteria that use calibration data.
    calibration = CalibrationData(splits["train"], tokenizer)
    samples = 8 if quick else 128  # 128: the pass's default, chosen by measurement
    for method in ("l1", "wanda", "sparsegpt"):
        start = time.perf_counter()
        one_shot, info = graphprune.run_pass(graph, "prune_weight", {"method": method, "sparsity": 0.5, "num_samples": samples}, data=calibration)
        rows.append((f"{method} 50% weights, one-shot", accuracy(one_shot), f"pruned in {time.perf_counter() - start:.1f} s"))
        print(f"[4] {method}: accuracy {rows[-1][1]:.4f} ({info['weight_sparsity']:.1%} of the encoder's Linear weights)")

    # 5. Commit the best one-shot result and save it: a compact, safe checkpoint.
    committed, _ = graphprune.run_pass(one_shot, "commit_masks")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        committed.save(Path(tmp) / "sparse")
        again = graphprune.load(Path(tmp) / "sparse")
        size = (Path(tmp) / "sparse" / "model.safetensors").stat().st_size
    batch = dict(tokenizer(test.texts[:8], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    with torch.no_grad():
        same = torch.equal(again.module(**batch).logits, one_shot.module(**batch).logits)
    print(f"[5] committed sparsegpt graph saved ({size / 1e6:.1f} MB of weights) and reloaded: accuracy {accuracy(again):.4f}, "
          f"outputs bit-identical to the masked graph = {same}")

    width = max(len(r[0]) for r in rows)
    print(f"\n{'stage'.ljust(width)}  accuracy  note")
    for stage, acc, note in rows:
        print(f"{stage.ljust(width)}  {acc:8.4f}  {note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM with an untrained head and few examples instead of the cached baseline (used by the tests)")
    main(parser.parse_args().quick)
