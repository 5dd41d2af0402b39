"""graphprune: trace BERT-family models into FX graphs and compress them with passes.

    >>> import graphprune
    >>> graph = graphprune.trace(model)
    >>> graph, _ = graphprune.run_pass(graph, "add_common_metadata")
    >>> print(graph.summary())
    >>> graph.save("ckpt"); same = graphprune.load("ckpt")
"""

from .checkpoint import load
from .config import ConfigError, check_choice, check_range
from .errors import CheckpointError, GraphpruneError, PassError, PipelineError, TraceError
from .graph import Graph
from .modules import AttentionCore, register_module_type
from .pipeline import load_steps, run_pass, run_pipeline
from .registry import get_pass, list_passes, register_pass, unregister_pass
from .tracing import dummy_inputs, trace
from .training import evaluate, finetune
from .schedule import GradualPruning, cubic_sparsity
from .masks import commit_masks, count_parameters

__version__ = "0.1.0"

__all__ = [
    "AttentionCore",
    "CheckpointError",
    "GradualPruning",
    "commit_masks",
    "count_parameters",
    "cubic_sparsity",
    "evaluate",
    "finetune",
    "ConfigError",
    "Graph",
    "GraphpruneError",
    "PassError",
    "PipelineError",
    "TraceError",
    "check_choice",
    "check_range",
    "dummy_inputs",
    "get_pass",
    "list_passes",
    "load",
    "load_steps",
    "register_module_type",
    "register_pass",
    "run_pass",
    "run_pipeline",
    "trace",
    "unregister_pass",
]
