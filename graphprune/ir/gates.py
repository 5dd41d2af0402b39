"""Hard-concrete gates on a graph (Louizos et al. 2018), and the methods that train and commit them.

A gate is a vector ``z`` of values in [0, 1], one per unit (a head, an FFN neuron, a
whole sublayer, a hidden dimension, a rank of a factored matrix), produced by a
``call_module`` node of its own and multiplied into the graph where the units'
values flow. In training ``z`` is sampled from the stretched hard-concrete
distribution, so a unit is exactly 0 or 1 with positive probability and the expected
number of open units (the expected L0) is differentiable in ``log_alpha``; at
evaluation ``z`` is deterministic: the ``round(E[L0])`` units with the largest gates
keep their soft value ``sigmoid(0.8 log_alpha / T)``, the rest are 0 (as the authors'
code of FLOP and CoFi does). Gates are modules, so they train with ``finetune``, save
and reload with checkpoints, and copy with the graph.

A *gate method* (``l0_structured``, ``factorize``) puts gates on a graph and records
itself in ``graph.meta["gates"]``; it registers here how to compute the expected
remaining size (a differentiable fraction of the dense size, which the Lagrangian
controller drives to the target), how to describe the gates in ``summary()``, and how
to commit them: fold the soft values into the weights and remove what they closed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from .modules import register_module_type

LOW, HIGH = -0.1, 1.1  # the stretch limits of Louizos et al.
EVAL_SHARPENING = 0.8  # the authors' factor on log_alpha / T for the soft value kept at evaluation
GATES = "gates"  # graph.meta key
# Configs keep log_alpha and the temperature where float32 arithmetic stays finite: a gate at
# |log_alpha| = 50 is already shut or open with probability 1 - 1e-21.
LOG_ALPHA_LIMIT = 50.0
TEMPERATURE_RANGE = (1e-2, 10.0)


class HardConcreteGate(nn.Module):
    """``size`` gates with learned ``log_alpha``; ``forward()`` (no input) returns ``z`` shaped ``shape``.

    Args:
        size: number of units.
        shape: how ``z`` broadcasts where it is multiplied in (default ``(size,)``).
        temperature: the hard-concrete temperature (CoFi's 2/3 by default).
        init: initial ``log_alpha`` (large: open; CoFi uses 10 for heads and layers).
    """

    def __init__(self, size: int, shape: tuple[int, ...] | None = None, temperature: float = 2 / 3, init: float = 10.0):
        super().__init__()
        self.size = int(size)
        self.shape = tuple(int(s) for s in (shape or (size,)))
        if math.prod(self.shape) != self.size:
            raise ValueError(f"HardConcreteGate: shape {self.shape} does not hold {self.size} gates")
        self.temperature = float(temperature)
        self.log_alpha = nn.Parameter(torch.full((self.size,), float(init)))

    def open_probability(self) -> torch.Tensor:
        """P(z_i > 0) per unit: its contribution to the expected L0 (differentiable)."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-LOW / HIGH))

    def expected_l0(self) -> torch.Tensor:
        return self.open_probability().sum()

    def sample(self) -> torch.Tensor:
        eps = 1e-6
        u = torch.rand_like(self.log_alpha).clamp(eps, 1 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """The evaluation gate: the ``round(E[L0])`` largest keep their soft value, the others are 0."""
        keep = int(round(float(self.expected_l0())))
        soft = torch.sigmoid(self.log_alpha / self.temperature * EVAL_SHARPENING)
        z = torch.zeros_like(soft)
        if keep > 0:
            index = torch.topk(soft, keep).indices
            z[index] = soft[index]
        return z

    def forward(self) -> torch.Tensor:
        if torch._guards.detect_fake_mode() is not None:  # shape propagation: the top-k is data-dependent
            return self.log_alpha.new_empty(self.shape)
        z = self.sample() if self.training else self.deterministic()
        return z.view(self.shape)

    def extra_repr(self) -> str:
        return f"size={self.size}, shape={self.shape}, temperature={self.temperature:.3g}"


register_module_type(
    "graphprune.HardConcreteGate",
    HardConcreteGate,
    lambda m: {"size": m.size, "shape": list(m.shape), "temperature": m.temperature},
    lambda c: HardConcreteGate(c["size"], tuple(c["shape"]), c["temperature"]),
)


@dataclass(frozen=True)
class GateMethod:
    """How a gate method's gates are sized, described and committed (see the module docstring).

    expected_fraction(graph) -> scalar tensor: expected remaining size / dense size (differentiable).
    commit(graph) -> dict: fold and remove, in place; returns what was removed.
    describe(graph) -> dict[str, dict]: per summary row label ("0", "1", ..., "embeddings"), extra columns.
    """

    name: str
    expected_fraction: Callable
    commit: Callable
    describe: Callable | None = None


_METHODS: dict[str, GateMethod] = {}


def register_gate_method(method: GateMethod) -> None:
    if method.name in _METHODS:
        raise ValueError(f"gate method {method.name!r} is already registered")
    _METHODS[method.name] = method


def gate_method(graph) -> GateMethod | None:
    """The method whose gates are on ``graph`` (None without gates)."""
    record = graph.meta.get(GATES)
    if not record:
        return None
    method = _METHODS.get(record["method"])
    if method is None:
        raise ValueError(f"the graph carries {record['method']!r} gates but no such gate method is registered (import graphprune.passes)")
    return method


def gate_groups(graph) -> list[str]:
    """The gate methods on ``graph``: empty, or one name."""
    record = graph.meta.get(GATES)
    return [record["method"]] if record else []


def gate_modules(graph) -> dict[str, HardConcreteGate]:
    return {name: m for name, m in graph.module.named_modules() if isinstance(m, HardConcreteGate)}


def add_gate(gm: fx.GraphModule, target: str, gate: HardConcreteGate, before: fx.Node) -> fx.Node:
    """Install ``gate`` at ``target`` and a ``call_module`` node for it, placed before ``before``."""
    gm.add_submodule(target, gate.train(gm.training))  # a new module trains; in an evaluating graph it must not sample
    with gm.graph.inserting_before(before):
        node = gm.graph.call_module(target, ())
    node.meta["nn_module_stack"] = dict(before.meta.get("nn_module_stack", {}))
    return node


def multiply_after(gm: fx.GraphModule, value: fx.Node, z: fx.Node) -> fx.Node:
    """Multiply ``value`` by gate output ``z`` for every current user of ``value``; returns the product node."""
    users = list(value.users)
    with gm.graph.inserting_after(value):
        product = gm.graph.call_function(torch.ops.aten.mul.Tensor, (value, z))
    product.meta["nn_module_stack"] = dict(value.meta.get("nn_module_stack", {}))
    product.meta["graphprune.gate_product"] = True
    for user in users:
        user.replace_input_with(value, product)
    return product


def remove_gate_products(gm: fx.GraphModule) -> None:
    """Drop every gate product (its users read the ungated value again) and the gate nodes and modules."""
    for node in list(gm.graph.nodes):
        if node.meta.get("graphprune.gate_product"):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), HardConcreteGate):
            if node.users:
                raise ValueError(f"gate {node.target} is still used by {[u.name for u in node.users]}; the method's commit must replace those uses first")
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
