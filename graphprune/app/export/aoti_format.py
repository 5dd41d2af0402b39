"""``format = "aoti"``: an AOTInductor package of the fp32 graph or of a lowered int8 graph.

The graph is exported with ``torch.export`` (dynamic ``batch`` and ``sequence``) and
compiled ahead of time by ``torch._inductor.aoti_compile_and_package`` into one
``model.pt2`` file: C++ kernels and the weights, loadable with
``torch._inductor.aoti_load_package`` in a process that never imports graphprune (or
from C++). Freezing is on: it folds the weights into the compiled code, and without
it a lowered graph's int8 patterns fall back to fp32 kernels (pytorch/ao issue 4566).
A lowered graph keeps its int8 scheme, chosen for the CPU it was lowered on.

Options: pooling (headless encoders: none | mean), tokenizer.
"""

from __future__ import annotations

import time
import warnings

import torch

from ...ir.errors import ExportError
from ...ir.exporters import register_exporter
from ...ir.runtime import cxx_compiler, inference_only
from .artefact import staged_folder
from .module import dynamic_shapes, example_args, export_module, max_sequence, reference_outputs, sample_cases, signature
from .verify import finish_artefact

NAME = "export aoti"
MODEL_FILE = "model.pt2"


@register_exporter("aoti")
def export_aoti(graph, path, *, pooling: str | None = None, tokenizer=None, seed: int = 0) -> dict:
    """Export ``graph`` to an AOTInductor artefact folder at ``path``; returns its manifest."""
    if cxx_compiler() is None:
        raise ExportError(f"{NAME}: AOTInductor compiles C++ and no compiler was found (looked for $CXX, g++, c++, clang++); install g++")
    inputs, outputs, task = signature(graph, pooling, NAME)
    lowered = graph.meta.get("lowered") or {}
    if lowered.get("precision") == "bf16":
        raise ExportError(f"{NAME}: a bf16-lowered graph is not supported; export the float graph or an int8-lowered one")
    started = time.perf_counter()
    module = export_module(graph, inputs, outputs)
    cases = sample_cases(graph, inputs, seed=seed)
    reference = reference_outputs(module, cases)
    with staged_folder(path, NAME) as folder:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, example_args(inputs), dynamic_shapes=dynamic_shapes(inputs, max_sequence(graph)), strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(folder / MODEL_FILE), inductor_configs={"freezing": True})
        int8 = inference_only(graph) and lowered.get("precision") == "int8"
        fields = {"precision": "int8" if int8 else "fp32", "scheme": lowered.get("scheme"), "isa": lowered.get("isa"), "cpu": lowered.get("cpu")}
        manifest = finish_artefact(graph, folder, caller=NAME, reference=reference, cases=cases, exact=not int8, started=started,
                                   tokenizer=tokenizer, artefact="aoti", model_file=MODEL_FILE, inputs=inputs, outputs=outputs,
                                   task=task, pooling=pooling, **fields)
    return manifest
