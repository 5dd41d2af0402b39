"""Static int8 ONNX: every Linear calibrated, against the Linears behind a fused LayerNorm left weight-only.

ONNX Runtime's calibrator measures only tensors whose type it knows, and ONNX's own
shape inference cannot type the transformer optimizer's `SkipLayerNormalization`: the
export used to leave every Linear fed by one (query, key, value and FFN up-projection
of every layer after the first) with float activations. The export now types them
with ONNX Runtime's symbolic shape inference. This benchmark exports the fine-tuned
baseline both ways, beside ONNX Runtime fp32 and dynamic int8 (the peer), and reports
accuracy on the validation and test splits and latency at batch 8 x 128 and 1 x 64,
every artefact interleaved with the others.

    cd bench && PYTHONPATH=.. python onnx_static.py        # ~5 min with the baseline cached
    cd bench && PYTHONPATH=.. python onnx_static.py --smoke --out DIR   # the tiny BERT: the four exports, seconds each
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from graphprune.app.export import load_artefact, onnx_quantize
from graphprune.app.export.evaluate_artefact import evaluate_artefact
from graphprune.training.timing import time_interleaved
from common import Bench, arguments, table  # bench/common.py

SHAPES = {"b8x128": (8, 128), "b1x64": (1, 64)}


def export_all(base, calibration, folder: Path) -> dict[str, Path]:
    typed = onnx_quantize._with_inferred_types
    variants = {
        "ort fp32": ({}, typed),
        "ort int8 dynamic": ({"quantize": "dynamic"}, typed),
        "ort int8 static, fused outputs untyped": ({"quantize": "static", "data": calibration}, lambda model: model),
        "ort int8 static": ({"quantize": "static", "data": calibration}, typed),
    }
    folders = {}
    try:
        for name, (options, infer) in variants.items():
            onnx_quantize._with_inferred_types = infer  # the untyped variant reproduces the export as it was
            folders[name] = folder / name.replace(" ", "_").replace(",", "")
            base.export(folders[name], format="onnx", **options)
    finally:
        onnx_quantize._with_inferred_types = typed
    return folders


def main(argv: list[str] | None = None) -> None:
    bench = Bench(arguments(__doc__).parse_args(argv))
    base, tokenizer, splits = bench.baseline(), bench.tokenizer, bench.splits
    calibration = bench.calibration()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = export_all(base, calibration, Path(tmp))
        artefacts = {name: load_artefact(folder, threads=torch.get_num_threads()) for name, folder in folders.items()}
        for name, folder in folders.items():
            row = {"runtime": name}
            for split in ("validation", "test"):
                row[f"accuracy_{split}"] = evaluate_artefact(folder, splits[split], tokenizer, progress=False)["accuracy"]
            rows.append(row)
        for shape, (count, length) in SHAPES.items():
            given = tokenizer(splits["test"].texts[:count], padding="max_length", truncation=True, max_length=length, return_tensors="np")
            calls = {name: (lambda a=a: a({k: np.asarray(v, dtype=np.int64) for k, v in given.items() if k in a.inputs}))
                     for name, a in artefacts.items()}
            times = time_interleaved(calls, iters=bench.pick(40, 2))
            for row in rows:
                row[f"ms_{shape}"] = times[row["runtime"]]
                row[f"vs_fp32_{shape}"] = times["ort fp32"] / times[row["runtime"]]
    columns = ["runtime", "accuracy_validation", "accuracy_test", *(f"{k}_{s}" for s in SHAPES for k in ("ms", "vs_fp32"))]
    print(table(rows, columns, digits=3))
    by = {r["runtime"]: r for r in rows}
    now, before = by["ort int8 static"], by["ort int8 static, fused outputs untyped"]
    for shape in SHAPES:
        print(f"static int8, every Linear calibrated vs fused outputs untyped, {shape}: {before[f'ms_{shape}'] / now[f'ms_{shape}']:.2f}x faster")
    lost = round(100 * (by["ort fp32"]["accuracy_test"] - now["accuracy_test"]), 2)
    bench.claim("static_int8_drop_points", lost, 0.5, at_most=True,
                words=f"static int8 test accuracy {now['accuracy_test']:.4f} against fp32 {by['ort fp32']['accuracy_test']:.4f}, points lost")
    print(f"wrote {bench.write('onnx_static.json', {'machine': bench.machine, 'rows': rows, 'seconds': round(bench.seconds())})}")


if __name__ == "__main__":
    main()
