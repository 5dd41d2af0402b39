"""Graph <-> JSON plus a flat tensor dict: the body of a checkpoint, with no pickled code.

Nodes are stored with their op, target, arguments (``node_codec``: call targets are
restricted to torch operator overloads such as ``aten.linear.default`` and the
``operator`` module) and our metadata; modules are rebuilt from registered types
(``graphprune.modules``); tensors go to safetensors.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from .calls import ModelCall, ModelCallCodeGen
from .errors import CheckpointError
from .fx_utils import fetch_attr
from .masks import pruning_hooks
from .metadata import our_keys
from .node_codec import decode_arg, decode_target, encode_arg, encode_target
from .packing import pack_tensors, unpack_tensors
from .modules import module_type_named, module_type_of
from .shapes import dim_names, shape_list


def graph_to_json(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """Describe ``gm`` as JSON plus the tensors it owns (tied tensors stored once)."""
    names = dim_names(gm)
    nodes, modules, attrs = [], [], []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {
            "name": node.name,
            "op": node.op,
            "target": encode_target(node),
            "args": encode_arg(list(node.args), f"node {node.name!r}"),
            "kwargs": encode_arg(dict(node.kwargs), f"node {node.name!r}"),
            "meta": {k: node.meta[k] for k in our_keys(node)},
        }
        stack = node.meta.get("nn_module_stack")
        if stack:
            entry["meta"]["nn_module_stack"] = [[k, path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"] for k, (path, cls) in stack.items()]
        if node.op == "placeholder":
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise CheckpointError(f"cannot save input {node.name!r}: it has no tensor shape metadata")
            entry["input"] = {"dims": shape_list(val, names), "dtype": str(val.dtype).removeprefix("torch.")}
        nodes.append(entry)
        if node.op == "call_module" and node.target not in {m["path"] for m in modules}:
            modules.append(_describe_module(node.target, gm.get_submodule(node.target)))
        elif node.op == "get_attr" and node.target not in {a["name"] for a in attrs}:
            value = fetch_attr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"cannot save attribute {node.target!r}: not a tensor")
            attrs.append({"name": node.target, "parameter": isinstance(value, nn.Parameter), "requires_grad": value.requires_grad})

    tensors, aliases = _collect_tensors(gm, modules, attrs)
    tensors, packed = pack_tensors(tensors)
    codegen = gm.graph._codegen
    pytree_info, call = None, None
    if isinstance(codegen, ModelCallCodeGen):
        out_spec = codegen.call.out_spec
        call = {"signature": codegen.call.to_json(), "out_spec": pytree.treespec_dumps(out_spec) if out_spec is not None else None}
    elif isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        pytree_info = {
            "orig_args": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    data = {
        "class_name": type(gm).__name__,
        "training": gm.training,
        "nodes": nodes,
        "modules": modules,
        "attrs": attrs,
        "aliases": aliases,
        "packed": packed,
        "pytree": pytree_info,
        "call": call,
    }
    return data, tensors


def _describe_module(path: str, module: nn.Module) -> dict:
    """A module as its registered type and config, plus its parametrizations (masks), if any."""
    if pruning_hooks(module):
        raise CheckpointError(
            f"cannot save module {path!r}: it has torch.nn.utils.prune masks; run the 'commit_masks' pass first "
            "(graphprune's own masks are saved as they are)"
        )
    kind = module_type_of(module)
    if kind is None:
        raise CheckpointError(
            f"cannot save module {path!r} of type {parametrize.type_before_parametrizations(module).__qualname__}: "
            "register it with graphprune.register_module_type"
        )
    entry: dict[str, Any] = {"path": path, "type": kind.name, "config": kind.to_config(module)}
    if parametrize.is_parametrized(module):
        entry["parametrizations"] = {}
        for tensor_name, chain in module.parametrizations.items():
            described = []
            for parametrization in chain:
                p_kind = module_type_of(parametrization)
                if p_kind is None:
                    raise CheckpointError(
                        f"cannot save module {path!r}: its {tensor_name} parametrization "
                        f"{type(parametrization).__qualname__} is not registered; register it with "
                        "graphprune.register_module_type or run the 'commit_masks' pass first"
                    )
                described.append({"type": p_kind.name, "config": p_kind.to_config(parametrization)})
            entry["parametrizations"][tensor_name] = described
    return entry


def _rebuild_module(entry: dict) -> nn.Module:
    """An empty (meta-device) module as :func:`_describe_module` described it."""
    kind = module_type_named(entry["type"])
    if kind is None:
        raise CheckpointError(f"module {entry['path']!r} has type {entry['type']!r}, which this graphprune does not know")
    with torch.device("meta"):
        module = kind.from_config(entry["config"])
        for tensor_name, chain in entry.get("parametrizations", {}).items():
            for described in chain:
                p_kind = module_type_named(described["type"])
                if p_kind is None:
                    raise CheckpointError(
                        f"module {entry['path']!r} has a {tensor_name} parametrization of type {described['type']!r}, "
                        "which this graphprune does not know"
                    )
                parametrize.register_parametrization(module, tensor_name, p_kind.from_config(described["config"]), unsafe=True)
    return module


def _collect_tensors(gm, modules, attrs) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    named: list[tuple[str, torch.Tensor]] = []
    for m in modules:
        for name, tensor in gm.get_submodule(m["path"]).state_dict(keep_vars=True).items():
            named.append((f"{m['path']}.{name}", tensor))
    for a in attrs:
        named.append((a["name"], fetch_attr(gm, a["name"])))
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_id: dict[int, str] = {}
    storages: set[int] = set()
    for name, tensor in named:
        if name in tensors or name in aliases:
            continue
        if id(tensor) in by_id:
            aliases[name] = by_id[id(tensor)]  # tied weights: stored once, re-tied on load
            continue
        by_id[id(tensor)] = name
        data = tensor.detach().cpu()
        ptr = data.untyped_storage().data_ptr()
        if ptr in storages or not data.is_contiguous():
            data = data.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared storage
        storages.add(data.untyped_storage().data_ptr())
        tensors[name] = data
    return tensors, aliases


def graph_from_json(data: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the ``GraphModule`` that :func:`graph_to_json` described."""
    tensors = unpack_tensors(tensors, data.get("packed", {}))
    root: dict[str, Any] = {}
    for m in data["modules"]:
        module = _rebuild_module(m)
        expected = module.state_dict(keep_vars=True).keys()
        state = {name: tensors[_resolve(f"{m['path']}.{name}", data["aliases"])] for name in expected}
        module.load_state_dict(state, strict=True, assign=True)
        root[m["path"]] = module
    for a in data["attrs"]:
        tensor = tensors[_resolve(a["name"], data["aliases"])]
        root[a["name"]] = nn.Parameter(tensor, requires_grad=a["requires_grad"]) if a["parameter"] else tensor

    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        target = decode_target(entry["op"], entry["target"])
        args = tuple(decode_arg(entry["args"], nodes))
        kwargs = decode_arg(entry["kwargs"], nodes)
        node = graph.create_node(entry["op"], target, args, kwargs, name=entry["name"])
        if node.name != entry["name"]:
            raise CheckpointError(f"node name {entry['name']!r} could not be restored")
        meta = dict(entry["meta"])
        stack = meta.pop("nn_module_stack", None)
        if stack:
            node.meta["nn_module_stack"] = {k: (path, cls) for k, path, cls in stack}
        node.meta.update(meta)
        nodes[node.name] = node
    if data.get("call") is not None:
        call = data["call"]
        graph._codegen = ModelCallCodeGen(ModelCall.from_json(call["signature"], _load_spec(call["out_spec"])))
    elif data["pytree"] is not None:
        info = data["pytree"]
        graph._codegen = _PyTreeCodeGen(
            _PyTreeInfo(info["orig_args"], _load_spec(info["in_spec"]), _load_spec(info["out_spec"]))
        )
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=data["class_name"])
    for alias, canonical in data["aliases"].items():
        _retie(gm, alias, fetch_attr(gm, _resolve(canonical, data["aliases"])))
    gm.train(data["training"])
    return gm


