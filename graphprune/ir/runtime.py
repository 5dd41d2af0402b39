"""How a graph runs: eagerly (the default), or compiled for inference after lowering.

A lowered graph (the ``lower`` pass) holds integer or bf16 operations that only
become fast kernels under ``torch.compile`` (inductor). Which compilation it needs is
recorded in ``graph.meta["runtime"]`` (JSON, so checkpoints carry it), and
:func:`apply_runtime` compiles ``graph.module`` in place whenever a ``Graph`` is made:
after the pass, after ``graph.copy()`` (a deep copy of a module never carries its
compiled call: ``nn.Module.__getstate__`` drops it) and after ``graphprune.load``. The
module stays the same ``GraphModule`` (compiled the way ``nn.Module.compile`` does it,
in ``_compiled_call_impl``), so its code, nodes and tensors are still there to read
and save.

Inductor's ``freezing`` (weights folded as constants, int8 weights prepacked for
oneDNN) is what makes the int8 graphs fast; torch reads it only from its global
config (passing it in ``torch.compile(options=...)`` fails for the quantized ops), so
compiling a lowered graph turns it on for the process. It affects only later
compilations of modules in inference mode, where it is torch's recommended setting.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from . import cpu

RUNTIME = "runtime"

# Modules int8 leaves in float, by path prefix (``lower``'s and ONNX int8 export's default):
# the heads are a sliver of the FLOPs and the layers most sensitive to rounding.
FLOAT_HEAD_PREFIXES = ("bert.pooler", "classifier", "roberta.pooler", "pooler", "pre_classifier", "qa_outputs", "cls")


def is_skipped(path: str, prefixes) -> bool:
    """Whether module ``path`` is one of ``prefixes`` or inside one."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use (``$CXX``, g++, c++, clang++), or None."""
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def compile_module(module: nn.Module, *, freezing: bool = True, no_grad: bool = False) -> None:
    """Compile ``module``'s calls in place with dynamic batch and sequence sizes.

    As ``module.compile(dynamic=True)``; with ``no_grad`` every call also runs without
    gradients (kernels of a lowered graph have none, and freezing applies only there).
    """
    import torch._inductor.config as inductor_config

    if freezing:
        inductor_config.freezing = True
    compiled = torch.compile(module._call_impl, dynamic=True)
    module._compiled_call_impl = torch.no_grad()(compiled) if no_grad else compiled


def apply_runtime(graph) -> None:
    """Compile ``graph.module`` when ``graph.meta["runtime"]`` asks for it (idempotent)."""
    runtime = graph.meta.get(RUNTIME) or {}
    if runtime.get("compile") and getattr(graph.module, "_compiled_call_impl", None) is None:
        compile_module(graph.module, freezing=bool(runtime.get("freezing", True)), no_grad=bool(runtime.get("inference_only")))


def inference_only(graph) -> bool:
    """Whether the graph runs kernels without gradients (a lowered graph): no training."""
    return bool((graph.meta.get(RUNTIME) or {}).get("inference_only"))


def machine_mismatch(meta: dict) -> str | None:
    """Why a lowered graph (``meta`` of a checkpoint) does not fit this CPU, or None when it does.

    ``lower`` records the int8 scheme and the oneDNN ISA it chose them for
    (``graph.meta["lowered"]``); checkpoints written before schemes existed were all
    lowered with 8-bit activations ("u8s8").
    """
    lowered = meta.get("lowered") or {}
    if not lowered:
        return None
    where = f"lowered on {lowered.get('cpu') or 'another CPU'} (oneDNN ISA {lowered.get('isa') or 'not recorded'})"
    here = f"this CPU's oneDNN ISA is {cpu.onednn_isa()}"
    relower = "re-lower the float graph on this machine (run_pass(graph, 'lower', ...) or `graphprune run` with the lower pass)"
    if lowered.get("precision") == "bf16":
        if not cpu.native_bf16():
            return f"this bf16 graph was {where}; {here}, without native bf16, so bf16 is emulated and slower than fp32: {relower} to int8"
        return None
    recorded = lowered.get("scheme") or "u8s8"
    if not cpu.exact_at(recorded):
        return (
            f"this int8 graph was {where} with scheme {recorded} (8-bit activations and weights); {here}, without "
            f"VNNI or AMX, where those kernels saturate their int16 pair sums, so its outputs will not be the int8 "
            f"arithmetic it was calibrated for: {relower}, which picks scheme {cpu.int8_scheme()} here"
        )
    if recorded != cpu.int8_scheme() and cpu.int8_accumulates_in_int32():
        return (
            f"this int8 graph was {where} with scheme {recorded} (7-bit activations or weights); {here}, which "
            f"accumulates in int32 and runs 8-bit values exactly: it runs correctly, and {relower} for scheme "
            f"{cpu.int8_scheme()}'s finer steps"
        )
    return None
