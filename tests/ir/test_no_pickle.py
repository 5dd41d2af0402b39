"""graphprune.load never unpickles: every kind of checkpoint graphprune writes loads with pickle and torch.load refused,
and gives back the saved graph's tensors and outputs exactly."""

import _pickle
import importlib.util
import json
import pickle
import sys
from typing import Callable, NamedTuple

import pytest
import safetensors.torch
import torch

import graphprune
from graphprune.ir import cpu, modules
from graphprune.ir.gates import gate_modules
from graphprune.ir.masks import MovementMask

from ..models import make_model, max_diff, padded_inputs, trace_once

has_lower = cpu.is_x86_64() and importlib.util.find_spec("torchao") is not None


def _integer(weight_width):
    return {"config": {"name": "integer", "data_in_width": 8, "data_in_frac_width": 4, "weight_width": weight_width,
                       "weight_frac_width": 4, "bias_width": 8, "bias_frac_width": 4}}


def _random_gates(graph, seed):
    """Gates at init are all open; random log_alpha closes some, so a gate reloaded wrong changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for gate in gate_modules(graph).values():
            gate.log_alpha.copy_(3 * torch.randn_like(gate.log_alpha))
    return graph


def _movement(graph):
    with torch.no_grad():
        for module in graph.module.modules():
            if isinstance(module, MovementMask):
                module.scores.copy_(torch.randn_like(module.scores))
    return graph


def _run(graph, *steps):
    for name, config in steps:
        graph, _ = graphprune.run_pass(graph, name, config)
    return graph


class Kind(NamedTuple):
    """How to make a kind from the dense graph, and what its checkpoint must hold, so that a kind cannot quietly
    stop exercising its feature: module types (parametrizations included), packed tensor kinds, stored dtypes,
    call targets, and graph.json entries that must not be empty."""

    build: Callable
    types: frozenset = frozenset()
    packed: frozenset = frozenset()
    dtypes: frozenset = frozenset()
    ops: frozenset = frozenset()
    filled: frozenset = frozenset()


QUANTIZE = {"by": "type", "linear": _integer(4), "matmul": _integer(8)}
UNEVEN = [("remove_heads", {"heads": {0: [1], 1: [0, 3]}}), ("remove_ffn_neurons", {"neurons": {0: list(range(10)), 1: [1, 2]}}),
          ("remove_hidden", {"dims": [0, 5, 17]}), ("remove_layers", {"layers": [1]})]
KINDS = {
    "dense": Kind(lambda g: g, frozenset({"graphprune.AttentionCore", "torch.nn.Dropout"})),
    "tied_weights": Kind(lambda g: trace_once(make_model("BertForMaskedLM")), filled=frozenset({"aliases"})),
    "masked": Kind(lambda g: _run(g, ("prune_weight", {"method": "l1", "sparsity": 0.5})), frozenset({"graphprune.WeightMask"}), frozenset({"bits"})),
    "movement": Kind(lambda g: _movement(_run(g, ("prune_weight", {"method": "movement", "sparsity": 0.5}))), frozenset({"graphprune.MovementMask"})),
    "sparse": Kind(lambda g: _run(g, ("prune_weight", {"method": "l1", "sparsity": 0.6}), ("commit_masks", {})), packed=frozenset({"sparse"})),
    "quantized": Kind(lambda g: _run(g, ("quantize", QUANTIZE)), frozenset({"graphprune.Quantizer", "graphprune.QuantizedAttentionCore"})),
    "activation_top_k": Kind(lambda g: _run(g, ("prune_activation", {"sparsity": 0.5})), ops=frozenset({"aten.kthvalue.default"})),
    "activation_random": Kind(lambda g: _run(g, ("prune_activation", {"method": "random", "sparsity": 0.5, "seed": 3})), filled=frozenset({"attrs"})),
    "uneven": Kind(lambda g: _run(g, *UNEVEN)),
    "factorized": Kind(lambda g: _random_gates(_run(g, ("factorize", {"target": 0.5, "rank": 7})), 2), frozenset({"graphprune.HardConcreteGate"})),
    "l0_gated": Kind(lambda g: _random_gates(_run(g, ("l0_structured", {"units": ["heads", "neurons", "hidden"]})), 3),
                     frozenset({"graphprune.HardConcreteGate", "graphprune.GatedLayerNorm"})),
    "lowered_int8": Kind(lambda g: _run(g, ("lower", {"activations": "dynamic", "compile": False})), dtypes=frozenset({torch.int8}),
                         ops=frozenset({"quantized_decomposed.dequantize_per_channel.default"})),
    "lowered_bf16": Kind(lambda g: _run(g, ("lower", {"precision": "bf16", "compile": False, "allow_emulated_bf16": True})),
                         dtypes=frozenset({torch.bfloat16})),
}
LOWERED = {"lowered_int8", "lowered_bf16"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (the graph as saved, its checkpoint folder)."""
    root = tmp_path_factory.mktemp("kinds")
    dense = trace_once(make_model())
    out = {}
    for kind, spec in KINDS.items():
        if kind in LOWERED and not has_lower:
            continue
        graph = spec.build(dense).eval()
        graph.save(root / kind)
        out[kind] = (graph, root / kind)
    return out


