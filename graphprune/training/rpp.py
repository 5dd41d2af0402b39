"""Reweighted Proximal Pruning (Guo et al. 2019, "Reweighted Proximal Pruning for Large-Scale
Language Representation"): a reweighted L1 penalty on the encoder weights, applied by a
proximal step after each optimiser step rather than through the loss.

AdamW's normalised steps make an L1 gradient term useless (every weight moves by about
``lr`` whatever its size, none lands on zero), so after each AdamW step every selected
weight is soft-thresholded::

    w <- sign(w) * max(|w| - lr * lambda * r, 0),    r = 1 / (|w_ref| + epsilon)

``lr`` is the learning rate of the weight's parameter group after the step (the
schedule has already moved on by one step), ``w_ref`` the weight at the last reweighting
(training start, then every ``reweight_every`` steps): weights already small get a larger
threshold, which approximates an L0 penalty (Candes et al. 2008). ``lambda = penalty *
mean|w_0|``, the mean magnitude of the selected non-zero weights at the start, so
``penalty`` is free of the model's weight scale: at ``penalty = 1`` a weight of average
size shrinks by ``lr`` a step, as far as one Adam step can move it back.

Fields of :class:`RppConfig` (the ``rpp`` table of :func:`graphprune.finetune`):

- ``penalty`` (> 0, default 32): at lr 5e-5 over 300 steps on Rotten Tomatoes, with no
  masks, penalty 8 zeroes 26% of MiniLM's selected weights, final training loss 0.385
  (penalty 2: 13%, 0.374; 16: 36%, 0.402). With the masks grown to 70% in one epoch
  (below), penalty 32 reached validation 0.797 and 8 reached 0.776; with layer-wise
  distillation too, 32 reached 0.798, 128 0.785, and 512 collapsed to 0.638. So 32 is
  the default (chosen on validation);
- ``epsilon`` (> 0, default 1e-3): small against BERT weights (|w| ~ 0.02-0.05); it caps
  a zero weight's threshold at ``lr * lambda / epsilon``, which holds zeros against Adam;
- ``reweight_every`` (integer >= 1, default 50);
- ``sparsity`` (None, or in (0, 1)): masks drop exactly this share of the selected
  weights, the smallest |w| under one threshold for all of them (exact zeros first):
  the penalty is the same for every matrix, so its ranking is global and the matrices
  it emptied most are pruned most. No matrix is protected from emptying; if the steps
  zeroed more than ``sparsity``, the extra zeros stay unmasked zeros. Without a
  sparsity there are no masks, and ``mask_at``, ``mask_from`` and ``mask_every`` do nothing;
- ``mask_at`` (in (0, 1], default 0.5): the share of the run's steps after which all
  the masks are in; the proximal steps stop there and the rest of the run fine-tunes
  the kept weights under the masks, the retraining of Guo et al.'s pruning step. At 1
  the masks are complete only after the last step, with no retraining;
- ``mask_from`` (None, or a fraction in [0, ``mask_at``), default 0): a fraction grows
  the masks from that share of the steps on, on Zhu and Gupta's cubic schedule from 0
  to ``sparsity`` at ``mask_at``, while the proximal steps go on shrinking the weights
  still kept: each cut is small and falls on weights the penalty has already shrunk.
  None puts all the masks in at once at ``mask_at``;
- ``mask_every`` (integer >= 1, default 10): the steps between two cuts of ``mask_from``.

  One epoch at 70% sparsity on MiniLM, distilled (2-core Intel Xeon, validation /
  test; the baseline is 0.834 / 0.833): all masks at once at ``mask_at`` 0.75: 0.770 /
  0.764, at 0.5: 0.779 / 0.787; grown from the start to ``mask_at`` 0.7: 0.785 / 0.804,
  to 0.5: 0.797 / 0.816, to 0.35: 0.780 / 0.804; grown to 0.5 with layer-wise
  distillation (``kd_hidden_weight = 1``) and ``learning_rate = 1e-4``: 0.813 / 0.831.
  (Half an epoch with all masks after the last step, on a Zen 5, lost 9.7 points on
  test.) Masks go in only as far as the run gets: after an error the weights and the
  cuts made so far stay as they are;
- ``roles`` (default the six encoder projections ``query, key, value,
  attention_output, ffn_up, ffn_down``), read from the node metadata.

Example:
    >>> graphprune.finetune(graph, train, tok, teacher=dense, max_steps=300, rpp={"penalty": 8, "sparsity": 0.7, "mask_at": 1, "mask_from": None})
    >>> graph.meta["rpp"]["zeros_before_masks"], graph.meta["rpp"]["sparsity"]
    (0.26, 0.7)
    >>> graphprune.commit_masks(graph)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..infra.pipeline import run_pass
from ..ir.masks import mask_of, pruning_hooks, set_mask, unmasked_weight
from ..ir.metadata import ENCODER_ROLES, common
from .schedule import cubic_sparsity

# every role the metadata gives a Linear node (passes/analysis/roles.py, which we may not import)
LINEAR_ROLES = ENCODER_ROLES + ("embedding_projection", "pooler", "classifier", "other")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RppConfig:
    penalty: float = 32.0  # lambda in units of the selected weights' mean |w| at the start; chosen on validation
    epsilon: float = 1e-3
    reweight_every: int = 50
    sparsity: float | None = None
    mask_at: float = 0.5  # chosen on the validation split, see the docstring
    mask_from: float | None = 0.0  # the masks grow from the start; chosen on the validation split
    mask_every: int = 10
    roles: tuple[str, ...] = ENCODER_ROLES

    def __post_init__(self):
        roles = self.roles
        if isinstance(roles, (list, tuple)) and all(isinstance(r, str) for r in roles):
            object.__setattr__(self, "roles", tuple(roles))  # a TOML list arrives as a list
        checks = [
            ("penalty", _number(self.penalty) and self.penalty > 0, "a number > 0"),
            ("epsilon", _number(self.epsilon) and self.epsilon > 0, "a number > 0"),
            ("reweight_every", isinstance(self.reweight_every, int) and not isinstance(self.reweight_every, bool)
             and self.reweight_every >= 1, "an integer >= 1"),
            ("sparsity", self.sparsity is None or (_number(self.sparsity) and 0 < self.sparsity < 1), "a fraction in (0, 1) or None"),
            ("mask_at", _number(self.mask_at) and 0 < self.mask_at <= 1, "a fraction in (0, 1]"),
            ("mask_from", self.mask_from is None or (_number(self.mask_from) and 0 <= self.mask_from < self.mask_at),
             f"None or a fraction in [0, mask_at = {self.mask_at!r})"),
            ("mask_every", isinstance(self.mask_every, int) and not isinstance(self.mask_every, bool)
             and self.mask_every >= 1, "an integer >= 1"),
            ("roles", isinstance(self.roles, tuple) and self.roles and all(r in LINEAR_ROLES for r in self.roles),
             f"a non-empty list of Linear roles from {list(LINEAR_ROLES)}"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                value = roles if name == "roles" else getattr(self, name)
                raise ValueError(f"finetune: rpp.{name} = {value!r} is not allowed; expected {allowed}")

    @classmethod
    def from_options(cls, options: Mapping) -> RppConfig:
        """The config of an ``rpp`` options table; ``ValueError`` naming ``rpp.<field>`` otherwise."""
        if not isinstance(options, Mapping):
            raise ValueError(f"finetune: rpp = {options!r} is not allowed; expected a table of rpp options")
        allowed = [f.name for f in fields(cls)]
        for key, value in options.items():
            if key not in allowed:
                raise ValueError(f"finetune: rpp.{key} = {value!r} is not allowed; expected one of the rpp options {allowed}")
        return cls(**options)  # unpacking copies: the caller's dict is never touched


def selected_weights(graph, roles) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Module name -> (Linear, its Parameter under any mask) for the Linear nodes with these roles."""
    gm = graph.module
    if any("role" not in common(n) for n in gm.graph.nodes):
        run_pass(graph, "init_metadata", inplace=True)
    found, seen = {}, set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or common(node).get("role") not in roles:
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear):
            continue
        if pruning_hooks(module):
            raise ValueError(f"finetune: rpp: {node.target} has torch.nn.utils.prune masks; run 'commit_masks' first")
        weight = unmasked_weight(module)
        if id(weight) not in seen:  # ALBERT's shared layer, tied weights: one step each
            seen.add(id(weight))
            found[node.target] = (module, weight)
    if not found:
        raise ValueError(f"finetune: rpp.roles = {list(roles)!r} is not allowed; expected roles of Linear layers in this graph")
    return found


