"""``prune``: MASE's pruning config, run as written: ``prune_weight`` then ``prune_activation``.

MASE's ``prune_transform_pass`` takes ``{"weight": {...}, "activation": {...}}`` with
``sparsity`` (a number, or a dict of per-module sparsities), ``method`` (``random``,
``l1-norm``), ``scope`` and ``granularity`` (``elementwise``). MASE's defaults apply to
keys left out (method random, sparsity 0, scope local, granularity elementwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import graphprune
from graphprune.infra.config import ConfigError, build_table

from .prune_activation import PruneActivationConfig, prune_activation
from .prune_weight import PruneWeightConfig, prune_weight

MASE_DEFAULTS = {"method": "random", "sparsity": 0.0, "scope": "local", "granularity": "elementwise"}


def from_mase(table) -> dict:
    """A MASE weight or activation table as a graphprune pruning config."""
    if not isinstance(table, dict):
        raise ConfigError("", table, "a table with sparsity, method, scope, granularity")
    config = {**MASE_DEFAULTS, **table}
    sparsity = config.get("sparsity")
    if isinstance(sparsity, dict):  # MASE's layer-wise budgets: module path -> sparsity
        per_layer = {re.escape(str(path)): {"sparsity": value} for path, value in sparsity.items()}
        config = {**{k: v for k, v in config.items() if k != "sparsity"}, "sparsity": 0.0, "by": "name", **per_layer}
    return config


@dataclass(frozen=True)
class PruneConfig:
    """Fields (MASE's ``prune_transform_pass`` arguments):
    weight: a table of sparsity, method, scope, granularity for the weights (or more
        ``prune_weight`` fields), or none.
    activation: the same for the inputs of the Linear layers (``prune_activation``), or none.
    """

    weight: dict | None = None
    activation: dict | None = None

    def __post_init__(self):
        for name, cls in (("weight", PruneWeightConfig), ("activation", PruneActivationConfig)):
            table = getattr(self, name)
            if table is not None:
                try:
                    build_table(cls, from_mase(table), f"{name}.")
                except ConfigError as error:
                    raise ConfigError(error.field if error.field.startswith(name) else f"{name}.{error.field}", error.value, error.allowed) from None


@graphprune.register_pass("prune", config=PruneConfig)
def prune(graph, config: PruneConfig, data=None):
    """MASE's prune pass: its weight and activation config, run as prune_weight and prune_activation.

    Example (MASE tutorial 4, as written):
        >>> graph, info = graphprune.run_pass(graph, "prune", {
        ...     "weight": {"sparsity": 0.5, "method": "l1-norm", "scope": "local"},
        ...     "activation": {"sparsity": 0.5, "method": "l1-norm", "scope": "local"}})
    """
    info = {}
    if config.weight is not None:
        graph, info["weight"] = prune_weight(graph, build_table(PruneWeightConfig, from_mase(config.weight)), data=data)
    if config.activation is not None:
        graph, info["activation"] = prune_activation(graph, build_table(PruneActivationConfig, from_mase(config.activation)))
    return graph, info
