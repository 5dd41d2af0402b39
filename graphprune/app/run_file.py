"""``graphprune run pipeline.toml``: a whole compression job described in one file.

    [model]
    name = "baseline"            # the cached fine-tuned MiniLM; or "minilm"; or checkpoint = "path";
                                 # or your own: path = "save_pretrained folder" (hub = "org/name": local
                                 # HF cache only), task = "token-classification", label_names = [...]

    [data]
    name = "rotten_tomatoes"     # or "bbc_news"; or your own files: train = "train.csv",
                                 # validation = ..., test = ..., columns = { text = "review", label = "sentiment" }
                                 # (see graphprune.app.job_inputs)
    eval_split = "test"
    eval_limit = 500             # optional: a seeded subset
    max_length = 64

    [[passes]]                   # passes that take calibration data get the train split
    name = "prune_weight"
    method = "sparsegpt"
    sparsity = 0.5

    [iterative]                  # optional: prune in steps, fine-tuning after each
    pass = "prune_weight"        # default
    target_sparsity = 0.9
    steps = 3
    config = { method = "l1" }   # the pass's other fields

    [finetune]                   # optional: any graphprune.finetune option, plus distill; after
    max_steps = 100              # the passes but before a `lower` (lowered graphs are inference-only);
                                 # with [iterative], the fine-tune of every step
    distill = true               # the uncompressed graph is the teacher

    [output]
    checkpoint = "runs/pruned"   # masks are committed before saving

    [[export]]                   # optional, any number: artefacts that run without graphprune,
    path = "artefacts/pruned"    # each checked in its own runtime, then evaluated there
    format = "onnx"              # onnx | aoti | hf
    quantize = "dynamic"         # onnx only: dynamic | static (calibrated on the train split)

Everything is checked before any work starts; a mistake is reported with the file,
the section and the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..infra.config import build_config
from ..infra.registry import get_pass
from ..infra.pipeline import normalise_steps, read_toml, resolve_steps, run_pass, run_pipeline
from ..ir.masks import has_uncommitted_masks
from ..ir.summary import Summary
from ..training.calibration import CalibrationData
from ..training.finetune import FinetuneConfig, finetune
from ..training.iterative import iterative_prune
from .job_inputs import DATA_FIELDS, MODEL_FIELDS, check_data, check_model, load_inputs
from .workflow import check_labels, latency_batch, results_table, stage_row

SECTIONS = {"model", "data", "passes", "iterative", "finetune", "output", "export"}
EXPORT_FIELDS = {"path", "format", "quantize", "pooling", "optimize"}
EXPORT_FORMATS = ("onnx", "aoti", "hf")
FIELDS = {
    "iterative": {"pass", "target_sparsity", "steps", "config"},
    "model": MODEL_FIELDS,
    "data": DATA_FIELDS,
    "output": {"checkpoint"},
}


def _check_section(path: Path, name: str, section, allowed=None) -> dict:
    """``section`` as a table with only the ``allowed`` fields (default: the run file's for ``name``)."""
    allowed = FIELDS[name] if allowed is None else set(allowed)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: [{name}] must be a table")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"{path}: [{name}] has unknown field {unknown[0]!r}; allowed: {sorted(allowed)}")
    return section


def read_job(path) -> dict:
    """Parse and validate a job file; raises ValueError naming the file, section and field."""
    path = Path(path)
    spec = read_toml(path)
    unknown = sorted(set(spec) - SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown section [{unknown[0]}]; allowed: {sorted(SECTIONS)}")
    model = check_model(path, _check_section(path, "model", spec.get("model", {"name": "baseline"})))
    data = check_data(path, _check_section(path, "data", spec.get("data", {"name": "rotten_tomatoes"})))
    for field in ("eval_limit", "max_length"):
        if field in data and (not isinstance(data[field], int) or isinstance(data[field], bool) or data[field] < 2):
            raise ValueError(f"{path}: [data] {field} = {data[field]!r} is not allowed; expected an integer >= 2")
    passes = spec.get("passes", [])
    if not isinstance(passes, list):
        raise ValueError(f"{path}: passes must be an array of [[passes]] tables")
    try:
        steps = resolve_steps(normalise_steps(passes))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    finetune_spec, distill = check_finetune(path, spec["finetune"]) if "finetune" in spec else ({}, False)
    iterative = None
    if "iterative" in spec:
        iterative = _check_iterative(path, _check_section(path, "iterative", spec["iterative"]))
        if "finetune" not in spec:
            raise ValueError(f"{path}: [iterative] needs a [finetune] section: the fine-tuning of every step (max_steps, ...)")
    output = _check_section(path, "output", spec.get("output", {}))
    exports = [_check_export(path, entry) for entry in _tables(path, "export", spec.get("export", []))]
    return {
        "model": model,
        "data": data,
        "steps": [(info.name, cfg) for info, cfg in steps],
        "iterative": iterative,
        "finetune": finetune_spec if "finetune" in spec else None,
        "distill": bool(distill),
        "output": output.get("checkpoint"),
        "exports": exports,
    }


def check_finetune(path: Path, table: dict) -> tuple[dict, bool]:
    """A [finetune] table: its graphprune.finetune options (checked by FinetuneConfig) and whether to distill."""
    options = dict(table)
    distill = options.pop("distill", False)
    if not isinstance(distill, bool):
        raise ValueError(f"{path}: [finetune] distill = {distill!r} is not allowed; expected true or false")
    allowed = {f.name for f in dataclasses.fields(FinetuneConfig)}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ValueError(f"{path}: [finetune] has unknown field {bad[0]!r}; allowed: {sorted(allowed | {'distill'})}")
    try:
        FinetuneConfig(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: [finetune] {error}") from None
    return options, distill


def _tables(path: Path, name: str, value) -> list:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{path}: {name} must be an array of [[{name}]] tables")
    return value


def _check_export(path: Path, entry: dict) -> dict:
    unknown = sorted(set(entry) - EXPORT_FIELDS)
    if unknown:
        raise ValueError(f"{path}: [[export]] has unknown field {unknown[0]!r}; allowed: {sorted(EXPORT_FIELDS)}")
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ValueError(f"{path}: [[export]] needs path = 'folder'")
    if entry.get("format") not in EXPORT_FORMATS:
        raise ValueError(f"{path}: [[export]] format = {entry.get('format')!r} is not allowed; expected one of {list(EXPORT_FORMATS)}")
    if "quantize" in entry and (entry["format"] != "onnx" or entry["quantize"] not in ("dynamic", "static")):
        raise ValueError(f"{path}: [[export]] quantize = {entry['quantize']!r} is not allowed; expected 'dynamic' or 'static' with format = 'onnx'")
    return dict(entry)


def _check_iterative(path: Path, section: dict) -> dict:
    target = section.get("target_sparsity")
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target < 1:
        raise ValueError(f"{path}: [iterative] target_sparsity = {target!r} is not allowed; expected a number in (0, 1)")
    steps = section.get("steps", 3)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{path}: [iterative] steps = {steps!r} is not allowed; expected an integer >= 1")
    name = section.get("pass", "prune_weight")
    config = section.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{path}: [iterative] config must be a table of the pass's fields")
    try:
        build_config(name, get_pass(name).config_cls, {**config, "sparsity": target})
    except ValueError as error:
        raise ValueError(f"{path}: [iterative] {error}") from None
    return {"pass": name, "target_sparsity": float(target), "steps": steps, "config": config}


def run_file(path, *, log=print) -> Summary:
    job = read_job(path)
    split = job["data"].get("eval_split", "test")
    if split not in ("train", "validation", "test"):
        raise ValueError(f"{path}: [data] eval_split = {split!r} is not allowed; expected one of ['test', 'train', 'validation']")
    loaded = load_inputs(path, job["model"], job["data"], log=log)
    dense, tokenizer, splits = loaded.dense, loaded.tokenizer, loaded.splits
    max_length = job["data"].get("max_length", 64)
    data = splits[split].subset(job["data"].get("eval_limit"))
    check_labels(dense, data)
    inputs = latency_batch(data, tokenizer, max_length=max_length)

    rows = [stage_row("input model", dense, dense, data, tokenizer, inputs, max_length=max_length)]
    calibration = CalibrationData(splits["train"], tokenizer, max_length=max_length)
    steps, lowering = job["steps"], []
    if job["finetune"] is not None and job["iterative"] is None:  # a lowered graph is inference-only: fine-tune before lower
        cut = next((i for i, (name, _) in enumerate(steps) if name == "lower"), len(steps))
        steps, lowering = steps[:cut], steps[cut:]
    graph, _ = run_pipeline(dense, steps, data=calibration) if steps else (dense, [])
    if steps:
        rows.append(stage_row("after passes", graph, dense, data, tokenizer, inputs, max_length=max_length))
    teacher = dense if job["distill"] else None
    options = {"max_length": max_length, **(job["finetune"] or {})}
    if job["iterative"] is not None:
        spec = job["iterative"]
        result = iterative_prune(
            graph, spec["pass"], spec["config"], target_sparsity=spec["target_sparsity"], steps=spec["steps"],
            train_data=splits["train"], tokenizer=tokenizer, eval_data=data, teacher=teacher, data=calibration, log=log, **options,
        )
        graph = result.graph
        result.table.show(log=log)
        rows.append(stage_row(f"after iterative pruning ({spec['steps']} steps)", graph, dense, data, tokenizer, inputs, max_length=max_length))
    elif job["finetune"] is not None:
        graph = graph.copy() if graph is dense else graph
        finetune(graph, splits["train"], tokenizer, teacher=teacher, **options)
        rows.append(stage_row("after fine-tune", graph, dense, data, tokenizer, inputs, max_length=max_length))
        if lowering:
            graph, _ = run_pipeline(graph, lowering, data=calibration)
            rows.append(stage_row("after lower", graph, dense, data, tokenizer, inputs, max_length=max_length))
    if job["output"]:
        if any(has_uncommitted_masks(m) for m in graph.module.modules()):
            graph, _ = run_pass(graph, "commit_masks", inplace=True)
        graph.save(job["output"])
        log(f"saved {job['output']}")
    table = results_table(f"graphprune run {path}: {data.name}", rows)
    table.show(log=log)
    for entry in job["exports"]:
        _export(graph, entry, calibration, data, tokenizer, max_length, log, dense)
    return table


def _export(graph, entry: dict, calibration, data, tokenizer, max_length: int, log, dense=None) -> None:
    from ..training.evaluate import main_metric
    from .export import evaluate_artefact

    options = {k: v for k, v in entry.items() if k not in ("path", "format")}
    if options.get("quantize") == "static":
        options["data"] = calibration
    manifest = graph.export(entry["path"], format=entry["format"], tokenizer=tokenizer, **options)
    metrics = evaluate_artefact(entry["path"], data, tokenizer, max_length=max_length, progress=False, record=f"{data.name}", reference=dense)
    metric = main_metric(graph, data)
    log(f"exported {entry['path']} ({manifest['artefact']} {manifest.get('precision', '')}, {manifest['model_bytes'] / 1e6:.1f} MB): "
        f"{metric} {metrics[metric]:.4f} in its own runtime on {data.name}")
