"""What ``graphprune compress`` leaves in its output folder, and its progress line.

    artefact/            the chosen artefact (ONNX Runtime or AOTInductor folder with predict.py, or a
                         graphprune checkpoint of the lowered graph for the torch runtime)
    run.toml             `graphprune run run.toml` rebuilds the chosen pipeline and scores it on test
    search_job.toml      the search that was run (`graphprune search` resumes or repeats it)
    front.json           the Pareto front of every trial on validation
    compress.json        the run: dense and chosen figures, every trial, the budget
    report.html          the page a person reads (`graphprune report DIR` writes it again)

Every file is written whole (a temporary name, then renamed).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...ir.cpu import cpu_description
from ..search.front import feasible, pareto_front
from ..search.report import _atomic_write, describe_pipeline, run_file_text
from ..search.budget import format_seconds
from .space import default_space, first_trials, narrowed

MAX_TRIALS = 10_000  # a budgeted run without --trials stops on time, not on this


def search_job_text(spec, task: str, metric: str, limit: float) -> str:
    """The search job of the run: the model and data, the objectives and limit, the default space narrowed by the user."""
    import tomli_w

    (b, n) = spec.shapes[0]
    search = {"trials": spec.trials or MAX_TRIALS, "sampler": spec.search.get("sampler", "tpe"), "seed": spec.search.get("seed", spec.seed),
              "objectives": [metric, "latency"], "constraints": {f"{metric}_drop": round(limit, 6)},
              "latency": {"batch_size": b, "max_length": n, "iters": 10, "padded": True}, "study": spec.search.get("study", "compress"),
              "output": str(spec.out / "search")}
    if spec.storage:
        search["storage"] = spec.storage
    if spec.search.get("enqueue"):
        search["enqueue"] = spec.search["enqueue"]
    elif not spec.narrowing:  # the benchmarks' best pipelines first, where the space is the default one
        search["enqueue"] = first_trials(spec.runtimes)
    space = narrowed(default_space(task, spec.runtimes), spec.narrowing)
    job = {"model": spec.model, "data": spec.data, "search": search, **space}
    return f"# graphprune compress: at most {limit:.4g} points of validation {metric} lost, fastest at {b}x{n}\n" + tomli_w.dumps(job)


def layers(graph) -> list[dict]:
    """Per encoder layer: attention heads and FFN neurons."""
    try:
        rows = graph.summary().rows
    except Exception:  # a lowered graph's kernels may hide its shapes from the summary: the report says so
        return []
    return [{"layer": int(r["layer"]), "heads": r.get("heads"), "ffn": r.get("ffn_width")} for r in rows if str(r.get("layer", "")).isdigit()]


def _trial_row(trial, front: set, metric: str) -> dict:
    metrics = trial.user_attrs.get("metrics") or {}
    return {"trial": trial.number, "state": trial.state.name, "pipeline": describe_pipeline(trial) if "steps" in trial.user_attrs else "",
            "validation": metrics.get(metric), "drop_points": metrics.get(f"{metric}_drop"), "latency_ratio": metrics.get("latency"),
            "speedup": round(1 / metrics["latency"], 3) if metrics.get("latency") else None, "feasible": feasible(trial) if metrics else False,
            "front": trial.number in front, "seconds": trial.user_attrs.get("seconds"), "repeat_of": trial.user_attrs.get("repeat_of"), "worker": trial.user_attrs.get("worker"),
            "steps": trial.user_attrs.get("steps"), "finetune": trial.user_attrs.get("finetune"), "export": trial.user_attrs.get("export"),
            "error": trial.user_attrs.get("error")}


def write_outputs(run, done: list, picks: list, timed: dict, chosen: dict | None, test: dict) -> dict:
    """compress.json, front.json, run.toml and report.html; returns the run's JSON."""
    spec, out, metric = run.spec, run.spec.out, run.metric
    every = run.study.get_trials(deepcopy=False)
    front = {t.number for t in pareto_front(run.job, done)}
    trials = [_trial_row(t, front, metric) for t in every if t.state.name in ("COMPLETE", "FAIL")]
    dense_layers = layers(run.dense)
    result = {
        "command": "graphprune compress", "task": run.task, "metric": metric, "model": spec.model, "data": spec.data,
        "max_drop": {"given": spec.max_drop, "relative": spec.relative, "points": round(run.limit, 4)},
        "shapes": [f"{b}x{n}" for b, n in spec.shapes], "runtimes": list(spec.runtimes),
        "machine": cpu_description(),
        "dense": {"validation": run.reference.quality[metric], "test": test["dense"], "params": _params(run.dense),
                  "ms": {name: timed.get(name, {}) for name in run.references}, "layers": dense_layers,
                  "ort_int8": {k: run.peer[k] for k in ("validation", "drop_points", "feasible")}},
        "candidates": [{"trial": t.number, "ms": timed.get(f"trial {t.number}", {})} for t in picks],
        "chosen": None, "trials": trials, "front": sorted(front),
        "budget": {"seconds": run.budget.total, "elapsed": round(run.budget.elapsed(), 1), "share": round(run.budget.elapsed() / run.budget.total, 3),
                   "phases": {k: round(v, 1) for k, v in run.phases.items()}, "stopped": run.stopped},
    }
    if chosen is not None:
        trial = next((t for t in done if t.number == chosen["trial"]), None) or peer_trial(run.peer, metric)
        row = next((r for r in trials if r["trial"] == trial.number), None) or {**_trial_row(trial, front, metric), "pipeline": PEER_PIPELINE}
        _atomic_write(out / "run.toml", run_file_text(run.job, trial, out / "reproduced"))
        graph = chosen["graph"]
        result["chosen"] = {
            **{k: row[k] for k in ("trial", "pipeline", "steps", "finetune", "export", "validation", "drop_points")},
            "runtime": runtime_name(row["export"]), "test_graph": test["graph"], "test_artefact": test["artefact"],
            "drop_test_points": round(100 * (test["dense"] - test["artefact"]), 4), "ms": timed[chosen["name"]],
            "speedups": chosen["speedups"], "timing_rounds": chosen["timing_rounds"], "params": _params(graph),
            "size_mb": round(sum(f.stat().st_size for f in (out / "artefact").rglob("*") if f.is_file()) / 1e6, 2),
            "layers": layers(graph), "artefact": str(out / "artefact"),
            "commands": commands(out, row["export"], spec)}
    _atomic_write(out / "front.json", json.dumps([r for r in trials if r["front"]], indent=2, default=str))
    _atomic_write(out / "compress.json", json.dumps(result, indent=2, default=str))
    from .html import write_report

    write_report(out)
    show_summary(result, run.log)
    return result


