"""What a search trial measures: each metric's direction, and the constraints on them.

All ratios are against the job's input graph measured in the same process (a trial that
exports, ``[export]``, is measured as its artefact in its own runtime: ONNX Runtime, the
AOTInductor package or ``from_pretrained``):
``latency`` interleaves the two graphs on the same batch (median of ``iters`` calls, as
:func:`graphprune.training.timing.compare_latency`), so load on the machine hits both.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ...ir.masks import count_parameters, has_uncommitted_masks
from ...training.evaluate import evaluate, main_metric
from ...training.tasks import TASK_TYPES
from ...training.timing import compare_latency, time_interleaved

# The tasks' quality metrics, each maximised, on the validation split (the test split only for the
# front, at the end); a job may name those of its model's task (text classification: accuracy, macro_f1,
# ...; token classification and QA: f1, ...; embedders: mrr@10, mean_cosine, ...).
QUALITY = tuple(dict.fromkeys(m for task in TASK_TYPES.values() for m in task.metrics))
METRICS = {
    **{name: "maximize" for name in QUALITY},
    "latency": "minimize",   # forward time / the input graph's, at [search.latency] batch_size x max_length
    "flops": "minimize",     # FLOPs / the input graph's, at max_length
    "params": "minimize",    # non-zero parameters / the input graph's
    "bits": "minimize",      # average bits per weight (32 in float)
    "size": "minimize",      # checkpoint (or artefact) size on disk, MB
}
CONSTRAINTS = {
    **{f"{name}_drop": f"points of validation {name} lost at most" for name in QUALITY},
    "latency": "latency ratio at most",
    "flops": "FLOPs ratio at most",
    "params": "non-zero parameter ratio at most",
    "bits": "average weight bits at most",
    "size": "checkpoint MB at most",
}


def _flops(graph, max_length: int) -> float:
    return float(graph.summary(seq_len=max_length, batch_size=1).totals["flops"])


def average_weight_bits(graph) -> float:
    lowered = graph.meta.get("lowered")
    if lowered and lowered.get("float_weight_bytes"):
        return 32.0 * lowered["weight_bytes"] / lowered["float_weight_bytes"]
    totals = (graph.meta.get("quantize") or {}).get("totals") or {}
    return float(totals["weight_bits"]) if totals.get("weight_bits") is not None else 32.0


def checkpoint_mb(graph) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        graph.save(Path(tmp) / "ckpt")
        return sum(f.stat().st_size for f in (Path(tmp) / "ckpt").rglob("*") if f.is_file()) / 1e6


@dataclass
class Reference:
    """The input graph's figures, measured once per worker."""

    graph: object
    data: object           # the validation subset trials are scored on
    tokenizer: object
    max_length: int
    latency_inputs: dict
    latency_iters: int
    quality: dict = None   # the input graph's task metrics on ``data``
    flops: float = 0.0
    params: int = 0

    def __post_init__(self):
        self.quality = self.score(self.graph)
        self.main = main_metric(self.graph, self.data)
        self.flops = _flops(self.graph, self.max_length)
        self.params = count_parameters(self.graph)[1]

    @property
    def accuracy(self) -> float:
        """The input graph's main metric on the validation subset (accuracy for classifiers)."""
        return self.quality[self.main]

    def score(self, graph, data=None) -> dict:
        """The task's quality metrics of ``graph`` (fractions), as ``graphprune.evaluate`` gives them."""
        metrics = evaluate(graph, data or self.data, self.tokenizer, max_length=self.max_length, progress=False, reference=self.graph)
        return {k: v for k, v in metrics.items() if k in QUALITY and v is not None}

    def check_names(self, names, caller: str) -> None:
        """Refuse, before any trial, an objective or constraint on a metric this task does not measure."""
        for name in names:
            base = name[: -len("_drop")] if name.endswith("_drop") else name
            if base in QUALITY and base not in self.quality:
                raise ValueError(f"{caller}: {name!r} names a metric this model's task does not measure; it measures "
                                 f"{', '.join(sorted(self.quality))} (main: {self.main}), so use e.g. {self.main!r} or '{self.main}_drop'")


@dataclass
class Exported:
    """A trial's artefact (``[export]``): measured in its own runtime; the graph it came from for FLOPs and parameters."""

    graph: object
    folder: Path

    def __post_init__(self):
        from ..export import load_artefact

        self.artefact = load_artefact(self.folder, threads=torch.get_num_threads())

    def score(self, reference: Reference, data=None) -> dict:
        from ..export import evaluate_artefact

        metrics = evaluate_artefact(self.folder, data or reference.data, reference.tokenizer, max_length=reference.max_length, progress=False,
                                    reference=reference.graph)
        return {k: v for k, v in metrics.items() if k in QUALITY and v is not None}

    def latency(self, reference: Reference) -> float:
        feeds = {k: v.numpy() for k, v in reference.latency_inputs.items() if k in self.artefact.inputs}
        with torch.no_grad():
            ms = time_interleaved({"artefact": lambda: self.artefact(feeds), "input": lambda: reference.graph.module(**reference.latency_inputs)},
                                  iters=reference.latency_iters)
        return ms["artefact"] / ms["input"]

    def megabytes(self) -> float:
        return self.artefact.manifest["model_bytes"] / 1e6


def measure(graph, reference: Reference, wanted: set[str]) -> dict:
    """The metrics in ``wanted`` (the task's quality metrics always, with their drops in points) of a trial's graph or artefact."""
    if isinstance(graph, Exported):
        return _measure_artefact(graph, reference, wanted)
    values = _with_drops(reference.score(graph), reference)
    if "latency" in wanted:
        with torch.no_grad():
            values["latency"] = compare_latency(graph.module, reference.graph.module, reference.latency_inputs, iters=reference.latency_iters)["ratio"]
    if "flops" in wanted:
        values["flops"] = _flops(graph, reference.max_length) / reference.flops
    if "params" in wanted:
        values["params"] = count_parameters(graph)[1] / reference.params
    if "bits" in wanted:
        values["bits"] = average_weight_bits(graph)
    if "size" in wanted:
        values["size"] = checkpoint_mb(graph)
    return values


def _measure_artefact(exported: Exported, reference: Reference, wanted: set[str]) -> dict:
    values = _with_drops(exported.score(reference), reference)
    if "latency" in wanted:
        values["latency"] = exported.latency(reference)
    if "flops" in wanted:
        values["flops"] = _flops(exported.graph, reference.max_length) / reference.flops
    if "params" in wanted:
        values["params"] = count_parameters(exported.graph)[1] / reference.params
    if "bits" in wanted:  # what the file holds per float weight of its graph
        float_bytes = sum(t.numel() * t.element_size() for t in exported.graph.module.state_dict().values())
        values["bits"] = 32.0 * exported.artefact.manifest["model_bytes"] / float_bytes
    if "size" in wanted:
        values["size"] = exported.megabytes()
    return values


def _with_drops(quality: dict, reference: Reference) -> dict:
    drops = {f"{k}_drop": round((reference.quality[k] - v) * 100, 4) for k, v in quality.items() if k in reference.quality}
    return {**quality, **drops}


def needs_commit(graph) -> bool:
    return any(has_uncommitted_masks(m) for m in graph.module.modules())
