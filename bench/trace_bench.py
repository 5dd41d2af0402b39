"""Tracing, forward and checkpoint costs on a bert-base sized classifier, side by side.

Builds BertForSequenceClassification at bert-base size from a config (random
weights, no download) and measures, in one run and interleaved so that machine
noise hits both sides alike:

- ``torch.export`` alone (of the same call ``trace`` exports) vs ``trace`` +
  ``init_metadata`` + ``add_common_metadata``;
- forward latency of ``graph.module`` vs the eager model (batch 8, seq 128, no_grad),
  called with every input, and called the way a tokenizer's output calls it (no
  position ids: the graph fills them in, as the model does);
- ``graph.save`` and ``graphprune.load``.

Run: ``python bench/trace_bench.py [--repeats 3] [--forward-iters 20]``; results go to
``bench/results/trace.json``. ``--smoke``: the same on the tiny BERT, once, in seconds.
Targets: trace with metadata <= 1.5x bare export; graph forward <= 1.05x eager.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import graphprune
from graphprune.ir.calls import ModelCall
from graphprune.ir.tracing import _dynamic_shapes
from common import Bench, arguments  # bench/common.py: this script runs from bench/


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="export/trace repetitions (median is reported)")
    parser.add_argument("--forward-iters", type=int, default=20, help="timed forward calls per side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    bench = Bench(args)
    if bench.smoke:
        args.repeats, args.forward_iters, args.batch, args.seq = 1, 2, 2, 16
    model = bench.large_model()  # bert-base: 12 layers, 768 hidden
    inputs = ModelCall.for_model(model).example_inputs(graphprune.dummy_inputs(model))  # what trace exports
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{bench.pick('bert-base', 'tiny')} BertForSequenceClassification, {n_params / 1e6:.1f}M parameters")

    export_times, trace_times = [], []
    graph = None
    for _ in range(args.repeats):
        t, _ = timed(lambda: torch.export.export(model, (), inputs, dynamic_shapes=_dynamic_shapes(inputs), strict=False))
        export_times.append(t)

        def trace_with_metadata():
            g = graphprune.trace(model)
            g, _ = graphprune.run_pipeline(g, [("init_metadata", {}), ("add_common_metadata", {"seq_len": args.seq})])
            return g

        t, graph = timed(trace_with_metadata)
        trace_times.append(t)

    batch = {
        "input_ids": torch.randint(5, model.config.vocab_size, (args.batch, args.seq)),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "token_type_ids": torch.zeros(args.batch, args.seq, dtype=torch.long),
    }
    batch["attention_mask"][: args.batch // 2, args.seq // 2 :] = 0
    short = {k: batch[k] for k in ("input_ids", "attention_mask")}  # what a tokenizer may give
    eager_times, graph_times, eager_short, graph_short = [], [], [], []
    with torch.no_grad():
        for _ in range(3):  # warm-up both
            model(**batch), graph.module(**batch)
        for _ in range(args.forward_iters):
            eager_times.append(timed(lambda: model(**batch))[0])
            graph_times.append(timed(lambda: graph.module(**batch))[0])
            eager_short.append(timed(lambda: model(**short))[0])
            graph_short.append(timed(lambda: graph.module(**short))[0])
        diff = max(
            (graph.module(**b).logits - model(**b).logits).abs().max().item() for b in (batch, short)
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        save_times, load_times = [], []
        for _ in range(args.repeats):
            save_times.append(timed(lambda: graph.save(path))[0])
            t, loaded = timed(lambda: graphprune.load(path))
            load_times.append(t)
        size = sum(f.stat().st_size for f in path.iterdir())
        with torch.no_grad():
            identical = torch.equal(loaded.module(**batch).logits, graph.module(**batch).logits)

    med = statistics.median
    export_t, trace_t = med(export_times), med(trace_times)
    eager_t, graph_t = med(eager_times), med(graph_times)
    rows = [
        ("torch.export alone", f"{export_t:.2f} s", ""),
        ("trace + init_metadata + add_common_metadata", f"{trace_t:.2f} s", f"{trace_t / export_t:.2f}x export (target <= 1.5x)"),
        (f"eager forward (b={args.batch}, s={args.seq})", f"{eager_t * 1e3:.1f} ms", ""),
        ("graph.module forward", f"{graph_t * 1e3:.1f} ms", f"{graph_t / eager_t:.3f}x eager (target <= 1.05x)"),
        ("eager forward, ids + mask only", f"{med(eager_short) * 1e3:.1f} ms", ""),
        ("graph.module forward, ids + mask only", f"{med(graph_short) * 1e3:.1f} ms", f"{med(graph_short) / med(eager_short):.3f}x eager (target <= 1.05x)"),
        ("graph.save", f"{med(save_times):.2f} s", f"{size / 1e6:.0f} MB on disk"),
        ("graphprune.load", f"{med(load_times):.2f} s", f"outputs bit-identical: {identical}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what'.ljust(width)}  {'median':>9}  ratio")
    for what, value, ratio in rows:
        print(f"{what.ljust(width)}  {value:>9}  {ratio}")
    print(f"\nmax |graph - eager| on logits: {diff:.2e}")
    print(graph.summary(seq_len=args.seq))
    bench.claim("trace_vs_export", trace_t / export_t, 1.5, at_most=True, unit="x", words="trace with metadata against bare export")
    bench.claim("graph_vs_eager", graph_t / eager_t, 1.05, at_most=True, unit="x", words="graph forward against eager")
    bench.claim("graph_vs_eager_ids_and_mask", med(graph_short) / med(eager_short), 1.05, at_most=True, unit="x",
                words="graph forward against eager, ids and mask only")
    bench.claim("reload_bit_identical", identical, "bit-identical", met=identical, words="reloaded checkpoint's outputs bit-identical")
    results = {
        "machine": bench.machine,
        "model": f"{bench.pick('bert-base', 'tiny')} BertForSequenceClassification (random weights)",
        "params": n_params,
        "export_s": export_t,
        "trace_with_metadata_s": trace_t,
        "trace_vs_export": trace_t / export_t,
        "eager_forward_ms": eager_t * 1e3,
        "graph_forward_ms": graph_t * 1e3,
        "graph_vs_eager": graph_t / eager_t,
        "graph_vs_eager_ids_and_mask": med(graph_short) / med(eager_short),
        "save_s": med(save_times),
        "load_s": med(load_times),
        "checkpoint_bytes": size,
        "reload_bit_identical": identical,
        "max_abs_diff": diff,
    }
    print(f"wrote {bench.write('trace.json', results)}")


if __name__ == "__main__":
    main()