PEER_PIPELINE = "the dense model, exported to ONNX Runtime int8 (dynamic): no trial within the limit was faster"


def peer_trial(peer: dict, metric: str):
    """The dense ONNX Runtime int8 reference dressed as a trial (no passes, an int8 ONNX export), for the run file and
    the report when it is the one delivered."""
    from types import SimpleNamespace

    from ..search.study import optuna

    metrics = {metric: peer["validation"], f"{metric}_drop": peer["drop_points"]}
    return SimpleNamespace(number=None, state=optuna().trial.TrialState.COMPLETE, constraints={},
                           user_attrs={"steps": [], "finetune": None, "export": {"format": "onnx", "quantize": "dynamic"}, "metrics": metrics})


def _params(graph) -> int:
    from ...ir.masks import count_parameters

    return count_parameters(graph)[0]


def runtime_name(export: dict | None) -> str:
    if not export:
        return "torch int8 (graphprune lower)"
    if export["format"] == "onnx":
        return f"ONNX Runtime int8 {export.get('quantize', 'fp32')}" if export.get("quantize") else "ONNX Runtime fp32"
    return "AOTInductor int8" if export["format"] == "aoti" else export["format"]


def commands(out: Path, export: dict | None, spec) -> dict:
    data = spec.data.get("name") or "job.toml"
    run = {"reproduce": f"graphprune run {out / 'run.toml'}", "search again": f"graphprune search {out / 'search_job.toml'}",
           "evaluate": f"graphprune eval {out / 'artefact'} --data {data}"}
    if export:
        run["run the artefact"] = f"python {out / 'artefact' / 'predict.py'} {out / 'artefact'} \"a text to classify\""
    else:
        run["run the artefact"] = f"python -c \"import graphprune; graph = graphprune.load('{out / 'artefact'}')\""
    return run


