"""What every export format starts from: the graph as a module of the model's own inputs and outputs.

Exported artefacts take ``input_ids``, ``attention_mask`` and (where the model has
it) ``token_type_ids``, positionally in that order, and return the head's outputs
(``logits``; ``start_logits`` and ``end_logits`` for question answering) or, for a
headless encoder, ``last_hidden_state`` and, with ``pooling = "mean"``, the
``sentence_embedding`` (the attended tokens' mean, as sentence-transformers pools).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...ir.calls import model_call_of
from ...ir.errors import ExportError
from ...ir.graph import Graph
from ...ir.masks import commit_masks
from ...ir.runtime import inference_only

ARTEFACT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_OUTPUTS = {
    "sequence_classification": ("logits",),
    "token_classification": ("logits",),
    "masked_lm": ("logits",),
    "question_answering": ("start_logits", "end_logits"),
}
POOLINGS = (None, "mean")


class ExportModule(nn.Module):
    """``forward(input_ids, attention_mask, token_type_ids=None)`` -> the artefact's outputs (a tensor or a tuple)."""

    def __init__(self, graph_module: nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        super().__init__()
        self.graph_module = graph_module
        self.input_names = inputs
        self.output_names = outputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        # .forward, not __call__: a lowered graph's compiled call must not be traced through
        out = self.graph_module.forward(**{k: given[k] for k in self.input_names})
        values = []
        for name in self.output_names:
            if name == "sentence_embedding":
                mask = attention_mask.unsqueeze(-1).to(out["last_hidden_state"].dtype)
                values.append((out["last_hidden_state"] * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
            else:
                values.append(out[name])
        return values[0] if len(values) == 1 else tuple(values)


def check_option(caller: str, field: str, value, allowed) -> None:
    """An export option outside ``allowed``: an ExportError naming the format, the field, the value and the choices."""
    if value not in allowed:
        choices = ", ".join("none" if a is None else repr(a) for a in allowed)
        raise ExportError(f"{caller}: {field} {value!r} is not one of: {choices}")


def signature(graph: Graph, pooling: str | None, caller: str) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """``(inputs, outputs, task)`` of the artefact made from ``graph``."""
    call = model_call_of(graph.module)
    if call is None:
        raise ExportError(f"{caller}: the graph has no recorded model call (trace a HF model with graphprune.trace)")
    check_option(caller, "pooling", pooling, POOLINGS)
    if call.task == "unsupported":
        raise ExportError(f"{caller}: {call.model_class}'s outputs are not ones graphprune exports (heads: {', '.join(HEAD_OUTPUTS)}; or a headless encoder)")
    if call.task is not None and pooling is not None:
        raise ExportError(f"{caller}: pooling {pooling!r} is for headless encoders (BertModel, ...); {call.model_class} has a {call.task} head")
    if "attention_mask" not in call.graph_inputs:
        raise ExportError(f"{caller}: {call.model_class} takes no attention_mask; graphprune exports models that do")
    inputs = tuple(n for n in ARTEFACT_INPUTS if n in call.graph_inputs)
    outputs = HEAD_OUTPUTS.get(call.task, ("last_hidden_state",) + (("sentence_embedding",) if pooling else ()))
    return inputs, outputs, call.task


def float_copy(graph: Graph) -> Graph:
    """A copy on the CPU in eval mode with masks and simulated weight formats folded into the weights.

    Simulated activation quantizers stay: they are ordinary float ops (round, clamp)
    and export as such, so the artefact computes exactly what the graph does.
    """
    work = graph.copy()
    if work.device.type != "cpu":
        work.to("cpu")
    commit_masks(work)
    work.module.eval()
    return work


def export_module(graph: Graph, inputs, outputs) -> ExportModule:
    """The module to export: of a float copy, or of a lowered graph itself (nothing to fold; never trained)."""
    source = graph if inference_only(graph) else float_copy(graph)
    return ExportModule(source.module, tuple(inputs), tuple(outputs)).eval()


def max_sequence(graph: Graph) -> int | None:
    config = graph.source.get("config") or {}
    return config.get("max_position_embeddings")


def vocab_size(graph: Graph) -> int:
    config = graph.source.get("config") or {}
    return int(config.get("vocab_size") or 100)


def example_args(inputs, length: int = 16) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: 2 rows of ``length`` tokens (export needs 2 or more to keep a dimension symbolic)."""
    ids = torch.full((2, length), 5, dtype=torch.long)
    fills = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return tuple(fills[name] for name in inputs)


def dynamic_shapes(inputs, max_len: int | None) -> dict:
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", min=2, max=max_len) if max_len else torch.export.Dim("sequence", min=2)
    return {name: {0: batch, 1: sequence} for name in inputs}


def sample_cases(graph: Graph, inputs, *, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Two input shapes to check an artefact on, neither the traced one: 1 x 9 and 4 x 37 with padded rows."""
    generator = np.random.default_rng(seed)
    vocab = vocab_size(graph)
    longest = min(37, max_sequence(graph) or 37)
    cases = {}
    for case, (rows, length) in {"a": (1, 9), "b": (4, longest)}.items():
        ids = generator.integers(1, vocab, size=(rows, length)).astype(np.int64)
        mask = np.ones_like(ids)
        if rows > 1:
            mask[1, length // 2:] = 0  # a padded row, and one padded at its last token
            mask[2, -1:] = 0
        fills = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        cases[case] = {name: fills[name] for name in inputs}
    return cases


@torch.no_grad()
def reference_outputs(module: ExportModule, cases) -> dict[str, dict[str, np.ndarray]]:
    """The graph's own outputs on ``cases``, what each artefact is checked against."""
    result = {}
    for case, given in cases.items():
        out = module(*[torch.from_numpy(given[name]) for name in module.input_names])
        out = out if isinstance(out, tuple) else (out,)
        result[case] = {name: value.float().numpy() for name, value in zip(module.output_names, out)}
    return result
