"""``prune_weight``: unstructured weight pruning by random, magnitude, Taylor, Wanda, SparseGPT or movement.

Masks weights of the selected Linear layers with reversible masks
(:class:`graphprune.ir.masks.WeightMask`) that survive training and checkpoints;
``commit_masks`` folds them in. See ``targets.py`` for selecting layers and
``selection.py`` for how scores become masks.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.masks import MovementMask, mask_of, set_mask, unmasked_weight, zero_weights
from graphprune.ir.metadata import node_meta
from graphprune.training.calibration import StagedForward, calibration_batches, collect_linear_inputs
from graphprune.training.reconstruction import cross_moments, least_squares_weight, second_moments

from . import scores as scoring
from . import selection
from .sparsegpt import hessian, sparsegpt_prune
from ..analysis.add_sparsity_metadata import record_sparsity
from .targets import input_groups, resolve_entries, select_targets

METHODS = ("random", "l1", "taylor", "wanda", "sparsegpt", "movement")
METHOD_ALIASES = {"l1-norm": "l1", "magnitude": "l1"}  # MASE's and common spellings
GRANULARITY_ALIASES = {"elementwise": "element", "channel": "row"}
DATA_METHODS = ("taylor", "wanda", "sparsegpt")
_N_M = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class WeightEntry:
    """How much and how to prune the weights an entry selects.

    Fields:
        sparsity: share of weights pruned, 0 <= sparsity < 1 (default 0.5; n/m for N:M).
        method: random | l1 | taylor | wanda | sparsegpt | movement (``l1-norm`` = l1).
        scope: local (each tensor) | global (all tensors of this entry together) |
            row (each output row; Wanda's default). SparseGPT picks within column blocks.
        granularity: element | row (whole output rows) | "N:M" such as "2:4" (N of every
            M consecutive inputs pruned) (``elementwise`` = element, ``channel`` = row).
    """

    sparsity: float | None = None
    method: str = "l1"
    scope: str | None = None
    granularity: str = "element"

    def __post_init__(self):
        object.__setattr__(self, "method", METHOD_ALIASES.get(self.method, self.method))
        object.__setattr__(self, "granularity", GRANULARITY_ALIASES.get(self.granularity, self.granularity))
        check_choice("method", self.method, METHODS)
        nm = self.n_m
        if nm is None:
            check_choice("granularity", self.granularity, ("element", "row", "N:M such as 2:4"))
        elif not 0 < nm[0] < nm[1]:
            raise ConfigError("granularity", self.granularity, "N:M with 0 < N < M, such as 2:4")
        if self.sparsity is not None:
            check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
            if nm is not None and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
                raise ConfigError("sparsity", self.sparsity, f"{nm[0] / nm[1]} (N/M) with granularity {self.granularity}, or leave it out")
        if self.scope is not None:
            check_choice("scope", self.scope, ("local", "global", "row"))
        if self.method == "sparsegpt" and (self.granularity == "row" or self.resolved_scope != "local"):
            raise ConfigError("method", self.method, "sparsegpt with granularity element or N:M and scope local (it picks weights within column blocks)")
        if self.method == "movement" and self.granularity != "element":
            raise ConfigError("granularity", self.granularity, "element with method movement")
        if nm is not None and self.resolved_scope != "local":
            raise ConfigError("scope", self.scope, "local with N:M granularity (each group of M is pruned on its own)")
        if self.granularity == "row" and self.resolved_scope == "row":
            raise ConfigError("scope", self.scope, "local or global with granularity row")

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = _N_M.match(self.granularity)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def resolved_sparsity(self) -> float:
        if self.n_m is not None:
            return self.n_m[0] / self.n_m[1]
        return 0.5 if self.sparsity is None else self.sparsity

    @property
    def resolved_scope(self) -> str:
        if self.scope is not None:
            return self.scope
        return "row" if self.method == "wanda" and self.granularity == "element" else "local"


@dataclass(frozen=True)
class PruneWeightConfig:
    """Fields:
    sparsity, method, scope, granularity: the default entry's fields (see ``WeightEntry``).
    by: how other keys select layers: role (default) | type | name (a regex on module paths).
    default: the default entry as a table (the fields above override it).
    <role, type or regex>: an entry for what it selects; its fields override the default's.
    num_samples: calibration examples for taylor, wanda and sparsegpt (default 128).
    dampening: SparseGPT's dampening, a share of the mean Hessian diagonal (default 0.01).
    block_size: SparseGPT's column block (default 128).
    sequential: wanda and sparsegpt take each layer's inputs from the already-pruned
        graph, layer group by layer group (default true), as SparseGPT does.
    correct: sparsegpt aims at the dense graph's layer outputs rather than at each
        layer's own output on the pruned inputs, correcting the error earlier layers
        left (needs sequential).
    seed: for random scores and the calibration subset.
    """

    EXTRA_FIELD = "entries"

    sparsity: float | None = None
    method: str | None = None
    scope: str | None = None
    granularity: str | None = None
    by: str = "role"
    default: WeightEntry | None = None
    entries: dict = field(default_factory=dict)
    num_samples: int = 128
    dampening: float = 0.01
    block_size: int = 128
    sequential: bool = True
    correct: bool = True
    seed: int = 0

    def __post_init__(self):
        default, entries = resolve_entries(self, WeightEntry)
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "entries", entries)
        for name in ("sparsity", "method", "scope", "granularity"):
            object.__setattr__(self, name, getattr(default, name))
        check_range("num_samples", self.num_samples, 1, 1_000_000)
        check_range("dampening", self.dampening, 0.0, 1.0, low_open=True)
        check_range("block_size", self.block_size, 1, 1_000_000)


@graphprune.register_pass("prune_weight", config=PruneWeightConfig)
def prune_weight(graph, config: PruneWeightConfig, data=None):
    """Mask Linear weights by random, l1, taylor, wanda, sparsegpt or movement scores (reversible masks).

    Methods taylor, wanda and sparsegpt need calibration data (``data=``). Masks only
    grow: pruning again at a higher sparsity keeps every earlier pruned weight.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "prune_weight", {"method": "wanda", "sparsity": 0.5}, data=splits["train"])
        >>> graph, _ = graphprune.run_pass(graph, "commit_masks")
    """
    start = time.perf_counter()
    targets = select_targets(graph, config.by, config.default, config.entries)
    if not targets:
        raise ValueError("pass 'prune_weight': no Linear layer is selected (check 'by' and the entries)")
    needs = {t.entry.method for t in targets} & set(DATA_METHODS)
    batches = None
    if needs:
        batches = calibration_batches(
            graph, data, num_samples=config.num_samples, seed=config.seed, needs_targets="taylor" in needs,
            caller=f"pass 'prune_weight' (method {', '.join(sorted(needs))})",
        )
    # Entries with the same rule are pruned together (global scope pools them).
    groups: dict[object, list] = {}
    for target in targets:
        groups.setdefault(target.entry, []).append(target)
    for entry, members in groups.items():
        if entry.method == "sparsegpt":
            _prune_sparsegpt(graph, members, entry, config, batches)
        elif entry.method == "wanda" and config.sequential and _single_call(graph, members):
            _prune_wanda_sequential(graph, members, entry, batches)
        else:
            _apply(members, entry, _scores(graph, members, entry, config, batches))

    total = zeros = 0
    for target in targets:
        numel = unmasked_weight(target.module).numel()
        pruned = zero_weights(target.module)
        total += numel
        zeros += pruned
        entry = target.entry
        node_meta(target.node, "sparsity")["weight"] = {
            "method": entry.method,
            "granularity": entry.granularity,
            "scope": entry.resolved_scope,
            "target": entry.resolved_sparsity,
            "achieved": pruned / numel,
        }
    record_sparsity(graph)
    return graph, {
        "modules": len(targets),
        "weight_sparsity": zeros / total,
        "methods": sorted({t.entry.method for t in targets}),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _scores(graph, targets, entry, config, batches) -> dict:
    if entry.method == "random":
        return scoring.random_scores(targets, config.seed)
    if entry.method == "l1":
        return scoring.magnitude_scores(targets)
    if entry.method == "taylor":
        return scoring.taylor_scores(graph, targets, batches)
    if entry.method == "wanda":
        return scoring.wanda_scores(targets, scoring.input_square_sums(graph, targets, batches))
    if entry.method == "movement":
        for t in targets:
            existing = mask_of(t.module)
            if existing is not None and not isinstance(existing, MovementMask):
                raise ValueError(
                    f"pass 'prune_weight': {t.path} is masked by another method; movement needs its scores from the "
                    "start (commit the masks first)"
                )
            if existing is None:
                set_mask(t.module, torch.ones_like(t.module.weight, dtype=torch.bool), movement=True)
        return scoring.movement_scores(targets)
    raise ValueError(f"unknown method {entry.method!r}")


def _keeps(targets) -> dict:
    return {t.path: mask_of(t.module).mask.clone() for t in targets if mask_of(t.module) is not None}


def _apply(targets, entry, scores: dict) -> None:
    keeps = _keeps(targets)
    sparsity = entry.resolved_sparsity
    if sparsity == 0 and entry.method != "movement" and not keeps:
        return
    scope = entry.resolved_scope
    if entry.n_m is not None:
        masks = selection.n_m_masks(scores, *entry.n_m, keeps)
    elif entry.granularity == "row":
        masks = selection.whole_row_masks(scores, sparsity, keeps, pooled=scope == "global")
    elif scope == "global":
        masks = selection.global_masks(scores, sparsity, keeps)
    elif scope == "row":
        masks = selection.row_masks(scores, sparsity, keeps)
    else:
        masks = selection.local_masks(scores, sparsity, keeps)
    for t in targets:
        set_mask(t.module, masks[t.path], movement=entry.method == "movement")


def _single_call(graph, targets) -> bool:
    """Every target module is called once (not ALBERT's shared layer): layers can be staged in order."""
    calls = Counter(n.target for n in graph.module.graph.nodes if n.op == "call_module")
    return all(calls[t.path] == 1 for t in targets)


def _prune_wanda_sequential(graph, targets, entry, batches) -> None:
    run = StagedForward(graph, batches)
    for group in input_groups(targets):
        run.advance_to(group[0].node)
        sums = sum(rows.double().pow(2).sum(dim=0) for rows in run.input_rows(group[0].node))
        _apply(group, entry, scoring.wanda_scores(group, {t.path: sums for t in group}))


@torch.no_grad()
def _prune_sparsegpt(graph, targets, entry, config, batches) -> None:
    if entry.resolved_sparsity == 0 and all(mask_of(t.module) is None for t in targets):
        return  # nothing to prune: the weights stay exactly as they are
    if config.sequential and _single_call(graph, targets):
        # Layer groups in order, each with its inputs from the graph as pruned so far
        # (SparseGPT's sequential mode), in one staged forward pass.
        run = StagedForward(graph, batches)
        dense = StagedForward(graph.copy(), batches) if config.correct else None
        dense_nodes = {n.name: n for n in dense.module.graph.nodes} if dense else {}
        for group in input_groups(targets):
            node = group[0].node
            run.advance_to(node)
            rows = run.input_rows(node)
            square, tokens = second_moments(rows)
            stats = {"square": square, "tokens": tokens}
            if dense is not None:
                dense.advance_to(dense_nodes[node.name])
                stats["cross"] = cross_moments(dense.input_rows(dense_nodes[node.name]), rows)
            for t in group:
                _sparsegpt_one(t, entry, config, stats)
        return
    stats = {t.path: {"square": None, "tokens": 0} for t in targets}

    def accumulate(name, rows):
        rows = rows.double()
        gram = rows.T @ rows
        stats[name]["square"] = gram if stats[name]["square"] is None else stats[name]["square"] + gram
        stats[name]["tokens"] += rows.shape[0]

    collect_linear_inputs(graph, batches, {t.path: t.module for t in targets}, accumulate)
    for t in targets:
        _sparsegpt_one(t, entry, config, stats[t.path])


def _sparsegpt_one(target, entry, config, stats: dict) -> None:
    h = hessian(stats["square"], stats["tokens"])
    weight = unmasked_weight(target.module).detach()
    if stats.get("cross") is not None:
        # Aim at the dense graph's layer output, not this layer's on the pruned inputs:
        # the least-squares weights for the pruned inputs, W C (X_p X_p^T)^-1, are what
        # SparseGPT then prunes, which corrects the error earlier layers left.
        weight = least_squares_weight(weight, stats["square"], stats["cross"], config.dampening)
    keep = mask_of(target.module).mask.clone() if mask_of(target.module) is not None else None
    new_weight, new_keep = sparsegpt_prune(
        weight, h, sparsity=entry.resolved_sparsity, n_m=entry.n_m, keep=keep,
        block_size=config.block_size, dampening=config.dampening,
    )
    unmasked_weight(target.module).copy_(new_weight)  # the OBS update of the kept weights
    set_mask(target.module, new_keep)
