"""How a traced graph is called: the source model's ``forward``, rebuilt around the graph body.

``torch.export`` records one call: the inputs it saw become placeholders and the
outputs a pytree. A HF model accepts much more: optional inputs left out, inputs by
keyword or by position, labels that produce a loss, ``return_dict``. A
:class:`ModelCall` records what that takes, as JSON, so checkpoints carry it, and
:class:`ModelCallCodeGen` makes ``graph.module.forward`` take the model's own
parameters. ``graph.module.code`` shows it::

    def forward(self, input_ids=None, attention_mask=None, ..., labels=None, **kwargs):
        input_ids, attention_mask, ..., _graphprune_call_state = _graphprune_call.bind({...}, kwargs)
        ...                                            # the traced body, unchanged
        return _graphprune_call.finish(_graphprune_call_state, (linear_5,))

``bind`` fills every optional input that was left out exactly as the model fills it
(an all-ones mask, zero token types, positions counted as the family counts them)
and refuses, with :class:`InputError`, what the graph cannot honour; ``finish``
builds the model's output type, adds the task loss when targets were given, and
returns a tuple when ``return_dict`` is false.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import CodeGen
from torch.utils import _pytree as pytree

from . import losses
from .errors import InputError

CALL_GLOBAL = "_graphprune_call"
STATE_VAR = "_graphprune_call_state"

# Optional model inputs that can be graph inputs, in the order HF models list them.
OPTIONAL_INPUTS = ("attention_mask", "token_type_ids", "position_ids")

# Inputs a graph honours only in their "off" state (None or False): it has fixed outputs
# and starts from token ids.
OFF_ONLY = (
    "inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "use_cache",
    "output_attentions", "output_hidden_states", "output_router_logits", "is_causal", "head_mask",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
)
# Accepted and not used, as the eager models do: the heads supported here average their
# loss per batch (HF Trainer passes num_items_in_batch to every model whose forward takes
# **kwargs), and a model without token types (DistilBERT) ignores a tokenizer's token_type_ids.
IGNORED = ("num_items_in_batch", "token_type_ids")

_TASK_SUFFIXES = {
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
    "ForMaskedLM": "masked_lm",
}


def _fill(rule: dict, input_ids: torch.Tensor) -> torch.Tensor:
    batch, seq = input_ids.shape
    device = input_ids.device
    kind = rule["fill"]
    if kind == "ones":
        return torch.ones(batch, seq, dtype=torch.long, device=device)
    if kind == "zeros":
        return torch.zeros(batch, seq, dtype=torch.long, device=device)
    if kind == "arange":
        return torch.arange(seq, dtype=torch.long, device=device).expand(batch, seq)
    if kind == "after_padding":
        # RoBERTa's numbering (from fairseq): real tokens count up from padding_idx + 1,
        # padding tokens keep padding_idx.
        padding_idx = rule["padding_idx"]
        mask = input_ids.ne(padding_idx).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx
    raise ValueError(f"unknown fill rule {rule!r}")


@dataclass
class _CallState:
    targets: dict[str, Any]
    return_dict: bool


@dataclass(eq=False)  # identity hashing: fx keys the generated code's globals by object
class ModelCall:
    """The call signature of the model a graph was traced from, and how to complete a call.

    Attributes:
        model_class: the source class name, for messages.
        params: the model's ``forward`` parameters in order (``self`` and ``**kwargs`` aside).
        graph_inputs: the graph's placeholders, in order; each is a model input.
        fills: how each optional graph input is made when left out.
        task: the head's task (``losses.TASKS``), None for a base model, or
            ``"unsupported"`` for a head whose loss graphprune does not compute.
        targets: the parameters that carry loss targets (``labels``, ...).
        problem_type: sequence classification's ``config.problem_type``.
        loss_style: ``"hf"``, or ``"deberta_v2"`` for DeBERTa's own unset-problem rule.
        return_dict: the model's default for ``return_dict``.
        out_spec: the output pytree (a HF ``ModelOutput`` type and its fields); not in JSON.
    """

    model_class: str
    params: tuple[str, ...]
    graph_inputs: tuple[str, ...]
    fills: dict[str, dict]
    task: str | None = None
    targets: tuple[str, ...] = ()
    problem_type: str | None = None
    loss_style: str = "hf"
    return_dict: bool = True
    out_spec: Any = field(default=None, repr=False)

    # -- building -------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "ModelCall | None":
        """The call of a HF text model taking ``input_ids``; None for anything else."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_json_string"):
            return None
        parameters = inspect.signature(model.forward).parameters
        params = tuple(n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if "input_ids" not in params:
            return None
        name = type(model).__name__
        task = next((t for suffix, t in _TASK_SUFFIXES.items() if name.endswith(suffix)), None)
        targets = tuple(p for p in params if "label" in p or p in ("start_positions", "end_positions"))
        if task is None and targets:
            task = "unsupported"
        fills = {"attention_mask": {"fill": "ones"}, "token_type_ids": {"fill": "zeros"}, "position_ids": _position_rule(model)}
        graph_inputs = ("input_ids",) + tuple(n for n in OPTIONAL_INPUTS if n in params)
        return cls(
            model_class=name,
            params=params,
            graph_inputs=graph_inputs,
            fills={k: v for k, v in fills.items() if k in graph_inputs},
            task=task,
            targets=targets,
            problem_type=getattr(config, "problem_type", None),
            loss_style="deberta_v2" if getattr(config, "model_type", None) in ("deberta", "deberta-v2") else "hf",
            return_dict=bool(getattr(config, "return_dict", True)),
        )

    def example_inputs(self, given: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Complete example inputs for tracing: every graph input, in order; targets dropped."""
        unknown = sorted(k for k in given if k not in self.graph_inputs and k not in self.targets)
        if unknown:
            raise InputError(
                f"{self.model_class}: example input {unknown[0]!r} cannot be traced; "
                f"a graph takes {', '.join(self.graph_inputs)} (loss targets are given at call time)"
            )
        inputs = self._complete({k: v for k, v in given.items() if k in self.graph_inputs})
        return {name: value.contiguous() for name, value in zip(self.graph_inputs, inputs)}

    # -- calling ------------------------------------------------------------------------
    def bind(self, named: dict[str, Any], kwargs: dict[str, Any]) -> tuple:
        """The graph inputs for a call, followed by the state ``finish`` needs."""
        given = {**named, **kwargs}
        return_dict = given.pop("return_dict", None)
        for name in IGNORED:
            if name not in self.graph_inputs:
                given.pop(name, None)
        for name in OFF_ONLY:
            value = given.pop(name, None)
            if value is not None and value is not False:
                raise InputError(
                    f"{self.model_class} graph cannot honour {name}={_brief(value)}: a traced graph starts from "
                    f"input_ids and returns only its traced outputs; supported inputs: {self._supported()}"
                )
        targets = {name: given.pop(name, None) for name in self.targets}
        inputs = {name: given.pop(name) for name in self.graph_inputs if given.get(name) is not None}
        for name, value in given.items():
            if value is None:
                continue
            if name in self.params:
                raise InputError(f"{self.model_class} graph cannot honour {name}=...: it was traced without it; supported inputs: {self._supported()}")
            raise InputError(f"{self.model_class} graph got an unexpected input {name!r}; supported inputs: {self._supported()}")
        values = self._complete(inputs)
        state = _CallState(targets, self.return_dict if return_dict is None else bool(return_dict))
        return (*values, state)

    def finish(self, state: _CallState, outputs) -> Any:
        """The model's output for the graph's flat ``outputs``: its type, the loss, tuple or not."""
        out = pytree.tree_unflatten(list(outputs), self.out_spec) if self.out_spec is not None else outputs
        loss = self._loss(out, state.targets)
        if isinstance(loss, tuple):  # the head also reshapes its logits (DeBERTa regression)
            loss, out["logits"] = loss
        if loss is not None:
            out = type(out)(loss=loss, **out)
        if not state.return_dict and hasattr(out, "to_tuple"):
            out = out.to_tuple()
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _complete(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Every graph input in order: the given ones checked, the missing ones filled."""
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise InputError(
                f"{self.model_class} graph needs input_ids, an integer tensor of shape (batch, seq); got {_brief(ids)}"
            )
        values = []
        for name in self.graph_inputs:
            value = inputs.get(name)
            if value is None:
                value = _fill(self.fills[name], ids)
            elif not isinstance(value, torch.Tensor):
                raise InputError(f"{self.model_class} graph: {name} must be a tensor, got {_brief(value)}")
            elif value.shape != ids.shape:
                # HF broadcasts positions and token types of shape (seq,) or (1, seq); a mask must match.
                broadcastable = name != "attention_mask" and value.dim() <= 2 and value.shape[-1:] == ids.shape[-1:]
                if not broadcastable or (value.dim() == 2 and value.shape[0] != 1):
                    raise InputError(
                        f"{self.model_class} graph: {name} must have the shape of input_ids {tuple(ids.shape)}, "
                        f"got {tuple(value.shape)}"
                    )
                value = value.expand(ids.shape)
            values.append(value)
        return values

    def _loss(self, out, targets: dict[str, Any]):
        """The task loss, None without targets, or ``(loss, logits)`` where the head reshapes them."""
        if all(v is None for v in targets.values()):
            return None
        if self.task not in losses.TASKS:
            raise InputError(
                f"{self.model_class} graph cannot compute its loss: graphprune computes the losses of "
                f"{', '.join(s.removeprefix('For') for s in _TASK_SUFFIXES)} heads; call it without "
                f"{', '.join(k for k, v in targets.items() if v is not None)} and compute the loss from its outputs"
            )
        if self.task == "question_answering":
            start, end = targets.get("start_positions"), targets.get("end_positions")
            if start is None or end is None:
                return None  # as in HF: the loss needs both
            return losses.question_answering_loss(out["start_logits"], out["end_logits"], start, end)
        labels = targets.get("labels")
        if labels is None:
            return None
        logits = out["logits"]
        if self.task == "token_classification":
            return losses.token_classification_loss(logits, labels)
        if self.task == "masked_lm":
            return losses.masked_lm_loss(logits, labels)
        if self.problem_type is None and self.loss_style == "deberta_v2":
            return losses.deberta_v2_unset_problem_loss(logits, labels)
        if self.problem_type is None:
            # The HF model records the inferred problem type on its config, so later
            # calls agree with the first; the graph does the same.
            self.problem_type = losses.infer_problem_type(logits.size(-1), labels)
        return losses.sequence_classification_loss(logits, labels, self.problem_type)

    def _supported(self) -> str:
        extra = ["return_dict"] + (list(self.targets) if self.task in losses.TASKS else [])
        return ", ".join(list(self.graph_inputs) + extra)

    # -- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "model_class": self.model_class,
            "params": list(self.params),
            "graph_inputs": list(self.graph_inputs),
            "fills": self.fills,
            "task": self.task,
            "targets": list(self.targets),
            "problem_type": self.problem_type,
            "loss_style": self.loss_style,
            "return_dict": self.return_dict,
        }

    @classmethod
    def from_json(cls, data: dict, out_spec=None) -> "ModelCall":
        return cls(
            model_class=data["model_class"],
            params=tuple(data["params"]),
            graph_inputs=tuple(data["graph_inputs"]),
            fills=dict(data["fills"]),
            task=data.get("task"),
            targets=tuple(data.get("targets", ())),
            problem_type=data.get("problem_type"),
            loss_style=data.get("loss_style", "hf"),
            return_dict=bool(data.get("return_dict", True)),
            out_spec=out_spec,
        )


def _position_rule(model: torch.nn.Module) -> dict:
    # RoBERTa-style embeddings number positions after the padding index; the others count 0, 1, ...
    for module in model.modules():
        if hasattr(module, "create_position_ids_from_input_ids") and isinstance(getattr(module, "padding_idx", None), int):
            return {"fill": "after_padding", "padding_idx": module.padding_idx}
    return {"fill": "arange"}


def _brief(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ModelCallCodeGen(CodeGen):
    """Generates ``forward`` with the source model's parameters around the traced body."""

    def __init__(self, call: ModelCall):
        super().__init__()
        self.call = call

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        names = [v.split(":")[0].strip() for v in free_vars if v != "self"]
        if tuple(names) != self.call.graph_inputs:
            raise RuntimeError(f"graph inputs {names} do not match the recorded call's {list(self.call.graph_inputs)}")
        params = ", ".join(f"{p}=None" for p in self.call.params)
        named = ", ".join(f"{p!r}: {p}" for p in self.call.params)
        return (
            f"def {self._func_name}(self, {params}, **kwargs){maybe_return_annotation}:\n"
            f"    {', '.join(names)}, {STATE_VAR} = {CALL_GLOBAL}.bind({{{named}}}, kwargs)"
        )

    def generate_output(self, output_args, *, descs=None, repr_fn=None) -> str:
        return f"return {CALL_GLOBAL}.finish({STATE_VAR}, {(repr_fn or repr)(output_args)})"

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [(CALL_GLOBAL, self.call)]

    def process_outputs(self, outputs):
        # Interpreters (shape propagation) run the body alone; give them the output type.
        return self.call.finish(_CallState({}, True), outputs if isinstance(outputs, (list, tuple)) else [outputs])


def install_model_call(gm: torch.fx.GraphModule, call: ModelCall, out_spec) -> None:
    """Give ``gm`` the model's call signature (in place) and recompile it."""
    placeholders = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    if placeholders != call.graph_inputs:
        raise RuntimeError(f"the graph's inputs {list(placeholders)} are not the model's {list(call.graph_inputs)}")
    clashes = {CALL_GLOBAL, STATE_VAR} & {n.name for n in gm.graph.nodes}
    if clashes:
        raise RuntimeError(f"graph nodes named {sorted(clashes)} clash with graphprune's call wrapper")
    call.out_spec = out_spec
    gm.graph.set_codegen(ModelCallCodeGen(call))
    gm.recompile()


def model_call_of(gm: torch.fx.GraphModule) -> ModelCall | None:
    """The recorded call of a graph module, or None for graphs of other models."""
    codegen = gm.graph._codegen
    return codegen.call if isinstance(codegen, ModelCallCodeGen) else None


def upgrade_model_call(gm: torch.fx.GraphModule, source: dict) -> bool:
    """Give a graph saved before calls were recorded (checkpoint format 1) its model's call.

    The call is read off the source model class, built from the saved config on the
    meta device (no weights); only ``transformers`` classes are imported. Returns
    whether the graph was upgraded.
    """
    from torch.fx.graph import _PyTreeCodeGen

    class_path = source.get("model_class") or ""
    codegen = gm.graph._codegen
    if not class_path.startswith("transformers.") or not isinstance(codegen, _PyTreeCodeGen) or "config" not in source:
        return False
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if cls is None or not hasattr(cls, "config_class"):
        return False
    with torch.device("meta"):
        call = ModelCall.for_model(cls(cls.config_class.from_dict(source["config"])))
    if call is None:
        return False
    placeholders = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    if not set(placeholders) <= set(call.graph_inputs) or placeholders[:1] != ("input_ids",):
        return False
    # Older graphs lack some optional inputs (position_ids); those stay model-filled inside the graph.
    call.graph_inputs = placeholders
    call.fills = {k: v for k, v in call.fills.items() if k in placeholders}
    install_model_call(gm, call, codegen.pytree_info.out_spec)
    return True
