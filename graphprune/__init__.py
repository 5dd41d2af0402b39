"""graphprune: trace BERT-family models into FX graphs and compress them with passes.

    >>> import graphprune
    >>> graph = graphprune.trace(model)
    >>> graph, _ = graphprune.run_pass(graph, "add_common_metadata")
    >>> print(graph.summary())
    >>> graph.save("ckpt"); same = graphprune.load("ckpt")

The package is layered; each layer imports only the ones listed before it:
``graphprune.ir`` (the graph IR), ``graphprune.infra`` (pass configs, registry,
pipelines), ``graphprune.training`` (data, models, evaluation, fine-tuning) and
``graphprune.app`` (CLI, job files, demo). This module gathers the public API.
"""

import logging as _logging


class _DropLines(_logging.Filter):
    """Drops log records whose message contains all of ``parts``."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(part in message for part in self.parts)


# torchao, which transformers imports whenever it is installed, logs two kinds of noise
# on every model load: its CUDA-only kernel libraries failing to load on a CPU machine,
# and a deprecation notice meant for its own developers. Neither concerns a user here.
_logging.getLogger("torchao").addFilter(_DropLines("Failed to load", "/torchao/_C"))
_logging.getLogger("torch.utils._pytree").addFilter(_DropLines("register_constant() on Enum subclasses is deprecated"))
# torch.onnx's exporter lists the torchvision ops it skips registering on every export.
_logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_DropLines("torchvision is not installed"))

from .infra.config import ConfigError, check_choice, check_range  # noqa: E402  (after the log filters)
from .infra.errors import PassError, PipelineError
from .infra.pipeline import load_steps, run_pass, run_pipeline
from .infra.registry import get_pass, list_passes, register_pass, unregister_pass
from .ir.errors import CheckpointError, ExportError, GraphpruneError, InputError, LoweredForAnotherCPU, TraceError
from .ir.graph import Graph, load
from .ir.masks import commit_masks, count_parameters
from .ir.modules import AttentionCore, register_module_type
from .ir.tracing import dummy_inputs, trace
from .training.calibration import CalibrationData
from .training.evaluate import evaluate
from .training.finetune import finetune
from .training.user_data import load_data
from .training.user_model import load_model
from .training.iterative import iterative_prune
from .training.schedule import GradualPruning, cubic_sparsity
from .ir.exporters import export_formats, register_exporter
from .app.export import evaluate_artefact, load_artefact  # registers the built-in export formats
from .app.search import search
from .app.compress import compress

__version__ = "0.1.0"

__all__ = [
    "AttentionCore",
    "CalibrationData",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "Graph",
    "GradualPruning",
    "GraphpruneError",
    "InputError",
    "LoweredForAnotherCPU",
    "PassError",
    "PipelineError",
    "TraceError",
    "check_choice",
    "check_range",
    "commit_masks",
    "compress",
    "count_parameters",
    "cubic_sparsity",
    "dummy_inputs",
    "evaluate",
    "evaluate_artefact",
    "export_formats",
    "finetune",
    "search",
    "get_pass",
    "iterative_prune",
    "list_passes",
    "load",
    "load_data",
    "load_model",
    "load_artefact",
    "load_steps",
    "register_module_type",
    "register_exporter",
    "register_pass",
    "run_pass",
    "run_pipeline",
    "trace",
    "unregister_pass",
]
