"""What a search leaves: the Pareto front (validation, then re-run and scored on the test split), its run files,
its plot, the best trial under the constraints checkpointed, and ``search.json``.

Written under the job's ``[search] output`` folder (default ``<job stem>_search`` beside it):
``front/trial_<n>.toml`` (``graphprune run`` reproduces the member on the test split),
``pareto.png`` (two or three objectives), ``best/`` (a graph checkpoint; with ``best_artefact/`` when
the best trial exports) and ``search.json``.
Every file is written whole (temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ...ir.summary import Summary
from .front import best_trial, feasible, pareto_front
from .job import SearchJob
from .objectives import QUALITY, Exported, measure


HOUSEKEEPING = {"progress", "num_samples", "score_samples", "reconstruct_samples", "batch_size", "seed"}  # not shown in the table


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the files from the other users of a shared folder
    os.replace(tmp, path)


def run_file_text(job: SearchJob, trial, checkpoint: Path) -> str:
    import tomli_w

    # paths in a job file are relative to its folder; the run file may be run from anywhere
    model = {k: (str(Path(job.path.parent, v).resolve()) if k in ("checkpoint", "path") else v) for k, v in job.model.items()}
    data = {k: (str(Path(job.path.parent, v).resolve()) if k in ("train", "validation", "test") else v)
            for k, v in job.data.items() if k not in ("eval_limit", "test_limit")}
    data = {**({"name": "rotten_tomatoes"} if "train" not in data else {}), **data, "eval_split": "test", "max_length": job.data.get("max_length", 64)}
    if "test_limit" in job.data:
        data["eval_limit"] = job.data["test_limit"]
    spec = {"model": model, "data": data, "passes": [{"name": n, **c} for n, c in trial.user_attrs["steps"]]}
    if trial.user_attrs.get("finetune") is not None:
        spec["finetune"] = {**trial.user_attrs["finetune"], "distill": job.distill}
    spec["output"] = {"checkpoint": str(checkpoint.resolve())}
    if trial.user_attrs.get("export"):
        spec["export"] = [{"path": str(checkpoint.resolve()) + "_artefact", **trial.user_attrs["export"]}]
    which = f"trial {trial.number}" if trial.number is not None else "the dense model"
    header = f"# search {job.study!r}, {which}: validation {trial.user_attrs['metrics']}\n"
    return header + tomli_w.dumps(spec)


def _replace_folder(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` whole: into a temporary sibling, then renamed over the old one."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _plot(job: SearchJob, study, path: Path) -> bool:
    if len(job.objectives) not in (2, 3):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import optuna

    ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=list(job.objectives))  # feasible ones marked
    ax.set_title(f"search {job.study}: validation split ({len(study.trials)} trials)")
    tmp = path.with_name(f".{path.name}.tmp.png")
    ax.figure.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    matplotlib.pyplot.close(ax.figure)
    return True


def describe_pipeline(trial) -> str:
    """One line: the trial's passes with their searched fields, its fine-tune and its export."""
    steps = " -> ".join(f"{n}({', '.join(f'{k}={v}' for k, v in c.items() if not isinstance(v, dict) and k not in HOUSEKEEPING)})"
                        for n, c in trial.user_attrs["steps"]) or "(no passes)"
    options, export = trial.user_attrs.get("finetune"), trial.user_attrs.get("export")
    return (steps + (f" + finetune {options.get('max_steps', '')} steps" if options else "")
            + (f" -> export {export['format']}" + (f" {export['quantize']}" if export.get("quantize") else "") if export else ""))


def report(job: SearchJob, study, worker, *, log=print) -> dict:
    """Tabulate the front, re-run its members on the test split, write the files; returns what was written and measured,
    with ``graphs``: each front member's graph (an :class:`Exported` when it exports), by trial number, in memory only."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    out = job.output
    front = pareto_front(job, done)
    best = best_trial(job, done)
    test = worker.splits["test"].subset(job.data.get("test_limit"))
    rows, members, graphs = [], [], {}
    wanted = set(job.objectives) | set(job.constraints)
    main = next((o for o in job.objectives if o in QUALITY), worker.reference.main)  # the quality metric the front reports on test
    for trial in front:
        graph = worker.kept.get(trial.number)  # built by this worker during the search, or built again here
        if graph is None:
            export = trial.user_attrs.get("export")
            graph = worker.build([tuple(s) for s in trial.user_attrs["steps"]], trial.user_attrs.get("finetune"), export,
                                 worker.artefact_folder(trial.number) if export else None)
        again = measure(graph, worker.reference, wanted - set(QUALITY))
        test_quality = graph.score(worker.reference, test) if isinstance(graph, Exported) else worker.reference.score(graph, test)
        run_path = out / "front" / f"trial_{trial.number}.toml"
        _atomic_write(run_path, run_file_text(job, trial, out / "front" / f"trial_{trial.number}"))
        row = {"trial": trial.number, "pipeline": describe_pipeline(trial), "feasible": feasible(trial),
               **{f"val_{k}" if k in QUALITY else k: round(v, 4) for k, v in trial.user_attrs["metrics"].items() if k in wanted},
               f"test_{main}": round(test_quality[main], 4)}
        if "latency" in again:
            row["latency_rerun"] = round(again["latency"], 4)
        rows.append(row)
        graphs[trial.number] = graph
        members.append({**row, "run_file": str(run_path), "steps": trial.user_attrs["steps"], "finetune": trial.user_attrs.get("finetune"),
                        "export": trial.user_attrs.get("export")})
        if best is not None and trial.number == best.number:
            if isinstance(graph, Exported):  # the artefact beside the checkpoint of the graph it came from
                _replace_folder(graph.folder, out / "best_artefact")
                graph = graph.graph
            graph.save(out / "best")  # masks already committed by the worker's build
    if best is not None and all(m["trial"] != best.number for m in members):  # best is always on the front; kept for safety
        log(f"search: the best trial {best.number} is not on the front")
    reference = {"metric": main, "validation": round(worker.reference.quality[main], 4),
                 "test": round(worker.reference.score(worker.dense, test)[main], 4)}
    columns = list(rows[0]) if rows else ["trial"]
    table = Summary(title=f"search {job.study}: Pareto front of {len(done)} completed trials ({len(failed)} failed); "
                          f"input graph validation {reference['validation']}, test {reference['test']}", columns=columns, rows=rows, total_row=False)
    plotted = _plot(job, study, out / "pareto.png") if done else False
    result = {"study": job.study, "objectives": list(job.objectives), "constraints": job.constraints, "completed": len(done),
              "failed": len(failed), "reference": reference, "front": members, "best": None if best is None else best.number,
              "cache": {"hits": worker.cache.hits, "pass_runs": worker.cache.runs},
              "trials": [{"number": t.number, "params": t.params, "metrics": t.user_attrs.get("metrics"), "feasible": feasible(t),
                         **({"repeat_of": t.user_attrs["repeat_of"]} if "repeat_of" in t.user_attrs else {})} for t in done]}
    _atomic_write(out / "search.json", json.dumps(result, indent=2, default=str))
    table.show(log=log)
    log(f"best under the constraints: {'none feasible' if best is None else f'trial {best.number}, checkpoint ' + str(out / 'best')}; "
        f"front run files in {out / 'front'}" + (f"; plot {out / 'pareto.png'}" if plotted else ""))
    return {**result, "table": table, "output": out, "graphs": graphs}
