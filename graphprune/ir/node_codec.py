"""A graph node's call target and arguments <-> JSON, for checkpoints (``serialize``).

Call targets are restricted to torch operator overloads (``aten.linear.default``) and
the ``operator`` module; arguments to nodes, plain values, tuples, lists, dicts, slices
and torch's dtypes, devices, layouts and memory formats. Anything else is a
``CheckpointError`` naming it: nothing is ever pickled.
"""

from __future__ import annotations

import importlib
import operator

import torch
from torch import fx

from .errors import CheckpointError


# Operator namespaces that torch registers only when a module is imported: lowered
# (int8) graphs call quantized_decomposed ops, defined by torch's own quantization code.
OP_LIBRARIES = {"quantized_decomposed": "torch.ao.quantization.fx._decomposed"}


def encode_target(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if getattr(operator, getattr(target, "__name__", ""), None) is target:
        return f"operator.{target.__name__}"
    raise CheckpointError(f"cannot save node {node.name!r}: call target {target!r} is not a torch operator")


def decode_target(op: str, text: str):
    if op != "call_function":
        return text
    if text.startswith("operator."):
        target = getattr(operator, text.split(".", 1)[1], None)
        if callable(target):
            return target
    else:
        parts = text.split(".")
        if len(parts) == 3:
            namespace, name, overload = parts
            if namespace in OP_LIBRARIES:
                importlib.import_module(OP_LIBRARIES[namespace])  # registers the namespace's operators
            try:
                target = getattr(getattr(getattr(torch.ops, namespace), name), overload)
            except (AttributeError, RuntimeError):
                target = None
            if isinstance(target, torch._ops.OpOverload):
                return target
    raise CheckpointError(f"unknown call target {text!r} in the checkpoint's graph")


def encode_arg(value, where: str):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [encode_arg(v, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode_arg(v, where) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: encode_arg(v, where) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [encode_arg(v, where) for v in (value.start, value.stop, value.step)]}
    raise CheckpointError(f"cannot save {where}: argument of type {type(value).__name__} ({value!r})")


def _torch_attr(name: str, kind: type):
    value = getattr(torch, name, None)
    if not isinstance(value, kind):
        raise CheckpointError(f"unknown {kind.__name__} {name!r} in the checkpoint's graph")
    return value


def decode_arg(value, nodes: dict[str, fx.Node]):
    if isinstance(value, list):
        return [decode_arg(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "node":
        return nodes[body]
    if tag == "tuple":
        return tuple(decode_arg(v, nodes) for v in body)
    if tag == "dict":
        return {k: decode_arg(v, nodes) for k, v in body.items()}
    if tag == "dtype":
        return _torch_attr(body, torch.dtype)
    if tag == "device":
        # The tensors load onto the CPU, so the devices baked into the ops (arange(device=...))
        # follow them there, whatever device the graph was saved from; graphprune.load(path,
        # device=...) then moves both.
        torch.device(body)  # still refuse a malformed device
        return torch.device("cpu")
    if tag == "layout":
        return _torch_attr(body, torch.layout)
    if tag == "memory_format":
        return _torch_attr(body, torch.memory_format)
    if tag == "slice":
        return slice(*(decode_arg(v, nodes) for v in body))
    raise CheckpointError(f"unknown argument tag {tag!r} in the checkpoint's graph")