def show_summary(result: dict, log=print) -> None:
    """The table a terminal shows at the end (rich there, plain text through any other ``log``): the dense references
    and the chosen artefact, side by side, then the chosen pipeline and its files."""
    from ...ir.summary import Summary

    chosen, dense, metric, budget = result["chosen"], result["dense"], result["metric"], result["budget"]
    head = (f"graphprune compress: {len(result['trials'])} trials in {format_seconds(budget['elapsed'])} of {format_seconds(budget['seconds'])} "
            f"({budget['share']:.2f} of the budget; stopped by the {'budget' if budget['stopped'] == 'budget' else budget['stopped'] + ' limit'})")
    if chosen is None:
        closest = min((t for t in result["trials"] if t["drop_points"] is not None), key=lambda t: t["drop_points"], default=None)
        log("\n".join([head, f"no trial kept within {result['max_drop']['points']:.2f} points of validation {metric}"
                       + (f"; the closest lost {closest['drop_points']:.2f} (trial {closest['trial']})" if closest else "")]))
        return
    eager = dense["ms"]["dense eager fp32"]
    rows = [{"model": "dense", "runtime": name.removeprefix("dense "), f"val_{metric}": round(dense["validation"], 4) if name == "dense eager fp32" else None,
             f"test_{metric}": round(dense["test"], 4) if name == "dense eager fp32" else None,
             **{f"ms_{s}": round(ms[s], 2) for s in result["shapes"]}, **{f"x_{s}": round(eager[s] / ms[s], 2) for s in result["shapes"]}}
            for name, ms in dense["ms"].items()]
    rows.append({"model": "chosen" if chosen["trial"] is None else f"trial {chosen['trial']}", "runtime": chosen["runtime"], f"val_{metric}": round(chosen["validation"], 4),
                 f"test_{metric}": round(chosen["test_artefact"], 4), **{f"ms_{s}": round(chosen["ms"][s], 2) for s in result["shapes"]},
                 **{f"x_{s}": chosen["speedups"][s]["vs_eager_fp32"] for s in result["shapes"]}})
    table = Summary(title=f"{head}; x: speed-up over dense torch fp32 eager", columns=list(rows[0]), rows=rows, total_row=False)
    table.show(log=log)
    lines = [f"chosen: {chosen['pipeline']}",
             f"test {metric} {chosen['test_artefact']:.4f} in its runtime ({chosen['drop_test_points']:+.2f} points lost against dense); "
             + "; ".join(f"{s}: {r['vs_ort_int8']:.2f}x dense ONNX Runtime int8, {r['vs_aoti_fp32']:.2f}x dense AOTInductor fp32"
                         for s, r in chosen["speedups"].items()),
             f"artefact: {chosen['artefact']} ({chosen['size_mb']} MB); report: {Path(chosen['artefact']).parent / 'report.html'}"]
    log("\n".join(lines))


class TrialBar:
    """A rich progress line for the trials: done, best so far within the limit, time left; a no-op when off."""

    def __init__(self, enabled: bool, budget, metric: str, limit: float):
        self.enabled, self.budget, self.metric, self.limit, self.n = enabled, budget, metric, limit, 0
        self.study = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(self.describe(None))
        return self

    def describe(self, best) -> str:
        best_text = "none within the limit yet" if best is None else f"best {best:.2f}x faster"
        return f"compress: {self.n} trials, {best_text}, {format_seconds(max(0.0, self.budget.left()))} left"

    def refresh(self) -> None:
        if not self.enabled:
            return
        best = None
        if self.study is not None:  # the fastest trial within the limit so far
            from .choose import candidates

            done = self.study.get_trials(deepcopy=False, states=(self.study_states.COMPLETE,))
            picks = candidates(done, 1)
            best = 1 / picks[0].user_attrs["metrics"]["latency"] if picks else None
        self.progress.update(self.task, description=self.describe(best))

    def watch(self, study) -> None:
        from ..search.study import optuna

        self.study, self.study_states = study, optuna().trial.TrialState

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
