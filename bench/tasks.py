"""Compression of the tasks users bring, through the user path: their CSVs, their save_pretrained folders, job files.

Three tasks, each read through a job file (``[model]`` and ``[data]``) as ``graphprune
run`` reads it (``bench/task_data.py`` writes the files), test splits reported,
every choice made on validation:

1. Rotten Tomatoes as a user's CSVs (own column names and label strings) with the
   cached baseline as an ``hf`` save_pretrained folder, against the built-in run
   (``name = "baseline"``, ``name = "rotten_tomatoes"``): the baseline's metrics and
   K-prune at 0.5 of the FLOPs (no recovery) must be identical: metrics, kept heads
   per layer, every weight.
2. BBC headline/article pairs (does this headline belong to this article? a true pair
   and a TF-IDF hard negative per article): MiniLM fine-tuned on them (cached, built on
   first use), then K-prune at each of ``PAIR_FLOPS`` with distilled recovery (its
   steps, ``RECOVERY``, chosen on validation), each in torch fp32 and ONNX Runtime int8.
3. all-MiniLM-L6-v2 as the embedder it is (``feature-extraction``): BBC
   headline-to-article retrieval, recall@1 and MRR@10 (the main metric); K-prune at
   0.5 and 0.3 of the FLOPs with embedding distillation on the train articles'
   unlabelled texts, recovery steps chosen on validation, each plus ONNX Runtime int8.

Per row: main metric on validation and test, drop against dense (points), latency at
batch 32 x 128 and 1 x 16 (every row's runtime interleaved with the references,
medians), speed-up against dense torch fp32 eager and dense ONNX Runtime int8
(dynamic). The targets take, per task, the fastest row within 1 point of dense on
validation (so the FLOPs share too is chosen there) and report its test drop. The CPU
and its flags first. Writes ``bench/results/tasks.json`` as it goes and one
``tasks_<task>.png`` per task beside it.

Run: ``python bench/tasks.py`` (estimated from its parts at about 45 minutes on 2
otherwise idle cores with the baseline and the pair model cached, within the 75-minute
budget; building the pair model, 208 steps, adds about 5) or ``python bench/tasks.py
--smoke`` (tiny subsets, a few steps, an untrained head for the baseline, a temporary
cache and results folder: about 2 minutes, and meaningless numbers).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import graphprune
from graphprune.app.job_inputs import load_inputs
from graphprune.app.run_file import read_job
from graphprune.training.baseline import RECIPE, baseline_path, cache_dir, load_baseline
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import RT_LABELS
from graphprune.training.evaluate import main_metric
from graphprune.training.models import load_minilm, load_tokenizer, minilm_path
from graphprune.training.tasks import task_for
import task_data as td  # bench/task_data.py: this script runs from bench/
from common import Bench, arguments, log, machine_line, table, write_json  # bench/common.py

RT_FLOPS = 0.5
PAIR_FLOPS = (0.5, 0.4, 0.3)
RETRIEVAL_FLOPS = (0.5, 0.3)
RECOVERY = (60, 150)  # distilled steps at batch 32, chosen on validation; the longer continues the shorter (a new warm-up for the rest)
PAIR_RECIPE = {**RECIPE, "max_length": 128}  # the baseline's: batch 32, lr 5e-5, 2 epochs, 10% warm-up
PAIR_MODEL = "bbc_pairs_minilm"
TARGETS = {"vs_eager_b32x128": 3.0, "vs_ort_int8_b32x128": 1.5}
WITHIN_POINTS = 1.0
EAGER, INT8 = td.EAGER, td.INT8


@dataclass
class Settings:
    rt_sizes: dict | None = None  # None: whole splits
    bbc_sizes: dict | None = None
    max_length: int = 128  # pairs and retrieval: evaluation, calibration, fine-tuning (RT: 64, the baseline's)
    rt_max_length: int = 64
    # K-prune's scores: its default 256 examples, 8 batches x 2 classes = 16 backward passes a layer for the pairs;
    # an embedder's in-batch similarities are sampled (a backward pass per draw): 4 batches x 4 draws, the same 16
    search: dict = field(default_factory=lambda: {"num_samples": 1024})
    embedder_search: dict = field(default_factory=lambda: {"num_samples": 1024, "score_samples": 128, "fisher_samples": 4})
    recovery: tuple = RECOVERY
    pair_flops: tuple = PAIR_FLOPS
    retrieval_flops: tuple = RETRIEVAL_FLOPS
    pair_recipe: dict = field(default_factory=lambda: dict(PAIR_RECIPE))
    recovery_batch: int = 32
    iters: dict = field(default_factory=lambda: {"b32x128": 10, "b1x16": 40})  # interleaved rounds (medians)
    warmup: int = 2


TINY_SEARCH = {"num_samples": 8, "score_samples": 4, "reconstruct_samples": 8}
SMOKE = Settings(rt_sizes={"train": 32, "validation": 32, "test": 32}, bbc_sizes={"train": 40, "validation": 12, "test": 12},
                 max_length=32, rt_max_length=32, search=TINY_SEARCH, embedder_search=TINY_SEARCH, recovery=(2, 3), pair_flops=(0.4,),
                 pair_recipe={**PAIR_RECIPE, "max_steps": 3, "batch_size": 8, "max_length": 32}, recovery_batch=8,
                 iters={"b32x128": 1, "b1x16": 2}, warmup=0)


def quiet(*args):
    pass


def job_inputs(path: Path):
    spec = read_job(path)
    return load_inputs(path, spec["model"], spec["data"], log=quiet)


def evaluate(model, data, tokenizer, max_length: int, reference=None) -> dict:
    """A graph's metrics (torch eager), or an artefact folder's in its own runtime."""
    options = {"max_length": max_length, "progress": False, "reference": reference}
    if isinstance(model, Path):
        return graphprune.evaluate_artefact(model, data, tokenizer, **options)
    return graphprune.evaluate(model, data, tokenizer, **options)


def row_metrics(row: dict, model, splits, tokenizer, max_length: int, metric: str, reference=None) -> dict:
    for split in ("validation", "test"):  # an embedder's mean cosine (against the dense graph) on test only
        scores = evaluate(model, splits[split], tokenizer, max_length, reference if split == "test" else None)
        row[split] = scores[metric]
        row.update({f"{k}_{split}": v for k, v in scores.items() if k not in (metric, "examples") and v is not None})
    return row


def add_drops(rows: list[dict], dense: dict) -> None:
    for row in rows:
        for split in ("validation", "test"):
            row[f"drop_{split}_points"] = round(100 * (dense[split] - row[split]), 2)


def export_int8(graph, folder: Path, tokenizer) -> Path:
    pooling = {"pooling": graph.source.get("pooling", "mean")} if task_for(graph).name == "feature-extraction" else {}
    manifest = graph.export(folder, format="onnx", quantize="dynamic", tokenizer=tokenizer, **pooling)
    log(f"  exported {folder.name}: {manifest['model_bytes'] / 1e6:.1f} MB in {manifest['export_seconds']} s")
    return folder


def rotten_tomatoes(work: Path, settings: Settings) -> dict:
    """The user path against the built-in path: the baseline and K-prune at RT_FLOPS must come out identical."""
    tokenizer = load_tokenizer("minilm")
    base = load_baseline()
    base.export(work / "rt_hf", format="hf", tokenizer=tokenizer)
    jobs = {"user": td.rt_user_files(work, work / "rt_hf", settings.rt_sizes), "built-in": td.rt_builtin_job(work)}
    runs, rows, models = {}, [], []
    for path, job in jobs.items():
        started, inputs = time.perf_counter(), job_inputs(job)
        splits = inputs.splits if path == "user" else td.subset_splits(inputs.splits, settings.rt_sizes)
        calibration = CalibrationData(splits["train"], inputs.tokenizer, max_length=settings.rt_max_length)
        search = {"method": "kprune", "flops": RT_FLOPS, "progress": False, **settings.search}
        pruned, info = graphprune.run_pass(inputs.dense, "structured_search", search, data=calibration)
        runs[path] = {"dense": inputs.dense, "pruned": pruned, "splits": splits, "tests": {}}
        for model, graph in (("dense", inputs.dense), (f"kprune {RT_FLOPS}", pruned)):
            row = {"model": model, "runtime": EAGER, "path": path, "flops_ratio": 1.0 if graph is inputs.dense else info["flops_ratio"]}
            rows.append(row_metrics(row, graph, splits, inputs.tokenizer, settings.rt_max_length, "accuracy"))
            runs[path]["tests"][model] = {k: v for k, v in rows[-1].items() if k == "test" or k.endswith("_test")}  # every test metric and the loss
            models.append(graph)
        log(f"  {path} path: {job.name}, test {len(splits['test'])} snippets, dense {rows[-2]['test']:.4f}, "
            f"kprune {rows[-1]['test']:.4f} ({time.perf_counter() - started:.0f} s)")
    user, builtin = runs["user"], runs["built-in"]
    theirs = builtin["pruned"].module.state_dict()
    weights = [(k, k in theirs and torch.equal(v, theirs[k])) for k, v in user["pruned"].module.state_dict().items()]
    identity = {
        "dense_test_metrics": user["tests"]["dense"] == builtin["tests"]["dense"],
        "kprune_test_metrics": user["tests"][f"kprune {RT_FLOPS}"] == builtin["tests"][f"kprune {RT_FLOPS}"],
        "kept_heads": user["pruned"].edits == builtin["pruned"].edits,
        "kprune_weights": all(same for _, same in weights) and len(weights) == len(theirs),
    }
    int8 = export_int8(builtin["dense"], work / "rt_dense_int8", tokenizer)
    splits = builtin["splits"]
    rows.append(row_metrics({"model": "dense", "runtime": INT8, "path": "built-in"}, int8, splits, tokenizer, settings.rt_max_length, "accuracy"))
    models.append(int8)
    td.time_rows(rows, models, td.shape_inputs(tokenizer, splits["test"].texts), settings.iters, settings.warmup)
    add_drops(rows, rows[2])  # the built-in dense row
    return {"metric": "accuracy", "rows": rows, "identity": identity,
            "different_weights": [k for k, same in weights if not same][:5], "test_examples": len(splits["test"])}


def compress(name: str, inputs, budgets: tuple, work: Path, settings: Settings) -> tuple[list, list]:
    """Dense fp32 and int8, then per budget: K-prune, recovery steps chosen on validation, fp32 and int8 rows."""
    dense, splits, tokenizer = inputs.dense, inputs.splits, inputs.tokenizer
    metric, embedder = main_metric(dense, splits["test"]), inputs.task == "feature-extraction"
    reference, max_length = (dense if embedder else None), settings.max_length
    search = {"method": "kprune", "progress": False, **(settings.embedder_search if embedder else settings.search)}
    rows = [row_metrics({"model": "dense", "runtime": EAGER}, dense, splits, tokenizer, max_length, metric, reference)]
    models = [dense, export_int8(dense, work / f"{name}_dense_int8", tokenizer)]
    rows.append(row_metrics({"model": "dense", "runtime": INT8}, models[1], splits, tokenizer, max_length, metric, reference))
    calibration = CalibrationData(splits["train"], tokenizer, max_length=max_length)
    for keep in budgets:
        started = time.perf_counter()
        pruned, info = graphprune.run_pass(dense, "structured_search", {**search, "flops": keep}, data=calibration)
        searched = time.perf_counter() - started
        tried, done, best = {"0": evaluate(pruned, splits["validation"], tokenizer, max_length)[metric]}, 0, None
        for steps in settings.recovery:
            graphprune.finetune(pruned, splits["train"], tokenizer, teacher=dense, max_steps=steps - done, batch_size=settings.recovery_batch,
                                learning_rate=5e-5, warmup_ratio=0.1, max_length=max_length, progress=False)
            done, tried[str(steps)] = steps, evaluate(pruned, splits["validation"], tokenizer, max_length)[metric]
            if best is None or tried[str(steps)] > best[1]:
                best = (steps, tried[str(steps)], pruned.copy())
        steps, _, chosen = best
        model = f"kprune {keep}"
        log(f"  {model}: FLOPs ratio {info['flops_ratio']:.3f}, searched in {searched:.0f} s; validation {metric} by recovery steps "
            f"{ {k: round(v, 4) for k, v in tried.items()} } -> {steps} ({time.perf_counter() - started:.0f} s)")
        int8 = export_int8(chosen, work / f"{name}_kprune{keep}_int8", tokenizer)
        common = {"model": model, "flops_budget": keep, "flops_ratio": info["flops_ratio"], "recovery_steps": steps, "validation_by_steps": tried}
        for runtime, artefact in ((EAGER, chosen), (INT8, int8)):
            rows.append(row_metrics({**common, "runtime": runtime}, artefact, splits, tokenizer, max_length, metric, reference))
            models.append(artefact)
    add_drops(rows, rows[0])
    return rows, models


def pairs(work: Path, cache: Path, settings: Settings) -> dict:
    folder = cache / "bbc_pairs_data"
    files, digest = td.pair_files(folder, settings.bbc_sizes)
    td.pair_model(cache / PAIR_MODEL, files, digest, settings.pair_recipe, log)
    inputs = job_inputs(td.pair_job(folder, cache / PAIR_MODEL))
    log(f"  pairs: {', '.join(f'{s} {len(d)}' for s, d in inputs.splits.items())} (labels {', '.join(inputs.splits['test'].label_names)})")
    rows, models = compress("pairs", inputs, settings.pair_flops, work, settings)
    test = inputs.splits["test"]
    td.time_rows(rows, models, td.shape_inputs(inputs.tokenizer, test.texts, test.pairs), settings.iters, settings.warmup)
    return {"metric": "accuracy", "rows": rows, "data_digest": digest, "test_examples": len(test)}


def retrieval(work: Path, settings: Settings) -> dict:
    inputs = job_inputs(td.retrieval_job(work, minilm_path(), settings.bbc_sizes))
    log(f"  retrieval: {inputs.task}, {len(inputs.splits['train'])} unlabelled train texts, "
        f"{len(inputs.splits['validation'].queries)} / {len(inputs.splits['test'].queries)} validation / test queries")
    rows, models = compress("retrieval", inputs, settings.retrieval_flops, work, settings)
    test = inputs.splits["test"]
    given = td.shape_inputs(inputs.tokenizer, test.documents, short=test.queries)  # 32 articles; one headline
    td.time_rows(rows, models, given, settings.iters, settings.warmup)
    return {"metric": "mrr@10", "rows": rows, "test_examples": len(test.queries)}


def task_targets(name: str, result: dict) -> dict:
    """RT: every identity check; the others: the fastest row within WITHIN_POINTS of dense on validation, its test drop and speed-ups."""
    if "identity" in result:
        checks = result["identity"]
        return {"rt_user_path_identical": {"value": f"{sum(checks.values())}/{len(checks)}", "target": f"{len(checks)}/{len(checks)}",
                                           "checks": checks, "met": all(checks.values())}}
    within = [r for r in result["rows"] if r["drop_validation_points"] <= WITHIN_POINTS]
    fastest = max(within, key=lambda r: r["vs_eager_b32x128"])
    out = {}
    for key, target in TARGETS.items():
        value = round(fastest[key], 2)
        out[f"{name}_fastest_within_1pt_{key}"] = {
            "value": value, "target": target, "artefact": f"{fastest['model']} / {fastest['runtime']}",
            "drop_validation_points": fastest["drop_validation_points"], "drop_test_points": fastest["drop_test_points"],
            "met": bool(value >= target and fastest["drop_test_points"] <= WITHIN_POINTS)}
    return out


COLUMNS = ["model", "runtime", "recovery_steps", "flops_ratio", "validation", "test", "drop_validation_points", "drop_test_points",
           "ms_b32x128", "vs_eager_b32x128", "vs_ort_int8_b32x128", "ms_b1x16", "vs_eager_b1x16", "vs_ort_int8_b1x16"]


def main(argv: list[str] | None = None) -> None:
    # --smoke here is this benchmark's own: MiniLM on tiny subsets of the real data, not common.py's tiny BERT (the tasks
    # need the real model families: a pair classifier, an embedder)
    args = arguments(__doc__).parse_args(argv)
    bench = Bench(args)
    start, settings, out, machine = bench.started, SMOKE if args.smoke else Settings(), bench.out, bench.machine
    results = {"machine": machine, "smoke": args.smoke, "settings": settings.__dict__, "tasks": {}, "targets": {}, "complete": False}
    with tempfile.TemporaryDirectory(prefix="graphprune-tasks-") as tmp:
        work = Path(tmp)
        if args.smoke:  # never the real cache: a stand-in baseline (MiniLM, untrained head) and the pair model go here
            os.environ["GRAPHPRUNE_CACHE"] = str(work / "cache")
            model, _ = load_minilm(num_labels=2)
            stand_in = graphprune.trace(model)
            stand_in.source.update(tokenizer="minilm", label_names=list(RT_LABELS))
            stand_in.save(baseline_path())
        sections = (("rotten_tomatoes", lambda: rotten_tomatoes(work, settings)), ("bbc_pairs", lambda: pairs(work, cache_dir(), settings)),
                    ("bbc_retrieval", lambda: retrieval(work, settings)))
        for name, run in sections:
            log(f"\n{name}")
            started = time.perf_counter()
            results["tasks"][name] = result = run()
            result["seconds"] = round(time.perf_counter() - started)
            log(table(result["rows"], (["path"] if name == "rotten_tomatoes" else []) + COLUMNS, digits=3))
            td.plot(name, result, out / f"tasks_{name}.png", WITHIN_POINTS)
            results["targets"].update(task_targets(name, result))
            results["seconds"] = round(time.perf_counter() - start)
            write_json(out / "tasks.json", results)  # partial results, as it goes
    log(f"\n{machine_line(machine)}\nTargets (chosen on validation, reported on test)")
    for name, t in results["targets"].items():
        where = (f" [{t['artefact']}: drop {t['drop_validation_points']} validation, {t['drop_test_points']} test points]"
                 if "artefact" in t else f" {t['checks']}")
        log(f"  {name}: {t['value']} (target {'>= ' if 'artefact' in t else ''}{t['target']}){where} {'met' if t['met'] else 'NOT met'}")
    results.update(complete=True, seconds=round(time.perf_counter() - start))
    write_json(out / "tasks.json", results)
    log(f"wrote {out / 'tasks.json'} and tasks_<task>.png ({results['seconds']} s)")


if __name__ == "__main__":
    main()
