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
from ...training.evaluate import evaluate
from ...training.timing import compare_latency, time_interleaved

METRICS = {
    "accuracy": "maximize",  # on the validation split (the test split only for the front, at the end)
    "latency": "minimize",   # forward time / the input graph's, at [search.latency] batch_size x max_length
    "flops": "minimize",     # FLOPs / the input graph's, at max_length
    "params": "minimize",    # non-zero parameters / the input graph's
    "bits": "minimize",      # average bits per weight (32 in float)
    "size": "minimize",      # checkpoint (or artefact) size on disk, MB
}
CONSTRAINTS = {
    "accuracy_drop": "points of validation accuracy lost at most",
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
    accuracy: float = 0.0
    flops: float = 0.0
    params: int = 0

    def __post_init__(self):
        self.accuracy = self.score(self.graph)
        self.flops = _flops(self.graph, self.max_length)
        self.params = count_parameters(self.graph)[1]

    def score(self, graph, data=None) -> float:
        return evaluate(graph, data or self.data, self.tokenizer, max_length=self.max_length, progress=False)["accuracy"]


@dataclass
class Exported:
    """A trial's artefact (``[export]``): measured in its own runtime; the graph it came from for FLOPs and parameters."""

    graph: object
    folder: Path

    def __post_init__(self):
        from ..export import load_artefact

        self.artefact = load_artefact(self.folder, threads=torch.get_num_threads())

    def score(self, reference: Reference, data=None) -> float:
        from ..export import evaluate_artefact

        return evaluate_artefact(self.folder, data or reference.data, reference.tokenizer, max_length=reference.max_length, progress=False)["accuracy"]

    def latency(self, reference: Reference) -> float:
        feeds = {k: v.numpy() for k, v in reference.latency_inputs.items() if k in self.artefact.inputs}
        with torch.no_grad():
            ms = time_interleaved({"artefact": lambda: self.artefact(feeds), "input": lambda: reference.graph.module(**reference.latency_inputs)},
                                  iters=reference.latency_iters)
        return ms["artefact"] / ms["input"]

    def megabytes(self) -> float:
        return self.artefact.manifest["model_bytes"] / 1e6


def measure(graph, reference: Reference, wanted: set[str]) -> dict:
    """The metrics in ``wanted`` (accuracy always) of a trial's graph or artefact (:class:`Exported`)."""
    if isinstance(graph, Exported):
        return _measure_artefact(graph, reference, wanted)
    values = {"accuracy": reference.score(graph)}
    values["accuracy_drop"] = round((reference.accuracy - values["accuracy"]) * 100, 4)
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
    values = {"accuracy": exported.score(reference)}
    values["accuracy_drop"] = round((reference.accuracy - values["accuracy"]) * 100, 4)
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


def needs_commit(graph) -> bool:
    return any(has_uncommitted_masks(m) for m in graph.module.modules())
