"""``factorize``: Linears as two smaller Linears with a gated rank between them (Wang et al. 2019, FLOP).

Each chosen Linear ``W`` (d_out x d_in, bias b) becomes ``second(z * first(x))``:
``first`` (d_in -> k, no bias) holds ``S^1/2 V^T`` and ``second`` (k -> d_out) holds
``U S^1/2`` and ``b``, from the SVD ``W = U S V^T``, and ``z`` is a hard-concrete gate
per rank. With every gate at 1 the pair is ``W`` again (to float rounding); at
``rank = r`` it is the rank-r truncated SVD. ``graphprune.finetune`` then trains the
gates' ``log_alpha`` with a Lagrangian that drives the expected size, the fraction
``sum (d_in + d_out) E[L0] / sum d_in d_out``, to ``target``; committing
(``commit_gates``) folds ``z`` into ``first``, drops the closed ranks, and multiplies
a pair back into one dense Linear where its kept rank is not cheaper
(:mod:`.factorize_commit`).

``second`` keeps the original Linear's name, so its role (query, ffn_up, ...), the
head layout read after it, the FFN width and the structured passes' block finding
stay as before; ``first`` is ``<name>_first`` and the gate ``<name>_rank_gate``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx, nn

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.gates import (
    GATES,
    LOG_ALPHA_LIMIT,
    TEMPERATURE_RANGE,
    GateMethod,
    HardConcreteGate,
    add_gate,
    multiply_after,
    register_gate_method,
)
from graphprune.ir.masks import has_uncommitted_masks
from graphprune.ir.metadata import ENCODER_ROLES, common

from ..analysis.init_metadata import nodes_by_section
from ..analysis.roles import _LINEAR_ROLES, layer_keys, node_role
from .blocks import finish_surgery
from .factorize_commit import commit_factorize, new_linear

PASS = "factorize"
LINEAR_ROLES = [role for role, _ in _LINEAR_ROLES] + ["other", "classifier"]


@dataclass(frozen=True)
class FactorizeConfig:
    """Fields:
    roles: the Linears to factorize, by role (default the encoder projections: query, key, value,
        attention_output, ffn_up, ffn_down).
    names: a regular expression searched in module names; when set it chooses the Linears instead of ``roles``.
    target: remaining weight fraction of the chosen Linears after commit, relative to their dense weights, 0 < target < 1.
    temperature: the hard-concrete temperature (default 2/3, CoFi's; FLOP uses 1).
    init: initial log_alpha of every rank gate (default 10: open).
    rank: start from the rank-r truncated SVD (capped at each Linear's full rank) instead of full rank.
    """

    roles: tuple[str, ...] = ENCODER_ROLES
    names: str | None = None
    target: float = 0.5
    temperature: float = 2 / 3
    init: float = 10.0
    rank: int | None = None

    def __post_init__(self):
        check_range("target", self.target, 0, 1, low_open=True, high_open=True)
        check_range("temperature", self.temperature, *TEMPERATURE_RANGE)
        check_range("init", self.init, -LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
        if self.rank is not None:
            check_range("rank", self.rank, 1)
        if self.names is None:
            if not self.roles:
                raise ConfigError("roles", self.roles, f"a non-empty list of Linear roles from {sorted(LINEAR_ROLES)}, or names")
            for role in self.roles:
                check_choice("roles", role, LINEAR_ROLES)
        else:
            try:
                re.compile(self.names)
            except re.error as error:
                raise ConfigError("names", self.names, f"a regular expression ({error})") from None


def _fail(message: str) -> ValueError:
    return ValueError(f"pass {PASS!r}: {message}")


def _chosen(graph, config: FactorizeConfig) -> list[fx.Node]:
    """The chosen Linears' call nodes, checked before anything changes (so errors leave the graph as it was)."""
    gm = graph.module
    layers = layer_keys(gm)
    linears = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]

    def role(node):  # without writing metadata: a refused pass leaves the graph untouched
        return common(node).get("role") or node_role(node, gm.get_submodule(node.target), layers.get(node.name))

    if config.names is not None:
        pattern = re.compile(config.names)
        chosen = [n for n in linears if pattern.search(n.target)]
        asked = f"names = {config.names!r}"
    else:
        chosen = [n for n in linears if role(n) in config.roles]
        asked = f"roles = {list(config.roles)}"
    if not chosen:
        present = sorted({role(n) for n in linears})
        raise _fail(f"no Linear matches {asked}; this graph's Linears have roles {present}")
    calls: dict[str, int] = {}
    for node in linears:
        calls[node.target] = calls.get(node.target, 0) + 1
    for node in chosen:
        module = gm.get_submodule(node.target)
        d_out, d_in = module.weight.shape
        if calls[node.target] > 1:
            raise _fail(f"{node.target} is called {calls[node.target]} times (a shared layer); factorizing one call would change every call")
        if type(module) is not nn.Linear or has_uncommitted_masks(module):
            raise _fail(f"{node.target} is not a plain nn.Linear (it carries masks, hooks or fake-quantizers); commit them first (commit_masks)")
        if d_in * d_out <= d_in + d_out:
            raise _fail(
                f"{node.target} ({d_in} -> {d_out}) cannot be factorized: even rank 1 needs {d_in + d_out} weights, "
                f"the dense Linear {d_in * d_out}; leave it out of roles/names"
            )
    return chosen


def _svd_halves(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S^1/2 V^T, U S^1/2)`` of the top ``rank`` singular values; in float64 so that the pair multiplies back to ``W`` to 1e-7."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


def _stack_for(node: fx.Node, target: str, module: nn.Module) -> dict:
    """The Linear's module stack with its own entry replaced by the new module's, so layer and owner stay right."""
    stack = dict(node.meta.get("nn_module_stack", {}))
    if stack:
        stack.popitem()
    cls = type(module)
    stack[f"L__self__{target}"] = (target, f"{cls.__module__}.{cls.__qualname__}")
    return stack


def _free_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_2``, ... where a committed pair of an earlier factorization already holds it."""
    taken = {path for path, _ in gm.named_modules()}
    candidate, count = name, 1
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    return candidate


def _factorize_one(gm: fx.GraphModule, node: fx.Node, config: FactorizeConfig) -> dict:
    target = node.target
    old = gm.get_submodule(target)
    d_out, d_in = old.weight.shape
    k = min(d_in, d_out) if config.rank is None else min(config.rank, d_in, d_out)
    first_w, second_w = _svd_halves(old.weight, k)
    first = new_linear(first_w, None, old)
    second = new_linear(second_w, old.bias, old)
    names = {"first": _free_name(gm, f"{target}_first"), "gate": _free_name(gm, f"{target}_rank_gate"), "second": target}
    gm.add_submodule(names["first"], first)
    gm.set_submodule(target, second)  # the node at ``target`` now calls ``second``
    with gm.graph.inserting_before(node):
        first_node = gm.graph.call_module(names["first"], (node.args[0],))
    first_node.meta["nn_module_stack"] = _stack_for(node, names["first"], first)
    gate = HardConcreteGate(k, temperature=config.temperature, init=config.init).to(old.weight.device)
    gate.train(old.training)
    gate_node = add_gate(gm, names["gate"], gate, first_node)
    gate_node.meta["nn_module_stack"] = _stack_for(node, names["gate"], gate)
    # the gate's value has a shape only; its forward is data-dependent (top-k), so it is not run in fake mode
    x = node.args[0].meta.get("val")
    if isinstance(x, torch.Tensor):
        gate_node.meta["val"] = x.new_empty((k,))
    node.args = (first_node,) + tuple(node.args[1:])
    multiply_after(gm, first_node, gate_node)
    return {"target": target, "d_in": int(d_in), "d_out": int(d_out), "rank": int(k), **names}


@graphprune.register_pass(PASS, config=FactorizeConfig)
def factorize(graph, config: FactorizeConfig):
    """Replace the chosen Linears by SVD-initialised, rank-gated factor pairs, to be trained and committed.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "factorize", {"target": 0.4})
        >>> graphprune.finetune(graph, splits["train"], tokenizer, epochs=2)   # trains the rank gates to the target
        >>> graph, info = graphprune.run_pass(graph, "commit_gates")
    """
    record = graph.meta.get(GATES)
    if record:
        raise _fail(
            f"the graph already carries uncommitted {record.get('method')!r} gates; commit them first "
            "(graphprune.run_pass(graph, 'commit_gates')) and factorize after"
        )
    chosen = _chosen(graph, config)
    linears = [_factorize_one(graph.module, node, config) for node in chosen]
    firsts = [n for n in graph.module.graph.nodes if n.op == "call_module" and n.target in {r["first"] for r in linears}]
    finish_surgery(graph, firsts)
    graph.meta[GATES] = {"method": PASS, "target": config.target, "metric": "params", "linears": linears}
    graph.record_edit({"pass": PASS, "linears": [{k: r[k] for k in ("target", "d_in", "d_out", "rank")} for r in linears]})
    dense = sum(r["d_in"] * r["d_out"] for r in linears)
    factored = sum((r["d_in"] + r["d_out"]) * r["rank"] for r in linears)
    return graph, {"linears": len(linears), "dense_weights": dense, "factored_weights": factored, "target": config.target}


# -- the gate method -----------------------------------------------------------------


def expected_fraction(graph) -> torch.Tensor:
    """Expected remaining weights of the factored Linears over their dense weights (differentiable)."""
    gm = graph.module
    linears = graph.meta[GATES]["linears"]
    expected = sum((r["d_in"] + r["d_out"]) * gm.get_submodule(r["gate"]).expected_l0() for r in linears)
    return expected / sum(r["d_in"] * r["d_out"] for r in linears)


def describe(graph) -> dict[str, dict]:
    """Per summary row, the ranks the gates keep at evaluation over the ranks factored, summed over its Linears."""
    gm = graph.module
    gates = {r["gate"] for r in graph.meta[GATES]["linears"]}
    counts: dict[str, list[int]] = {}
    for node, section in nodes_by_section(graph):
        if node.op == "call_module" and node.target in gates:
            gate = gm.get_submodule(node.target)
            kept = int(round(float(gate.expected_l0().detach())))  # what ``deterministic`` keeps
            row = counts.setdefault(str(section), [0, 0])
            row[0] += kept
            row[1] += gate.size
    return {label: {"rank": f"{kept}/{total}"} for label, (kept, total) in counts.items()}


register_gate_method(GateMethod(PASS, expected_fraction, commit_factorize, describe))
