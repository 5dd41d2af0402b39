"""The ``Graph``: an executable ``torch.fx.GraphModule`` plus what graphprune knows about it."""

from __future__ import annotations

import copy
import json
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from .checkpoint import read_checkpoint, write_checkpoint
from .exporters import export_graph
from .fx_utils import module_device, quiet_deepcopy
from .masks import masked_tensor_copies
from .metadata import our_keys
from .runtime import apply_runtime, inference_only
from .summary import Summary, summarize


def source_info(model: nn.Module) -> dict[str, Any]:
    """Where a graph came from: the model class and its full config, JSON-able."""
    cls = type(model)
    info: dict[str, Any] = {"model_class": f"{cls.__module__}.{cls.__qualname__}"}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        info["model_type"] = getattr(config, "model_type", None)
        info["config"] = json.loads(config.to_json_string(use_diff=False))
    return info


class Graph:
    """A traced model: ``module`` runs it, ``meta``/node metadata describe it.

    Attributes:
        module: the ``torch.fx.GraphModule``; call it like the source model.
        source: model class and config it was traced from.
        meta: graph-level metadata, one dict per concern (``meta["common"]``, ...).
        history: the passes applied so far, each ``{"pass": name, "config": {...}}``.
        edits: structural edits made by passes (removed heads, neurons, layers...),
            in order, as JSON-able dicts; checkpoints record them.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        *,
        source: dict | None = None,
        meta: dict | None = None,
        history: list | None = None,
        edits: list | None = None,
    ):
        self.module = module
        self.source = source or {}
        self.meta = meta or {}
        self.history = history or []
        self.edits = edits or []
        apply_runtime(self)  # a lowered graph runs compiled

    # -- running ------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "Graph":
        if mode and inference_only(self):
            raise RuntimeError(
                "this graph was lowered to integer/bf16 kernels for inference and cannot be trained; "
                "fine-tune (or run quantization-aware training) before the 'lower' pass"
            )
        self.module.train(mode)
        return self

    def eval(self) -> "Graph":
        return self.train(False)

    @property
    def device(self) -> torch.device:
        """Where the graph's parameters (or, without any, its buffers) live; the CPU for a graph with neither."""
        return module_device(self.module)

    def to(self, device) -> "Graph":
        """Move parameters, buffers and the devices baked into the graph's ops, in place.

        ``torch.export`` records the trace device in mask-building ops
        (``arange(device=cpu)``); those arguments move along with the weights, in
        args and kwargs of every node, however deeply nested. The shape metadata
        (``node.meta["val"]``) moves too, so that shape propagation after a pass
        meets the weights on their device.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # as the moved tensors report it: cuda:0
        self.module.to(device)

        def move(value):
            return device if isinstance(value, torch.device) else value

        for node in self.module.graph.nodes:
            node.args = fx.node.map_aggregate(node.args, move)
            node.kwargs = fx.node.map_aggregate(node.kwargs, move)
            if "val" in node.meta:
                node.meta["val"] = _fake_on(node.meta["val"], device)
        self.module.recompile()
        return self

    # -- structure ----------------------------------------------------------------
    @property
    def fx_graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def nodes(self):
        return self.module.graph.nodes

    def node(self, name: str) -> fx.Node:
        for node in self.module.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r}")

    def record_edit(self, edit: dict) -> None:
        """Passes that change shapes call this so that checkpoints can describe the result."""
        json.dumps(edit)  # fail here, not at save time, if it is not JSON-able
        self.edits.append(dict(edit))

    def copy(self, *, share_tensors: bool = False) -> "Graph":
        """A deep copy. With ``share_tensors`` the parameters and buffers are shared.

        Analysis passes run on shared-tensor copies (they only write metadata);
        transform passes run on full copies so that the caller's graph stays intact.
        """
        memo: dict[int, Any] = {}
        if share_tensors:
            for tensor in list(self.module.parameters()) + list(self.module.buffers()):
                memo[id(tensor)] = tensor
        memo.update(masked_tensor_copies(self.module))
        module = quiet_deepcopy(self.module, memo)
        _own_parametrized_classes(module)
        # fx copies node.meta shallowly; our namespaces must not be shared.
        old_nodes = {n.name: n for n in self.module.graph.nodes}
        for node in module.graph.nodes:
            old = old_nodes[node.name]
            for k in our_keys(old):
                node.meta[k] = copy.deepcopy(old.meta[k])
        return Graph(
            module,
            source=copy.deepcopy(self.source),
            meta=copy.deepcopy(self.meta),
            history=copy.deepcopy(self.history),
            edits=copy.deepcopy(self.edits),
        )

    # -- views ----------------------------------------------------------------------
    def summary(self, seq_len: int | None = None, batch_size: int | None = None) -> Summary:
        """Per-layer table: parameters, FLOPs, heads, FFN width. Prints well; see ``Summary``."""
        return summarize(self, seq_len=seq_len, batch_size=batch_size)

    def to_networkx(self) -> nx.DiGraph:
        """The nodes as a ``networkx.DiGraph``; each node carries ``op``, ``target`` and our metadata."""
        dg = nx.DiGraph()
        for node in self.module.graph.nodes:
            attrs = {"op": node.op, "target": _target_name(node.target)}
            for k in our_keys(node):
                attrs[k.split(".", 1)[1]] = node.meta[k]
            dg.add_node(node.name, **attrs)
            for source in node.all_input_nodes:
                dg.add_edge(source.name, node.name)
        return dg

    # -- persistence ----------------------------------------------------------------
    def save(self, path) -> None:
        """Write a checkpoint directory (safetensors + JSON manifest), atomically."""
        write_checkpoint(self, path)

    def export(self, path, format: str = "onnx", **options) -> dict:
        """Write a self-contained artefact folder that runs without graphprune; returns its manifest.

        Formats: ``"onnx"`` (ONNX Runtime; ``quantize="dynamic"|"static"`` for int8),
        ``"aoti"`` (an AOTInductor package, fp32 or a lowered int8 graph) and ``"hf"``
        (a ``save_pretrained`` folder, where a stock config can express the graph). Each
        export is loaded in its own runtime in a fresh process and checked against this
        graph before the folder appears. See ``graphprune.app.export``.

        Example:
            >>> graph.export("artefacts/minilm-int8", format="onnx", quantize="dynamic")
        """
        return export_graph(self, path, format, **options)

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.module.parameters())
        return (
            f"Graph({self.source.get('model_class', type(self.module).__name__)}, "
            f"{len(self.module.graph.nodes)} nodes, {n_params:,} parameters, {len(self.history)} passes applied)"
        )


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__qualname__", str(target))


def _fake_on(val, device: torch.device):
    """Shape metadata (fake tensors, possibly in tuples) on ``device``, in the fake mode it was made in."""

    def move(fake):
        if fake.device == device:
            return fake
        with fake.fake_mode:
            return fake.to(device)

    return pytree.tree_map_only(FakeTensor, move, val)


def load(path, device=None) -> Graph:
    """Load a checkpoint written by ``Graph.save``, onto ``device`` (default: the CPU).

    A checkpoint loads onto the CPU, whatever device the graph was saved from; with
    ``device`` it is then moved there with :meth:`Graph.to`.

    Raises ``CheckpointError`` for a missing, truncated, tampered or future-format checkpoint.

    Example:
        >>> graph = graphprune.load("runs/minilm-pruned")
        >>> graph = graphprune.load("runs/minilm-pruned", device="cuda")
    """
    graph = Graph(**read_checkpoint(path))
    return graph if device is None else graph.to(device)


def _own_parametrized_classes(module: nn.Module) -> None:
    """Give each parametrized module of a deep copy its own class.

    torch.nn.utils.parametrize keeps a module's parametrized tensors as properties of a
    class made for that module, and a deep copy shares the class: a parametrization then
    added to the copy (quantize after prune_weight's masks) would appear on the original,
    which has no such parametrization and fails on its next call.
    """
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            cls = sub.__class__
            body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            sub.__class__ = type(cls.__name__, cls.__bases__, body)