def _effective(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    mask = mask_of(module)
    return weight if mask is None else torch.where(mask.mask, weight, 0.0)


class ReweightedProximal:
    """Finetune callback: the reweighted proximal step after every optimiser step, masks at the end.

    ``reweights`` holds ``r`` per module and ``reweighted_at`` the steps it was computed
    at; after training ``report`` (also ``graph.meta["rpp"]``) has the absolute lambda,
    the share of exact zeros the proximal steps alone reached (``zeros_before_masks``,
    counted when the masks go in, or at the end without them), the masked share
    (``sparsity``, None without masks) and the step the masks went in at
    (``masked_at_step``).
    """

    def __init__(self, config: RppConfig | None = None):
        self.config = config or RppConfig()
        self.report: dict = {}
        self.reweights: dict[str, torch.Tensor] = {}
        self.reweighted_at: list[int] = []
        self.penalty: float | None = None
        self._targets: dict = {}
        self._groups: dict[int, dict] = {}
        self._step, self._total = 0, None
        self._masked_at: int | None = None
        self.cuts: list[tuple[int, float]] = []  # (step, masked share) of every mask step
        self._zeros: float | None = None

    def on_train_begin(self, graph, total_steps: int) -> None:
        self._targets = selected_weights(graph, self.config.roles)
        self._step, self._total, self.reweighted_at = 0, total_steps, []
        self._masked_at, self._zeros, self.cuts = None, None, []
        with torch.no_grad():
            values = torch.cat([_effective(m, w).detach().abs().flatten() for m, w in self._targets.values()])
            kept = values[values != 0]
            scale = kept.mean().item() if kept.numel() else 1.0
        self.penalty = self.config.penalty * scale
        self._reweight(0)

    def on_optimizer(self, optimizer) -> None:
        # the group dicts are live: the schedule writes each step's lr into them
        self._groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}

    @torch.no_grad()
    def _reweight(self, step: int) -> None:
        self.reweights = {name: 1.0 / (w.detach().abs() + self.config.epsilon) for name, (_, w) in self._targets.items()}
        self.reweighted_at.append(step)

    def _mask_step(self) -> int | None:
        """The step after which all the masks are in (None: no masks, or none before the end)."""
        if self.config.sparsity is None or self.config.mask_at >= 1 or self._total is None:
            return None
        return max(1, math.ceil(self.config.mask_at * self._total))

    def _cut_due(self, step: int) -> float | None:
        """The share the masks drop after this step of a ``mask_from`` ramp (None: no cut now)."""
        if self.config.sparsity is None or self.config.mask_from is None or self._total is None:
            return None
        start = math.floor(self.config.mask_from * self._total)
        end = self._mask_step() or self._total  # mask_from < mask_at puts it after start
        if step <= start or step >= end or (step - start) % self.config.mask_every:
            return None  # the last cut, to `sparsity` itself, is the mask step's
        return cubic_sparsity(step, initial=0.0, final=self.config.sparsity, start=start, end=end)

    @torch.no_grad()
    def on_step_end(self, graph, step: int, total_steps: int) -> None:
        self._step = step
        if self._masked_at is not None:
            return  # retraining under the masks: no more proximal steps
        for name, (_, weight) in self._targets.items():
            group = self._groups.get(id(weight))
            if group is None or not group["lr"]:
                continue  # a frozen weight (not optimised) is left as it is
            shrunk = (weight.abs() - group["lr"] * self.penalty * self.reweights[name]).clamp_(min=0)
            # where, not sign * shrunk: a zeroed negative weight is +0.0, one bit pattern for sparse checkpoints
            weight.copy_(torch.where(shrunk > 0, weight.sign() * shrunk, 0.0))
        mask_step, cut = self._mask_step(), self._cut_due(step)
        if mask_step is not None and step >= mask_step:
            self._mask(step, self.config.sparsity)
            self._masked_at = step
        elif cut is not None and cut > 0:
            self._mask(step, cut)
        if self._masked_at is None and step % self.config.reweight_every == 0:
            self._reweight(step)

    @torch.no_grad()
    def _mask(self, step: int, share: float) -> None:
        values = [_effective(m, w).detach() for m, w in self._targets.values()]
        if self._zeros is None:  # the proximal steps' own zeros, before the first cut
            self._zeros = sum(int((v == 0).sum()) for v in values) / sum(v.numel() for v in values)
        self._install_masks(values, share)
        self.cuts.append((step, share))

    def on_train_end(self, graph) -> None:
        if not self._targets:
            return
        # masks at the end only after a finished run: after an error the weights stay as the steps left them
        if self._masked_at is None and self.config.sparsity is not None and self._total is not None and self._step >= self._total:
            self._mask(self._step, self.config.sparsity)
            self._masked_at = self._step
        with torch.no_grad():
            values = [_effective(m, w).detach() for m, w in self._targets.values()]
        total = sum(v.numel() for v in values)
        zeros = self._zeros if self._zeros is not None else sum(int((v == 0).sum()) for v in values) / total
        sparsity = None
        if self.cuts:  # a run stopped within a mask_from ramp keeps its cuts so far
            masks = [mask_of(m) for m, _ in self._targets.values()]
            sparsity = sum(int((~k.mask).sum()) for k in masks) / total  # every cut masks every target
        self.report = {
            "penalty": self.config.penalty, "penalty_absolute": self.penalty, "epsilon": self.config.epsilon,
            "reweight_every": self.config.reweight_every, "roles": list(self.config.roles), "weights": total,
            "zeros_before_masks": zeros, "sparsity": sparsity, "mask_at": self.config.mask_at,
            "mask_from": self.config.mask_from, "masked_at_step": self._masked_at, "cuts": len(self.cuts),
        }
        graph.meta["rpp"] = dict(self.report)
        run_pass(graph, "add_sparsity_metadata", inplace=True)  # graph.meta["sparsity"] and summary() see the zeros
        self._targets, self._groups, self.reweights = {}, {}, {}  # frees the copy of the weights r is

    @torch.no_grad()
    def _install_masks(self, values: list[torch.Tensor], share: float) -> None:
        flat = torch.cat([v.abs().flatten() for v in values])
        count = round(share * flat.numel())
        drop = torch.zeros_like(flat, dtype=torch.bool)
        drop[torch.argsort(flat, stable=True)[:count]] = True  # exactly `count`; ties (the zeros) by position
        start = 0
        for (module, weight), value in zip(self._targets.values(), values):
            old = mask_of(module)
            if old is not None:  # stale values under an old mask must not come back if it is lifted
                weight.masked_fill_(~old.mask, 0.0)
            set_mask(module, ~drop[start : start + value.numel()].view_as(value))
            start += value.numel()