def _resolve(name: str, aliases: dict[str, str]) -> str:
    return aliases.get(name, name)


def _retie(gm: nn.Module, target: str, value) -> None:
    *prefix, field = target.split(".")
    owner = gm.get_submodule(".".join(prefix)) if prefix else gm
    if isinstance(value, nn.Parameter):
        setattr(owner, field, value)
    else:
        owner.register_buffer(field, value)


def _load_spec(text: str | None):
    if text is None:
        return None
    # Output containers (HF ModelOutput classes) register themselves with pytree when
    # their module is imported; import only from transformers, never arbitrary code.
    for type_name in _spec_types(json.loads(text)):
        module_name = type_name.rsplit(".", 1)[0]
        if module_name.startswith("transformers."):
            try:
                importlib.import_module(module_name)
            except ImportError as error:
                raise CheckpointError(f"cannot import {module_name} for output type {type_name}: {error}") from error
    try:
        return pytree.treespec_loads(text)
    except Exception as error:
        raise CheckpointError(f"cannot rebuild the graph's input/output structure: {error}") from error


def _spec_types(obj) -> list[str]:
    found = []
    if isinstance(obj, dict):
        if isinstance(obj.get("type"), str):
            found.append(obj["type"])
        for value in obj.values():
            found.extend(_spec_types(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(_spec_types(value))
    return found
