"""Calibration data for data-driven passes, and the inputs their layers see on it, written once.

Passes that need data (Wanda, SparseGPT and Taylor pruning, the structured search)
take it through ``run_pass(..., data=...)`` in any of these forms:

- a :class:`CalibrationData` (examples plus how to tokenise and batch them);
- a ``TextDataset``, tokenised with the tokenizer the graph records
  (``graph.source["tokenizer"]``, set for the MiniLM baseline);
- a list of tokenised example dicts, or an iterable of ready batches (dicts of
  ``(batch, seq)`` tensors, a DataLoader).

:func:`calibration_batches` turns any of them into a fixed list of batches of
``num_samples`` examples, the same on every call, so that passes see the same data.
:func:`collect_linear_inputs` runs those batches through the graph and hands each
chosen Linear layer's input rows to a callback, padding tokens left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ir.graph import Graph
from .batches import data_name, make_batches, on_device, subset
from .data import TextDataset
from .tasks import task_for_data


@dataclass
class CalibrationData:
    """Examples for calibration and how to batch them.

    Attributes:
        data: a TextDataset, a list of tokenised example dicts, or ready batches.
        tokenizer: tokenises a TextDataset (default: the graph's recorded tokenizer).
        max_length: tokens per snippet.
        batch_size: examples per batch.
        collate_fn: collates example dicts (default: HF's padding collator).
    """

    data: Any
    tokenizer: Any = None
    max_length: int = 64
    batch_size: int = 32
    collate_fn: Callable | None = None


def _is_batch(item) -> bool:
    ids = item.get("input_ids") if isinstance(item, Mapping) else None
    return isinstance(ids, torch.Tensor) and ids.dim() == 2


def calibration_batches(
    graph: Graph, data, *, num_samples: int, caller: str, seed: int = 0, needs_targets: bool = False
) -> list[dict[str, torch.Tensor]]:
    """A fixed list of batches holding ``num_samples`` examples of ``data`` (fewer if it has fewer).

    Raises ValueError naming ``caller`` when there is no data, it cannot be
    tokenised, or targets are needed (``needs_targets``) and missing.
    """
    if data is None:
        raise ValueError(
            f"{caller} needs calibration data: pass data=... to run_pass (a TextDataset, a list of tokenised "
            "examples, ready batches, or graphprune.training.calibration.CalibrationData)"
        )
    spec = data if isinstance(data, CalibrationData) else CalibrationData(data)
    examples = spec.data
    if task_for_data(examples) is not None and spec.tokenizer is None:
        recorded = graph.source.get("tokenizer")
        if not recorded:
            raise ValueError(
                f"{caller}: {data_name(examples)} holds raw texts and the graph records no tokenizer; "
                "pass CalibrationData(data, tokenizer) or tokenised examples"
            )
        from .models import load_tokenizer

        spec.tokenizer = load_tokenizer(recorded)
    device = graph.device
    ready = isinstance(examples, torch.utils.data.DataLoader) or (
        isinstance(examples, (list, tuple)) and bool(examples) and _is_batch(examples[0])
    )
    if ready:
        batches = _take(examples, num_samples)
    elif isinstance(examples, (TextDataset, list, tuple, torch.utils.data.Dataset)):
        chosen = subset(examples, num_samples, seed=seed)
        batches = list(
            make_batches(chosen, spec.tokenizer, batch_size=spec.batch_size, max_length=spec.max_length, collate_fn=spec.collate_fn)
        )
    elif isinstance(examples, Iterable):  # a generator of ready batches
        batches = _take(examples, num_samples)
    else:
        raise ValueError(f"{caller}: cannot use {type(examples).__name__} as calibration data")
    if not batches:
        raise ValueError(f"{caller}: the calibration data {data_name(examples)} is empty")
    out = []
    for batch in batches:
        batch = on_device(batch, device)
        if needs_targets and not any(k in batch for k in ("labels", "start_positions")):
            raise ValueError(f"{caller} needs labelled calibration data (the loss's gradient); {data_name(examples)} has no labels")
        out.append(batch)
    return out


def _take(batches: Iterable, num_samples: int) -> list[dict]:
    taken, rows = [], 0
    for batch in batches:
        if rows >= num_samples:
            break
        batch = dict(batch)
        size = len(batch["input_ids"])
        if rows + size > num_samples:
            keep = num_samples - rows
            batch = {k: v[:keep] if isinstance(v, torch.Tensor) and len(v) == size else v for k, v in batch.items()}
            size = keep
        taken.append(batch)
        rows += size
    return taken


# What datasets carry as targets (graphprune.training.data collates "labels").
DATASET_TARGETS = ("labels", "label", "start_positions", "end_positions")


def model_inputs(batch: Mapping, graph: Graph) -> dict:
    """A batch without its loss targets: what a forward pass for statistics takes."""
    from ..ir.calls import model_call_of

    call = model_call_of(graph.module)
    if call is None:
        return {k: v for k, v in batch.items() if k != "labels"}
    # A dataset's labels are no input of a model without a loss (a headless BertModel
    # calibrated on classification snippets): whatever the model's forward does not take goes.
    return {k: v for k, v in batch.items() if k not in call.targets and (k in call.params or k not in DATASET_TARGETS)}


class _Stop(Exception):
    """Raised from a hook once every layer of interest has seen its input."""


@torch.no_grad()
def collect_linear_inputs(
    graph: Graph,
    batches: list[dict],
    modules: Mapping[str, nn.Module],
    on_input: Callable[[str, torch.Tensor], None],
    *,
    stop_early: bool = True,
) -> None:
    """Run ``batches`` through the graph (eval mode) and pass each module's input rows to ``on_input``.

    ``modules`` maps names to modules of the graph. ``on_input(name, rows)`` gets a
    2-D tensor of the module's input, one row per real token (padding tokens
    dropped using the batch's attention mask) or per example for inputs without a
    sequence dimension. With ``stop_early`` a forward pass stops as soon as every
    module has been called as often as the graph calls it, so collecting the
    inputs of early layers costs only the layers before them.
    """
    calls_per_forward = {name: 0 for name in modules}
    by_module = {id(m): name for name, m in modules.items()}
    for node in graph.module.graph.nodes:
        if node.op == "call_module":
            name = by_module.get(id(graph.module.get_submodule(node.target)))
            if name is not None:
                calls_per_forward[name] += 1
    state: dict[str, Any] = {"mask": None, "seen": {}}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                rows = x[mask]
            else:
                rows = x.reshape(-1, x.shape[-1])
            on_input(name, rows)
            state["seen"][name] = state["seen"].get(name, 0) + 1
            if stop_early and all(state["seen"].get(n, 0) >= c for n, c in calls_per_forward.items()):
                raise _Stop

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in modules.items()]
    was_training = graph.module.training
    graph.module.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None
            state["seen"] = {}
            try:
                graph.module(**model_inputs(batch, graph))
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        graph.module.train(was_training)


class StagedForward:
    """Calibration batches run through a graph node by node, paused wherever a pass needs them.

    Passes that change a graph layer by layer (SparseGPT's sequential mode, the
    structured search) need each layer's inputs as the graph, pruned so far,
    computes them. Re-running every batch from the embeddings for every layer costs
    a forward pass per layer; this keeps each batch's live values and resumes from
    where it stopped, so all layers together cost one forward pass. Values no later
    node needs are freed as the run advances.

    Pausing before a node and then changing the module it calls is safe: nothing
    from that node on has been computed yet.

    Example:
        >>> run = StagedForward(graph, batches)
        >>> for node in linear_nodes_in_order:
        ...     run.advance_to(node)
        ...     rows = run.input_rows(node)   # one tensor per batch, real tokens only
        ...     ...                           # prune graph.module.get_submodule(node.target)
    """

    def __init__(self, graph: Graph, batches: list[dict]):
        from ..ir.calls import model_call_of

        self.module = graph.module
        self.nodes = list(self.module.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {}
        for i, node in enumerate(self.nodes):
            for source in node.all_input_nodes:
                self.last_use[source] = i
        call = model_call_of(self.module)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.envs: list[dict] = []
        self.masks: list[torch.Tensor | None] = []
        for batch in batches:
            inputs = model_inputs(batch, graph)
            if call is not None:
                *values, _ = call.bind(inputs, {})
            else:
                values = [inputs[n.target] for n in placeholders]
            self.envs.append(dict(zip(placeholders, values)))
            mask = batch.get("attention_mask")
            self.masks.append(mask.bool() if isinstance(mask, torch.Tensor) else None)
        self.position = 0
        self._interpreter = torch.fx.Interpreter(self.module)

    @torch.no_grad()
    def advance_to(self, node: torch.fx.Node) -> None:
        """Compute, for every batch, every node before ``node`` (with the modules as they are now)."""
        stop = self.index[node]
        if stop < self.position:
            raise ValueError(f"StagedForward is already past {node.name}; it only moves forward")
        was_training = self.module.training
        self.module.eval()
        try:
            for env in self.envs:
                self._interpreter.env = env
                for i in range(self.position, stop):
                    current = self.nodes[i]
                    if current.op != "placeholder":  # inputs are bound up front
                        env[current] = self._interpreter.run_node(current)
                    for source in current.all_input_nodes:
                        if self.last_use.get(source, -1) <= i and source in env:
                            del env[source]
        finally:
            self.module.train(was_training)
        self.position = stop

    def input_rows(self, node: torch.fx.Node, argument: int = 0) -> list[torch.Tensor]:
        """Per batch, ``node``'s input as rows: one per real token (padding dropped) or per example."""
        return self.rows_of(node.args[argument])

    def rows_of(self, source: torch.fx.Node) -> list[torch.Tensor]:
        """Per batch, the value of ``source`` (computed, not yet freed) as rows, padding dropped."""
        rows = []
        for env, mask in zip(self.envs, self.masks):
            x = env[source]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                rows.append(x[mask])
            else:
                rows.append(x.reshape(-1, x.shape[-1]))
        return rows
