"""Exports: a compressed graph as an artefact folder that runs without graphprune.

    graph.export("artefacts/minilm", format="onnx")                        # ONNX Runtime, fp32
    graph.export("artefacts/minilm-int8", format="onnx", quantize="dynamic")
    graph.export("artefacts/minilm-aoti", format="aoti")                   # AOTInductor package
    graph.export("artefacts/minilm-hf", format="hf")                       # save_pretrained folder

or ``graphprune export CKPT OUT --format onnx --quantize dynamic``. Formats:
:mod:`.onnx_format`, :mod:`.aoti_format`, :mod:`.hf_format`. Each folder holds the
model file, the tokenizer files, ``predict.py`` (runs it without graphprune) and
``artefact.json`` (:mod:`.artefact`), and is checked in its own runtime in a fresh
process before it appears (:mod:`.verify`). :func:`.evaluate_artefact.evaluate_artefact`
(``graphprune eval ARTEFACT``) measures an artefact's accuracy in its own runtime.
"""

from . import aoti_format, hf_format, onnx_format  # noqa: F401  (each registers its format)
from .evaluate_artefact import evaluate_artefact
from .standalone import load as load_artefact
from .standalone import read_manifest

__all__ = ["evaluate_artefact", "load_artefact", "read_manifest"]
