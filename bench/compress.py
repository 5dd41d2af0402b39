"""``graphprune compress`` as a user runs it, on two models, and its artefact timed as it would be served.

1. Rotten Tomatoes: the cached baseline, at most 1 point on validation, ``--time 30m`` (the
   default space and shapes 8x128 and 1x64, all three runtimes).
2. The hand-picked pipeline README's tables recommend (K-prune 0.3 with 2048 calibration
   examples, the demo's 60 distilled steps, int8) in every runtime compress may pick: torch
   (``lower``), AOTInductor int8, ONNX Runtime int8 dynamic and static; its fastest counts.
3. Latency as served: the chosen artefact, the dense references (torch fp32 eager, AOTInductor
   fp32, ONNX Runtime int8 dynamic) and the hand-picked artefacts, each in a process of its
   own (``bench/served.py``), taking turns, at 8x128 and 1x64 (at least 300 calls at 1x64).
   Beside them, compress's own one-process timings of the references; the share is kept only
   where the two agree within 10%.
4. BBC News with the same defaults: MiniLM fine-tuned on it first (cached, 2 epochs at batch
   32, the baseline's recipe at 128 tokens), then ``graphprune compress`` on that checkpoint.

Targets (test split; choices made on validation): on Rotten Tomatoes at most 1 point lost,
at least 3x dense ONNX Runtime int8 and 2x dense AOTInductor fp32 at 8x128, 1.5x dense ONNX
Runtime int8 at 1x64, 1.15x the hand-picked pipeline's fastest runtime; on BBC News at least
2.5x dense ONNX Runtime int8 within 1 point; both runs within 0.85 to 1.10 of the budget.
Writes ``bench/results/compress.json`` as it goes, both runs' ``report.html`` beside it
(``compress_rt_report.html``, ``compress_bbc_report.html``) and ``compress.png``.

Run: ``python bench/compress.py`` (70 minutes on 2 cores with the baseline cached: two
30-minute budgets, the hand-picked pipeline, the served timing and the BBC fine-tune),
``--smoke [--out DIR]`` (the tiny BERT saved as a checkpoint with its tokenizer folder, the
snippets as CSVs, two trials of a tiny space, the hand-picked pipeline without AOTInductor,
neither the served timing nor BBC News: under a minute, meaningless numbers) or ``--plot``
(only ``compress.png`` again, from the JSON in ``--out``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import graphprune
from graphprune.app.compress.run import compress
from graphprune.app.compress.spec import make_spec
from graphprune.app.workflow import shape_batch
from graphprune.ir.errors import CheckpointError
from graphprune.training.baseline import RECIPE, baseline_path, cache_dir
from graphprune.training.data import load_dataset
from graphprune.training.models import load_minilm
from graphprune.ir.tracing import trace
from common import RESULTS, Bench, arguments, hand_picked as hand_picked_pipeline, log, save_figure, table, write_json  # bench/common.py
from served import time_served  # bench/served.py

SHAPES = {"8x128": (8, 128), "1x64": (1, 64)}
CALLS = {"8x128": 60, "1x64": 300}
HAND_PICKED_SAMPLES = 2048  # K-prune's calibration examples in the hand-picked pipeline (bench/common.py's hand_picked)
BBC_RECIPE = {**RECIPE, "max_length": 128}
AGREE = 0.10
# --smoke: the default space's shape with tiny calibration and recovery, so a trial takes seconds
SMOKE_SPACE = {"passes": [{"name": "structured_search", "optional": True, "method": "kprune", "flops": {"choice": [0.3, 0.5]}, "num_samples": 64,
                           "score_samples": 32, "reconstruct_samples": 64, "progress": False},
                          # uncompiled: inductor spends tens of seconds even on the tiny BERT
                          {"name": "lower", "activations": {"choice": ["static", "dynamic"]}, "num_samples": 32, "compile": False}],
               "finetune": {"distill": True, "max_steps": {"choice": [0, 2]}, "batch_size": 8}}


def bbc_model(cache: Path, recipe: dict) -> Path:
    """MiniLM fine-tuned on BBC News (cached as a checkpoint), the model a BBC user would bring."""
    folder = cache / "bbc_news_minilm"
    try:
        if graphprune.load(folder).meta.get("bbc", {}).get("recipe") == recipe:
            return folder
    except CheckpointError:
        pass
    splits = load_dataset("bbc_news")
    model, tokenizer = load_minilm(num_labels=len(splits["train"].label_names))
    graph = trace(model)
    graph.source["tokenizer"] = "minilm"
    config = graph.source.setdefault("config", {})
    config["id2label"] = dict(enumerate(splits["train"].label_names))
    started = time.perf_counter()
    result = graphprune.finetune(graph, splits["train"], tokenizer, eval_data=splits["validation"], progress=False, **recipe)
    graph.meta["bbc"] = {"recipe": recipe, "steps": result.steps, "validation": result.evaluations, "seconds": round(time.perf_counter() - started)}
    graph.save(folder)
    log(f"  fine-tuned MiniLM on BBC News: {result.steps} steps in {graph.meta['bbc']['seconds']} s, validation {result.evaluations[-1] if result.evaluations else '-'}")
    return folder


def hand_picked(bench: Bench, base, work: Path) -> dict:
    """K-prune 0.3 + the demo's recovery + int8, in each runtime compress may pick: name -> folder.

    A smoke run leaves AOTInductor out: its export alone takes longer than the rest of the smoke run's pipeline.
    """
    tokenizer, calibration = bench.tokenizer, bench.calibration()
    search = {"num_samples": 64, "score_samples": 32, "reconstruct_samples": 64} if bench.smoke else {"num_samples": HAND_PICKED_SAMPLES}
    made = hand_picked_pipeline(base, bench.splits["train"], tokenizer, calibration, steps=bench.pick(60, 2), search=search,
                                lower=bench.lower_options)
    graph, lowered = made["recovered"], made["lowered"]
    folders = {"hand-picked torch int8": work / "hand_torch", "hand-picked aoti int8": work / "hand_aoti",
               "hand-picked ort int8 dynamic": work / "hand_ort_dynamic", "hand-picked ort int8 static": work / "hand_ort_static"}
    lowered.save(folders["hand-picked torch int8"])
    if bench.smoke:
        del folders["hand-picked aoti int8"]
    else:
        lowered.export(folders["hand-picked aoti int8"], format="aoti", tokenizer=tokenizer)
    graph.export(folders["hand-picked ort int8 dynamic"], format="onnx", quantize="dynamic", tokenizer=tokenizer)
    graph.export(folders["hand-picked ort int8 static"], format="onnx", quantize="static", tokenizer=tokenizer, data=calibration)
    return folders


def served_rows(result: dict, out: Path, base_folder: Path, extra: dict, validation, tokenizer, work: Path) -> dict:
    """Each model in its own process, in turns, at each shape: ``{shape: {name: ms}}``."""
    refs = out / "dense_references"
    folders = {"chosen": out / "artefact", "dense eager fp32": base_folder, "dense aoti fp32": refs / "dense_aoti_fp32",
               "dense ort int8": refs / "dense_ort_int8", **extra}
    timed = {}
    for shape, (batch, length) in SHAPES.items():
        inputs = {k: v.numpy() for k, v in shape_batch(validation, tokenizer, batch_size=batch, length=length).items()}
        calls = CALLS[shape]
        timed[shape] = time_served(folders, inputs, calls, per_turn=3 if shape == "8x128" else 10, threads=torch.get_num_threads(), work=work)
        log(f"  served at {shape}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in timed[shape].items()))
    return timed


def speedups(timed: dict, hand: list[str]) -> dict:
    out = {}
    for shape, ms in timed.items():
        best_hand = min((ms[h] for h in hand), default=None)
        out[shape] = {"chosen_ms": ms["chosen"], "vs_eager_fp32": ms["dense eager fp32"] / ms["chosen"],
                      "vs_aoti_fp32": ms["dense aoti fp32"] / ms["chosen"], "vs_ort_int8": ms["dense ort int8"] / ms["chosen"],
                      "vs_hand_picked": None if best_hand is None else best_hand / ms["chosen"]}
    return out


def shares(result: dict, timed: dict) -> list[dict]:
    """compress's one-process timings of the dense references beside their served ones: kept where within AGREE."""
    rows = []
    for shape in timed:
        for name in ("dense eager fp32", "dense aoti fp32", "dense ort int8"):
            alone, shared = timed[shape][name], result["dense"]["ms"][name].get(shape)
            rows.append({"shape": shape, "reference": name, "served_ms": alone, "one_process_ms": shared,
                         "agree": shared is not None and abs(shared / alone - 1) <= AGREE})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--time", default="30m", help="each compress run's budget (default 30m)")
    parser.add_argument("--plot", action="store_true", help="only draw compress.png again from compress.json in --out (default bench/results)")
    args = parser.parse_args(argv)
    if args.plot:
        folder = args.out or RESULTS
        plot(json.loads((folder / "compress.json").read_text()), folder / "compress.png")
        return
    bench = Bench(args)
    work = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    budget = bench.pick(args.time, "2m")
    results = {"machine": bench.machine, "budget": budget, "targets": {}, "runs": {}}
    path = bench.out / "compress.json"
    tokenizer, base, splits = bench.tokenizer, bench.baseline(), bench.splits
    # a smoke run has no cached baseline to name: the tiny BERT and its snippets go to compress as a user's files
    model, data = bench.user_files(work / "inputs") if bench.smoke else ({"checkpoint": str(baseline_path())}, {"name": "rotten_tomatoes"})
    smoke = {"narrowing": SMOKE_SPACE, "trials": 2} if bench.smoke else {}

    def run(name: str, model: dict, data: dict) -> dict:
        """``graphprune compress`` as a user runs it; its report copied beside the JSON, its run recorded."""
        log(f"\ngraphprune compress {model} --data {data} --max-drop 1 --time {budget}")
        spec = make_spec(model, data, max_drop=1.0, time=budget, out=work / f"compress_{name}", **smoke)
        result = compress(spec, progress=False, log=log)
        shutil.copy(work / f"compress_{name}" / "report.html", bench.out / f"compress_{name}_report.html")
        results["runs"][name] = {"compress": {k: v for k, v in result.items() if k != "trials"}, "trials": result["trials"]}
        write_json(path, results)  # as it goes; bench.write adds the claims at the end
        return result

    run("rt", model, data)
    log("\nhand-picked pipeline (K-prune 0.3 + 60 distilled steps + int8) in every runtime")
    hand = hand_picked(bench, base, work)
    base_folder = Path(model["checkpoint"])
    rt = results["runs"]["rt"]
    # the served timing starts a process per model and shape (seconds of imports each, a minute in all): a smoke run leaves it out
    if rt["compress"]["chosen"] is not None and not bench.smoke:
        timed = served_rows(rt["compress"], work / "compress_rt", base_folder, hand, splits["validation"], tokenizer, work)
        rt["served_ms"], rt["speedups"], rt["shares"] = timed, speedups(timed, list(hand)), shares(rt["compress"], timed)
        log(table(rt["shares"], ["shape", "reference", "served_ms", "one_process_ms", "agree"], 2))
    write_json(path, results)
    if not bench.smoke:  # BBC News is the same compress call on a MiniLM fine-tuned on real data: a smoke run has neither
        log("\nBBC News: MiniLM fine-tuned on it, then graphprune compress with the same defaults")
        bbc = bbc_model(cache_dir(), BBC_RECIPE)
        result = run("bbc", {"checkpoint": str(bbc)}, {"name": "bbc_news"})
        if result["chosen"] is not None:
            bbc_splits = load_dataset("bbc_news")
            timed = served_rows(result, work / "compress_bbc", bbc, {}, bbc_splits["validation"], tokenizer, work)
            results["runs"]["bbc"].update({"served_ms": timed, "speedups": speedups(timed, [])})
    results["targets"] = targets(results)
    results["seconds"] = round(bench.seconds())
    for key, target in results["targets"].items():
        value, bound = target["value"], target["target"]
        at_most = isinstance(bound, str) and bound.startswith("<=")
        bench.claim(key, value, float(bound[2:]) if at_most else bound, at_most=at_most, met=target["met"], unit="" if "drop" in key or "share" in key else "x")
    bench.write("compress.json", results)
    plot(results, path.with_suffix(".png"))
    log(f"\n{path} ({results['seconds']} s)")


