"""``format = "onnx"``: an ONNX Runtime artefact, fp32 or int8 through ONNX Runtime's own quantizer.

- The graph is exported with ``torch.onnx.export(..., dynamo=True)``: dynamic axes
  ``batch`` and ``sequence``, the model's own input names, weights in one file
  (external data only above protobuf's 2 GB). Masks and simulated weight formats are
  folded into the weights first; uneven heads, FFN widths and layers export as they are.
- ``optimize = true`` (default) tries ONNX Runtime's transformer optimizer
  (``model_type="bert"``: attention, LayerNorm, GELU fusions) and keeps its graph
  only if it computes the same outputs (:mod:`.onnx_optimize`).
- ``quantize = "dynamic"``: ``quantize_dynamic``, int8 weights per output channel,
  activation scales per call; ``"static"``: ``quantize_static`` in QDQ format, scales
  calibrated on ``num_samples`` examples of ``data`` (:mod:`.onnx_quantize`).

Options: quantize (none | dynamic | static), data and num_samples (static),
optimize, pooling (headless encoders: none | mean), scheme (auto | u8s8 | u8s7),
tokenizer, opset.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from ...ir.errors import ExportError
from ...ir.exporters import register_exporter
from ...ir.runtime import inference_only
from .artefact import staged_folder
from .module import check_option, dynamic_shapes, example_args, export_module, max_sequence, reference_outputs, sample_cases, signature
from .onnx_optimize import try_optimize
from .onnx_quantize import SCHEMES, calibration_inputs, nodes_to_quantize
from .onnx_quantize import quantize as quantize_onnx
from .verify import finish_artefact

NAME = "export onnx"
MODEL_FILE = "model.onnx"
QUANTIZE = (None, "dynamic", "static")
TWO_GB = 2 * 1024**3


def _require_onnx() -> None:
    missing = []
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ExportError(f"{NAME}: needs {', '.join(missing)}: pip install {' '.join(missing)} (make install does)")


def write_onnx(module, inputs, outputs, file: Path, *, max_len: int | None, opset: int | None = None) -> None:
    """``torch.onnx.export`` (dynamo) of ``module`` to ``file``, weights inside unless above 2 GB."""
    args = example_args(inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes=dynamic_shapes(inputs, max_len), opset_version=opset, verbose=False,
        )
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    program.save(str(file), external_data=weights >= TWO_GB)


@register_exporter("onnx")
def export_onnx(
    graph,
    path,
    *,
    quantize: str | None = None,
    data=None,
    num_samples: int = 128,
    optimize: bool = True,
    pooling: str | None = None,
    scheme: str = "auto",
    tokenizer=None,
    opset: int | None = None,
    seed: int = 0,
) -> dict:
    """Export ``graph`` to an ONNX Runtime artefact folder at ``path``; returns its manifest."""
    check_option(NAME, "quantize", quantize, QUANTIZE)
    check_option(NAME, "scheme", scheme, SCHEMES)
    if num_samples < 1:
        raise ExportError(f"{NAME}: num_samples must be at least 1, got {num_samples}")
    if inference_only(graph):
        raise ExportError(
            f"{NAME}: the graph was lowered to torchao int8 kernels, which ONNX has no ops for; export the float "
            "graph with quantize = 'dynamic' or 'static' (ONNX Runtime's int8), or this one with format 'aoti'"
        )
    if quantize == "static" and data is None:
        raise ExportError(f"{NAME}: quantize = 'static' needs calibration data: pass data=... (a TextDataset, CalibrationData, examples or batches)")
    _require_onnx()
    import onnx

    inputs, outputs, task = signature(graph, pooling, NAME)
    started = time.perf_counter()
    module = export_module(graph, inputs, outputs)
    cases = sample_cases(graph, inputs, seed=seed)
    reference = reference_outputs(module, cases)
    with staged_folder(path, NAME) as folder:
        float_file = folder / (MODEL_FILE if quantize is None else ".float.onnx")
        write_onnx(module, inputs, outputs, float_file, max_len=max_sequence(graph), opset=opset)
        candidates = nodes_to_quantize(onnx.load(str(float_file), load_external_data=False)) if quantize else []
        optimizer = try_optimize(float_file, cases, enabled=optimize)
        fields = {"precision": "fp32", "quantize": None, "optimizer": optimizer}
        if quantize is not None:
            batches = calibration_inputs(graph, data, inputs, num_samples, seed) if quantize == "static" else None
            fields.update(quantize_onnx(float_file, folder / MODEL_FILE, quantize, scheme, batches, candidates))
            float_file.unlink()
        manifest = finish_artefact(graph, folder, caller=NAME, reference=reference, cases=cases, exact=quantize is None, started=started,
                                   tokenizer=tokenizer, artefact="onnx", model_file=MODEL_FILE, inputs=inputs, outputs=outputs,
                                   task=task, pooling=pooling, **fields)
    return manifest
