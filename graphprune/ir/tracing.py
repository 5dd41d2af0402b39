"""``graphprune.trace``: a HuggingFace model in, an executable ``Graph`` out."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn
from torch.export import Dim

from .calls import ModelCall, install_model_call
from .errors import InputError, TraceError
from .fx_utils import module_device
from .graph import Graph, source_info
from .lifting import lift_leaf_modules

# Inputs with a (batch, sequence) layout that get dynamic dimensions.
_SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def dummy_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 8) -> dict[str, torch.Tensor]:
    """Example inputs built from a HF model's config: no tokenizer, no download.

    The second row is padded so that the traced graph contains the mask path. The
    inputs are on the model's device (drawn on the CPU, so they are the same everywhere).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise TraceError(
            f"cannot build example inputs for {type(model).__name__}: it has no HF config with a vocab_size; "
            "pass example_inputs to graphprune.trace"
        )
    max_len = getattr(config, "max_position_embeddings", None) or seq_len
    seq_len = max(2, min(seq_len, max_len - 2))
    generator = torch.Generator().manual_seed(0)
    low = min(5, config.vocab_size - 1)  # keep clear of special and padding ids
    inputs = {
        "input_ids": torch.randint(low, config.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
    }
    inputs["attention_mask"][1:, seq_len // 2 :] = 0
    accepted = inspect.signature(model.forward).parameters
    if "token_type_ids" in accepted and getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros(batch_size, seq_len, dtype=torch.long)
    device = module_device(model)
    return {name: value.to(device) for name, value in inputs.items()}


def _dynamic_shapes(inputs: Mapping[str, object]) -> dict[str, object]:
    batch = Dim("batch")
    shapes: dict[str, object] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and name in _SEQUENCE_INPUTS:
            # The sequence range is left to export: models differ in what they allow.
            shapes[name] = {0: batch, 1: Dim.DYNAMIC}
        else:
            shapes[name] = None
    return shapes


def trace(model: nn.Module, example_inputs: Mapping[str, torch.Tensor] | None = None, *, dynamic: bool = True) -> Graph:
    """Trace ``model`` into a :class:`graphprune.Graph`.

    Args:
        model: a HF BERT-family model (or any module ``torch.export`` can handle).
        example_inputs: keyword inputs for one forward call; built from the model's
            config when omitted.
        dynamic: give batch and sequence dimensions of the token inputs symbolic
            sizes, so the graph runs at other batch sizes and lengths.

    The graph shares its modules and parameters with ``model``, as
    ``torch.fx.symbolic_trace`` does; passes run on copies (see ``run_pass``).

    For HF models ``graph.module`` takes the model's own ``forward`` parameters:
    optional inputs may be left out (they are filled as the model fills them),
    ``labels`` (or ``start_positions``/``end_positions``) add the model's loss, and
    ``return_dict=False`` gives its tuple. Example inputs need only ``input_ids``.

    Example:
        >>> graph = graphprune.trace(model)
        >>> out = graph.module(**inputs)  # same output type and values as model(**inputs)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphprune.trace expects an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = dummy_inputs(model)
    if not isinstance(example_inputs, Mapping):
        raise TypeError(
            f"graphprune.trace: example_inputs must be a dict of keyword inputs, got {type(example_inputs).__name__}"
        )
    call = ModelCall.for_model(model)
    if call is not None:
        # Every optional input becomes a graph input, filled at call time when left out.
        try:
            example_inputs = call.example_inputs(dict(example_inputs))
        except InputError as error:
            raise TraceError(f"cannot trace {type(model).__name__}: {error}") from None
    example_inputs = dict(example_inputs)
    if dynamic:
        for name, value in example_inputs.items():
            if name in _SEQUENCE_INPUTS and isinstance(value, torch.Tensor) and value.dim() == 2 and min(value.shape) < 2:
                raise ValueError(
                    f"graphprune.trace: example input {name!r} has shape {tuple(value.shape)}; with dynamic=True "
                    "batch and sequence must both be at least 2 (torch.export specialises sizes 0 and 1)"
                )

    was_training = model.training
    model.eval()  # dropout is lifted into modules, so export sees the deterministic path
    config = getattr(model, "config", None)
    return_dict = getattr(config, "return_dict", None)
    if call is not None and return_dict is False:
        config.return_dict = True  # trace the ModelOutput; the call returns tuples as the model does
    try:
        exported = torch.export.export(
            model,
            (),
            example_inputs,
            dynamic_shapes=_dynamic_shapes(example_inputs) if dynamic else None,
            strict=False,
        )
        module = lift_leaf_modules(exported.module(), model)
        if call is not None:
            install_model_call(module, call, exported.call_spec.out_spec)
    except TraceError:
        raise
    except Exception as error:  # export raises many types; the user needs the class and the cause
        raise TraceError(f"cannot trace {type(model).__name__}: {type(error).__name__}: {error}") from error
    finally:
        model.train(was_training)
        if call is not None and return_dict is False:
            config.return_dict = False

    module.train(was_training)
    return Graph(module, source=source_info(model))