def saved_types(body) -> set:
    """The module types a graph.json names, its modules' parametrizations included."""
    return {m["type"] for m in body["modules"]} | {p["type"] for m in body["modules"] for chain in m.get("parametrizations", {}).values() for p in chain}


_watching: list[list] = []
_hooked: list = []


def _audit(event, args):
    # the C unpickler reports every class it resolves, whoever called it and however it was imported
    if event == "pickle.find_class" and _watching:
        _watching[-1].append(f"pickle.find_class{args}")


def refusing_unpickling(monkeypatch, calls: list):
    def refused(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called while loading a checkpoint")

        return call

    class RefusedUnpickler:
        def __init__(self, *args, **kwargs):
            calls.append("Unpickler")
            raise AssertionError("pickle.Unpickler was made while loading a checkpoint")

    for owner in (pickle, _pickle):
        monkeypatch.setattr(owner, "load", refused(f"{owner.__name__}.load"))
        monkeypatch.setattr(owner, "loads", refused(f"{owner.__name__}.loads"))
        monkeypatch.setattr(owner, "Unpickler", RefusedUnpickler)
    monkeypatch.setattr(torch, "load", refused("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", refused("torch.serialization.load"))


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=pytest.mark.skipif(k in LOWERED and not has_lower, reason="lower needs an x86-64 CPU and torchao")) for k in KINDS]
)
def test_each_kind_loads_with_unpickling_refused_and_equals_the_saved_graph(kind, saved, monkeypatch):
    graph, path = saved[kind]
    spec = KINDS[kind]
    body = json.loads((path / "graph.json").read_text())
    assert spec.types <= saved_types(body)
    assert spec.packed <= {p["kind"] for p in body["packed"].values()}
    assert spec.dtypes <= {t.dtype for t in safetensors.torch.load_file(path / "model.safetensors").values()}
    assert spec.ops <= {n["target"] for n in body["nodes"] if n["op"] == "call_function"}
    assert all(body[key] for key in spec.filled)

    if not _hooked:
        sys.addaudithook(_audit)  # a hook cannot be removed: installed once, silent unless a load is watched
        _hooked.append(True)
    calls: list = []
    with monkeypatch.context() as patch:
        refusing_unpickling(patch, calls)
        _watching.append(calls)
        try:
            loaded = graphprune.load(path)
        finally:
            _watching.pop()
    assert calls == []

    state, again = graph.module.state_dict(), loaded.module.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    model = make_model("BertForMaskedLM" if kind == "tied_weights" else "BertForSequenceClassification")
    inputs = padded_inputs(model, 2, 9)
    with torch.no_grad():
        assert max_diff(loaded.module(**inputs), graph.module(**inputs)) == 0.0


def test_the_kinds_cover_every_module_type_graphprune_registers(saved):
    ours = {name for name, kind in modules._BY_NAME.items() if kind.cls.__module__.split(".")[0] in ("graphprune", "passes", "torch")}
    written = set().union(*(saved_types(json.loads((path / "graph.json").read_text())) for _, path in saved.values()))
    assert ours <= written, f"no checkpoint kind here saves {sorted(ours - written)}: add one to KINDS"
