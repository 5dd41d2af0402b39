"""The ``graphprune`` command line.

    graphprune passes                      registered passes, one line each
    graphprune info CKPT                   summary table and history of a checkpoint
    graphprune eval CKPT --data NAME|JOB   the task's metrics on a dataset split (CKPT: a checkpoint or
                                           an exported artefact, run in its own runtime)
    graphprune export CKPT OUT --format F  an artefact folder that runs without graphprune
                                           (onnx [--quantize dynamic|static], aoti, hf)
    graphprune run pipeline.toml           model, data, passes, fine-tune, evaluation, output
    graphprune compress MODEL --data DATA  the fastest artefact within --max-drop points, in --time
    graphprune report DIR                  report.html for a compress or search output folder
    graphprune demo                        the main job on the shipped model and data: compress in 5
                                           minutes (--stages: the fixed pipeline, its two artefacts)

Bad arguments and bad files give a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ..ir import cpu
from ..ir.checkpoint import process_rank
from ..ir.errors import GraphpruneError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise SystemExit(_fail(message))


def _fail(message: str) -> int:
    print(f"graphprune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_passes(args) -> int:
    from ..infra.registry import get_pass, list_passes

    if args.markdown is not None:
        from pathlib import Path

        from .reference import passes_markdown
        from .search.report import _atomic_write

        if args.markdown == "-":
            print(passes_markdown(), end="")
        else:
            _atomic_write(Path(args.markdown), passes_markdown())
        return 0
    passes = list_passes()
    width = max(len(n) for n in passes)
    for name, description in passes.items():
        print(f"{name.ljust(width)}  [{get_pass(name).kind}] {description}")
    return 0


def _cmd_info(args) -> int:
    from ..ir.graph import load

    graph = load(args.checkpoint)
    graph.summary(seq_len=args.seq_len).show()
    print(f"\nsource: {graph.source.get('model_class')}")
    for i, step in enumerate(graph.history, 1):
        print(f"pass {i}: {step['pass']} {step['config']}")
    sparsity = graph.meta.get("sparsity")
    if sparsity:
        totals = sparsity["totals"]
        print(
            f"sparsity: {totals['zero_weights']:,} of {totals['linear_weights']:,} Linear weights are zero "
            f"({totals['weight_sparsity']:.2%}); {totals['activation_pruned_layers']} Linear inputs pruned at run time"
            + ("; masks not committed" if totals.get("masked") else "")
        )
    quantize = graph.meta.get("quantize")
    if quantize:
        totals = quantize["totals"]
        print(
            f"quantization: {totals['quantized_nodes']} nodes in {', '.join(totals['formats']) or 'no format'}; "
            f"average bits per weight {_bits(totals['weight_bits'])}, per activation {_bits(totals['activation_bits'])} "
            f"(one example of {totals['seq_len']} tokens; unquantized float32 counts 32)"
        )
    lowered = graph.meta.get("lowered")
    if lowered:
        print(
            f"lowered: {lowered['lowered_linears']} Linears on {lowered['precision']} kernels"
            + (f" ({lowered['activations']} activation scales)" if lowered.get("activations") else "")
            + f"; tensors {lowered['weight_bytes'] / 1e6:.1f} MB (before lowering {lowered['float_weight_bytes'] / 1e6:.1f} MB); "
            + ("runs compiled (torch.compile, inductor), " if lowered.get("compiled") else "runs eagerly, ")
            + "inference only"
        )
        if lowered.get("precision") == "int8":
            print(
                f"int8 scheme: {lowered.get('scheme') or 'u8s8 (not recorded: lowered before schemes)'}, chosen for oneDNN ISA "
                f"{lowered.get('isa') or '-'} on {lowered.get('cpu') or 'an unrecorded CPU'}; this CPU's ISA {cpu.onednn_isa()} "
                f"needs {cpu.int8_scheme()}"
            )
    for key, value in graph.meta.items():
        if key not in ("common", "sparsity", "quantize", "lowered", "runtime"):
            print(f"{key}: {value}")
    return 0


def _bits(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _metrics_line(metrics: dict, main: str) -> str:
    """``f1 0.8123  precision 0.8000  recall 0.8250  loss 0.2100``: the main metric first, then the rest."""
    names = [main] + [k for k in metrics if k not in (main, "examples") and metrics[k] is not None]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in names)


def _cmd_eval(args) -> int:
    from ..ir.graph import load
    from ..training.evaluate import evaluate, main_metric
    from ..training.models import load_tokenizer
    from ..training.tasks import task_for
    from .job_inputs import check_data_argument, data_argument
    from .workflow import check_labels

    check_data_argument(args.data)  # before a checkpoint loads
    if (Path(args.checkpoint) / "artefact.json").is_file():
        return _eval_artefact(args)
    graph = load(args.checkpoint)
    task = task_for(graph, "graphprune eval")
    splits = data_argument(args.data, task.name, graph.source.get("label_names") or None)
    if args.split not in splits:
        return _fail(f"--split {args.split!r} is not one of {sorted(splits)}")
    data = splits[args.split].subset(args.limit)
    check_labels(graph, data)
    tokenizer = load_tokenizer(graph.source.get("tokenizer", "minilm"))
    metrics = evaluate(graph, data, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    print(f"{splits[args.split].name}: {_metrics_line(metrics, main_metric(task, data))}  ({metrics['examples']} examples)")
    return 0


def _eval_artefact(args) -> int:
    from ..training.evaluate import main_metric
    from .export import evaluate_artefact, read_manifest
    from .export.evaluate_artefact import task_of_manifest
    from .job_inputs import data_argument

    manifest = read_manifest(args.checkpoint)
    labels = manifest.get("labels") or []
    task = task_of_manifest(manifest)
    splits = data_argument(args.data, task.name, tuple(labels) or None)
    if args.split not in splits:
        return _fail(f"--split {args.split!r} is not one of {sorted(splits)}")
    data = splits[args.split].subset(args.limit)
    names = getattr(data, "label_names", ())
    if labels and names and len(labels) != len(names):
        return _fail(f"the artefact has {len(labels)} labels but {data.name} has {len(names)} ({', '.join(names)})")
    key = f"{splits[args.split].name}" + (f" (limit {args.limit})" if args.limit else "")
    metrics = evaluate_artefact(args.checkpoint, data, batch_size=args.batch_size, max_length=args.max_length, record=key)
    kind = manifest["artefact"] + (f" {manifest['precision']}" if manifest.get("precision") else "")
    print(f"{splits[args.split].name}: {_metrics_line(metrics, main_metric(task, data))}  ({metrics['examples']} examples; "
          f"{kind} artefact in its own runtime; recorded in its artefact.json)")
    return 0


def _cmd_export(args) -> int:
    from ..ir.graph import load

    graph = load(args.checkpoint)
    options = {}
    if args.pooling:
        options["pooling"] = args.pooling
    if args.quantize:
        if args.format != "onnx":
            return _fail(f"--quantize is for --format onnx (ONNX Runtime's quantizer); for an int8 {args.format} artefact, lower the graph first")
        options["quantize"] = args.quantize
        if args.quantize == "static":
            from ..training.calibration import CalibrationData
            from ..training.models import load_tokenizer
            from ..training.tasks import task_for
            from .job_inputs import data_argument

            if not args.data:
                return _fail("--quantize static needs --data NAME or a job file for its calibration examples (the train split is used)")
            tokenizer = load_tokenizer(graph.source.get("tokenizer", "minilm"))
            splits = data_argument(args.data, task_for(graph, "graphprune export").name, graph.source.get("label_names") or None)
            options["data"] = CalibrationData(splits["train"], tokenizer, max_length=args.max_length)
            options["num_samples"] = args.num_samples
    if args.format == "onnx" and args.no_optimize:
        options["optimize"] = False
    manifest = graph.export(args.output, format=args.format, **options)
    check = manifest["verification"]
    agreement = check.get("argmax_agreement")
    print(
        f"wrote {args.output}: {manifest['artefact']} {manifest.get('precision', '')}, {manifest['model_bytes'] / 1e6:.1f} MB model file, "
        f"inputs {', '.join(manifest['inputs'])}, outputs {', '.join(manifest['outputs'])}"
    )
    print(
        f"checked in a fresh process in its own runtime: max abs diff {check['max_abs_diff']:.3g} from the graph"
        + (f", argmax agreement {agreement:.1%}" if agreement is not None else "")
        + f" ({manifest['export_seconds']} s)"
    )
    optimizer = manifest.get("optimizer")
    if optimizer:
        print("ONNX Runtime transformer optimizer: " + (f"fused {optimizer['fused']}" if optimizer["used"] else optimizer["reason"]))
    return 0


def _cmd_run(args) -> int:
    from .run_file import run_file

    run_file(args.pipeline)
    return 0


def _cmd_search(args) -> int:
    from .search import search

    search(args.job, storage=args.storage, workers=args.workers, trials=args.trials, report_front=not args.worker_only,
           progress=not args.no_progress, worker_index=args.worker_index, stop_at=args.stop_at, trial_estimate=args.trial_estimate)
    return 0


def _cmd_compress(args) -> int:
    from .compress import compress

    result = compress(args.model, args.data, task=args.task, max_drop=args.max_drop, time=args.time, trials=args.trials, shapes=args.shapes,
                      runtimes=args.runtimes, out=args.out, storage=args.storage, workers=args.workers, progress=not args.no_progress)
    return 0 if result["chosen"] is not None else 1


def _cmd_report(args) -> int:
    from .compress.html import write_report

    print(write_report(args.folder))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_compress_demo, run_demo

    fixed = args.stages is not None or args.recovery_steps is not None or args.eval_limit is not None
    if not fixed:
        result = run_compress_demo(args.cache, time=args.time, output=args.output)
        return 0 if result["chosen"] is not None else 1
    run_demo(args.cache, recovery_steps=60 if args.recovery_steps is None else args.recovery_steps, eval_limit=args.eval_limit,
             stages=(args.stages or "kprune,deploy").split(","), output=args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphprune", description="Compress BERT-family transformers with graph passes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    passes = sub.add_parser("passes", help="list registered passes")
    passes.add_argument("--markdown", metavar="FILE", nargs="?", const="-", default=None,
                        help="write the passes reference page (Markdown) to FILE, or print it")
    passes.set_defaults(fn=_cmd_passes)
    info = sub.add_parser("info", help="summary of a checkpoint")
    info.add_argument("checkpoint")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs")
    info.set_defaults(fn=_cmd_info)
    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", required=True, help="a built-in data set (rotten_tomatoes, bbc_news) or a job file whose [data] names your files")
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int, default=None, help="evaluate on a seeded subset of this size")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-length", type=int, default=64)
    ev.set_defaults(fn=_cmd_eval)
    export = sub.add_parser("export", help="export a checkpoint to an artefact folder that runs without graphprune")
    export.add_argument("checkpoint")
    export.add_argument("output")
    export.add_argument("--format", required=True, choices=["onnx", "aoti", "hf"])
    export.add_argument("--quantize", choices=["dynamic", "static"], default=None, help="int8 through ONNX Runtime's quantizer (onnx)")
    export.add_argument("--data", default=None, help="calibration data for --quantize static: a built-in data set or a job file with [data]")
    export.add_argument("--num-samples", type=int, default=128, help="calibration examples for --quantize static")
    export.add_argument("--max-length", type=int, default=64)
    export.add_argument("--pooling", choices=["mean"], default=None, help="headless encoders: add the mean-pooled sentence_embedding")
    export.add_argument("--no-optimize", action="store_true", help="onnx: skip ONNX Runtime's transformer optimizer")
    export.set_defaults(fn=_cmd_export)
    run = sub.add_parser("run", help="run a TOML pipeline file")
    run.add_argument("pipeline")
    run.set_defaults(fn=_cmd_run)
    search = sub.add_parser("search", help="search pass pipelines with Optuna (a TOML search job)")
    search.add_argument("job")
    search.add_argument("--storage", default=None, help="an Optuna RDB URL shared by workers on several machines (default: <job>.journal)")
    search.add_argument("--workers", type=int, default=1, help="worker processes to start here (default 1)")
    search.add_argument("--trials", type=int, default=None, help="completed trials to reach (default: the job's [search] trials)")
    search.add_argument("--worker-only", action="store_true", help="run trials only; leave the report to another process")
    search.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    search.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)  # compress --workers: its budget's deadline
    search.add_argument("--trial-estimate", type=float, default=0.0, help=argparse.SUPPRESS)
    search.add_argument("--no-progress", action="store_true", help="no progress bar")
    search.set_defaults(fn=_cmd_search)
    comp = sub.add_parser("compress", help="the fastest artefact within a stated loss, in a time budget, with report.html")
    comp.add_argument("model", help="a built-in model (baseline, minilm), a checkpoint or save_pretrained folder, or a job file with [compress]")
    comp.add_argument("--data", default=None, help="a built-in data set or a job file whose [data] names your files (default rotten_tomatoes)")
    comp.add_argument("--task", default=None, help="the model's task (HF pipeline name) where its config does not say")
    comp.add_argument("--max-drop", default=None, help="points of the main metric lost on validation at most (default 1; '1%%' is relative)")
    comp.add_argument("--time", default=None, help="the whole run's budget: 90s, 30m, 1h (default 30m)")
    comp.add_argument("--trials", type=int, default=None, help="at most this many trials")
    comp.add_argument("--shapes", default=None, help="batch x length to time, the first one searched (default 8x128,1x64)")
    comp.add_argument("--runtimes", default=None, help="of onnx, aoti, torch (default all)")
    comp.add_argument("--out", default=None, help="output folder (default ./compressed; a job file's: beside it)")
    comp.add_argument("--storage", default=None, help="an Optuna RDB URL shared by workers on several machines")
    comp.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    comp.add_argument("--no-progress", action="store_true", help="no progress line")
    comp.set_defaults(fn=_cmd_compress)
    rep = sub.add_parser("report", help="write report.html for a compress or search output folder")
    rep.add_argument("folder")
    rep.set_defaults(fn=_cmd_report)
    demo = sub.add_parser("demo", help="the main job on the shipped model and data")
    demo.add_argument("--cache", default=None, help="cache folder for the baseline (default $GRAPHPRUNE_CACHE or ~/.cache/graphprune)")
    demo.add_argument("--time", default="5m", help="the compress run's budget (default 5m)")
    demo.add_argument("--stages", default=None, help="the fixed pipeline instead of compress: comma-separated, of unstructured, kprune, "
                                                     "deploy (kprune,deploy when only --recovery-steps or --eval-limit is given)")
    demo.add_argument("--recovery-steps", type=int, default=None, help="the fixed pipeline's recovery steps (default 60)")
    demo.add_argument("--eval-limit", type=int, default=None, help="the fixed pipeline: evaluate on this many test snippets")
    demo.add_argument("--output", default="demo-artefacts", help="folder for the exported artefacts (default ./demo-artefacts)")
    demo.set_defaults(fn=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    for name in ("limit", "batch_size", "max_length", "seq_len", "recovery_steps", "eval_limit", "num_samples", "workers", "trials"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    quiet = process_rank() != 0
    # Under `accelerate launch` every process runs the command; the others stay quiet (they
    # compute the same tables) and write no checkpoint (Graph.save writes from rank 0).
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
        bars = os.environ.get("TQDM_DISABLE")
        if quiet:
            os.environ["TQDM_DISABLE"] = "1"
        try:
            return args.fn(args)
        except (GraphpruneError, ValueError, FileNotFoundError) as error:  # TOML errors are ValueErrors
            return _fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
        except KeyboardInterrupt:
            return _fail("interrupted")
        finally:
            if quiet and bars is None:
                del os.environ["TQDM_DISABLE"]
            elif quiet:
                os.environ["TQDM_DISABLE"] = bars


if __name__ == "__main__":
    sys.exit(main())
