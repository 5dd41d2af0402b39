"""int8 ONNX through ONNX Runtime's own quantizer, with the scheme the ``lower`` pass would pick here.

What is quantized: the encoder's Linear layers (MatMul and Gemm nodes with a weight,
found from the export's module scopes), int8 weights per output channel, and the
word embeddings, int8 per row (:mod:`.onnx_embeddings`: they are half of MiniLM's bytes).
``static`` leaves the FFN down-projections in float (``QUANTIZED_KINDS`` says why).
The heads stay float (``graphprune.ir.runtime.FLOAT_HEAD_PREFIXES``), as ``lower``
leaves them, and so do the attention products of two activations.

The scheme: ``u8s8`` where the CPU accumulates int8 in int32 (VNNI or AMX), else
``u8s7``, ONNX Runtime's ``reduce_range`` (7-bit weights), which keeps the AVX2
kernels' int16 pair sums from saturating, as ``lower``'s choice does
(``graphprune.ir.cpu``).

Known trap (onnxruntime issue 25890): the quantizer transposes the weights of Gemm
nodes of dynamo exports without updating their ``value_info`` entries, and the
quantized model then fails to load. The shape annotations are dropped before
quantizing; ONNX Runtime infers shapes itself. Static int8 infers them again first,
with ONNX Runtime's symbolic inference, which knows the optimizer's fused operators:
the calibrator measures only tensors whose type is known.
"""

from __future__ import annotations

import ast
import logging
import uuid
from pathlib import Path

import numpy as np

from ...ir import cpu
from ...ir.calls import model_call_of
from ...ir.errors import ExportError
from ...ir.runtime import FLOAT_HEAD_PREFIXES, is_skipped
from ...training.calibration import calibration_batches, model_inputs
from .onnx_embeddings import quantize_embedding_rows

SCHEMES = ("auto", "u8s8", "u8s7")
SCOPE_PREFIX = "graph_module."  # the attribute ExportModule holds the graph under
FFN_ACTIVATIONS = ("Gelu", "FastGelu", "BiasGelu", "Relu")
# Per kind of node, the modes that quantize it. Static int8 leaves the FFN's down-projection
# in float: its input, the GELU output, has a long positive tail that one calibrated
# per-tensor uint8 scale represents badly (measured on MiniLM: quantizing that group alone
# puts the logits 0.65 (relative L2) from fp32; every other group on its own stays <= 0.17).
# Dynamic scales follow each call's range.
# The word embeddings are quantized per row by graphprune itself, in both modes (see .onnx_embeddings).
QUANTIZED_KINDS = {"linear": ("dynamic", "static"), "ffn_down": ("dynamic",), "embedding": ()}


def resolve_scheme(scheme: str) -> str:
    if scheme != "auto":
        return scheme
    return "u8s8" if cpu.int8_accumulates_in_int32() else "u8s7"


def _module_path(node) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            path = scopes[1] if len(scopes) > 1 else ""
            return path[len(SCOPE_PREFIX):] if path.startswith(SCOPE_PREFIX) else path
    return None


def _is_linear(node) -> bool:
    return any(p.key == "pkg.torch.onnx.class_hierarchy" and "torch.nn.modules.linear.Linear" in p.value for p in node.metadata_props)


def nodes_to_quantize(model) -> dict[str, str]:
    """The encoder's Linear MatMul/Gemm nodes and the word-embedding Gather, heads left out: ``{name: kind}``.

    Kinds: ``"embedding"``, ``"ffn_down"`` (a Linear fed by the FFN's activation) and ``"linear"``.
    """
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    chosen = {}
    for node in model.graph.node:
        path = _module_path(node)
        if path is None or is_skipped(path, FLOAT_HEAD_PREFIXES):
            continue
        if node.op_type in ("MatMul", "Gemm") and _is_linear(node):
            chosen[node.name] = "ffn_down" if producers.get(node.input[0]) in FFN_ACTIVATIONS else "linear"
        elif node.op_type == "Gather" and path.endswith("word_embeddings"):
            chosen[node.name] = "embedding"
    return chosen


def calibration_inputs(graph, data, inputs, num_samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Calibration batches as ONNX feeds: graphprune's calibration data, the same examples ``lower`` uses.

    Inputs a batch leaves out are filled as the model fills them (its recorded call's rules).
    """
    batches = calibration_batches(graph, data, num_samples=num_samples, caller="export onnx (static int8)", seed=seed)
    call = model_call_of(graph.module)
    feeds = []
    for batch in batches:
        complete = call.example_inputs(model_inputs(batch, graph))
        feeds.append({name: complete[name].cpu().numpy().astype(np.int64) for name in inputs})
    return feeds


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def _with_inferred_types(model):
    """``model`` with the type and shape of every tensor, ONNX Runtime's fused operators' outputs included.

    Static calibration only measures tensors whose type it knows, and ONNX's own
    inference cannot type the optimizer's contrib operators (``SkipLayerNormalization``,
    ``BiasGelu``): without this, every Linear fed by one of them would keep float
    activations (weight-only int8). ONNX Runtime's symbolic inference knows them.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as error:  # an operator it does not know: calibrating fewer Linears is still correct
        logging.getLogger(__name__).warning("export onnx: symbolic shape inference failed (%s); some Linears keep float activations", error)
        return model


def quantize(float_file: Path, out_file: Path, mode: str, scheme: str, feeds, candidates: dict[str, str]) -> dict:
    """Quantize the nodes named in ``candidates`` of ``float_file`` into ``out_file``; returns the manifest fields.

    ``candidates`` come from :func:`nodes_to_quantize` on the export before ONNX
    Runtime's optimizer ran: its fused graph keeps the node names, not the module scopes.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    scheme = resolve_scheme(scheme)
    model = onnx.load(str(float_file))
    del model.graph.value_info[:]  # onnxruntime issue 25890, see the module docstring
    present = {node.name for node in model.graph.node}
    chosen = [name for name, kind in candidates.items() if name in present and mode in QUANTIZED_KINDS[kind]]
    if not chosen:  # an empty list would mean "every node" to ONNX Runtime
        raise ExportError(f"export onnx: found no Linear layer to quantize to int8 in the exported graph ({len(candidates)} candidates)")
    embeddings = quantize_embedding_rows(model, {name for name, kind in candidates.items() if kind == "embedding"})
    if mode == "static":
        model = _with_inferred_types(model)
    prepared = float_file.with_name(f".prepared-{uuid.uuid4().hex[:8]}.onnx")
    onnx.save(model, str(prepared))
    logger = logging.getLogger()  # the quantizer logs on the root logger: advice and types it re-infers
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        # Without value_info, the types of some intermediate tensors are not inferred: all are float here.
        common = dict(per_channel=True, reduce_range=scheme == "u8s7", weight_type=QuantType.QInt8, nodes_to_quantize=chosen,
                      extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(out_file), op_types_to_quantize=["MatMul", "Gemm"], **common)
        else:
            quantize_static(
                str(prepared), str(out_file), _Reader(feeds), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax, **common,
            )
    finally:
        logger.setLevel(level)
        prepared.unlink(missing_ok=True)
    return {
        "precision": "int8",
        "quantize": mode,
        "scheme": scheme,
        "isa": cpu.onednn_isa(),
        "cpu": cpu.cpu_name(),
        "quantized_nodes": len(chosen) + embeddings,
        "calibration_batches": len(feeds) if feeds else 0,
    }