def plot(results: dict, path: Path) -> None:
    """Per run: every trial's validation drop against its speed-up in the search (the chosen one starred, the limit
    dashed); and the served latencies of the chosen artefact beside the dense references and the hand-picked runtimes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(name, run) for name, run in results["runs"].items() if run.get("trials")]
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 8), squeeze=False)
    for column, (name, run) in enumerate(runs):
        done = [t for t in run["trials"] if t["speedup"] and t["drop_points"] is not None and not t["repeat_of"]]
        ax = axes[0][column]
        ax.scatter([t["speedup"] for t in done], [t["drop_points"] for t in done], c=["tab:blue" if t["feasible"] else "tab:gray" for t in done])
        chosen = run["compress"].get("chosen")
        if chosen and chosen["trial"] is not None:
            c = next(t for t in done if t["trial"] == chosen["trial"])
            ax.scatter([c["speedup"]], [c["drop_points"]], marker="*", s=250, color="green", label="chosen", zorder=3)
        ax.axhline(run["compress"]["max_drop"]["points"], ls="--", color="red", label="limit")
        ax.set(xlabel="speed-up over dense eager in the search (8x128)", ylabel="validation points lost", title=f"{name}: every trial")
        ax.legend()
        ax = axes[1][column]
        served = run.get("served_ms") or {}
        for i, (shape, ms) in enumerate(served.items()):
            names = list(ms)
            ax.barh([f"{n} ({shape})" for n in names], [ms[n] for n in names], color=f"C{i}")
        ax.set(xlabel="ms per call, each runtime served in its own process", title=f"{name}: served latency")
        ax.set_xscale("log")
    save_figure(fig, path)
    plt.close(fig)


def targets(results: dict) -> dict:
    out = {}
    for run, keys in (("rt", [("vs_ort_int8", "8x128", 3.0), ("vs_aoti_fp32", "8x128", 2.0), ("vs_ort_int8", "1x64", 1.5), ("vs_hand_picked", "8x128", 1.15)]),
                      ("bbc", [("vs_ort_int8", "8x128", 2.5)])):
        result = results["runs"].get(run, {})
        chosen = (result.get("compress") or {}).get("chosen")
        budget = (result.get("compress") or {}).get("budget", {})
        out[f"{run}_budget_share"] = {"value": budget.get("share"), "target": "0.85 to 1.10",
                                      "met": budget.get("share") is not None and 0.85 <= budget["share"] <= 1.10}
        out[f"{run}_test_drop_points"] = {"value": chosen and chosen["drop_test_points"], "target": "<= 1", "met": bool(chosen) and chosen["drop_test_points"] <= 1}
        for key, shape, target in keys:
            speed = result.get("speedups") or {}
            value = speed.get(shape, {}).get(key)
            out[f"{run}_{key}_{shape}"] = {"value": None if value is None else round(value, 2), "target": target,
                                           "met": value is not None and value >= target and bool(chosen) and chosen["drop_test_points"] <= 1}
    return out


if __name__ == "__main__":
    main()
