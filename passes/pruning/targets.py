"""Which Linear layers a pruning pass touches, and with which rule: MASE-style entries.

A pruning config has a ``default`` entry and entries keyed by node role (``by =
"role"``: ``query``, ``ffn_up``, ``pooler``...), module type (``by = "type"``:
``linear``) or a regular expression on the module path (``by = "name"``). The
default entry applies to the encoder's Linear layers (q, k, v, attention output,
FFN up and down); the pooler, classifier and ELECTRA's embedding projection are
pruned only when an entry selects them. An entry that is None (Python) skips what
it selects; an entry's fields override the default's.

Shared by ``prune_weight`` and ``prune_activation``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import fx, nn

from graphprune.infra.config import ConfigError, build_table, check_choice
from graphprune.ir.metadata import ENCODER_ROLES, common

from ..analysis.init_metadata import init_node_metadata

SELECTABLE_ROLES = ENCODER_ROLES + ("pooler", "classifier", "embedding_projection")
BY = ("role", "type", "name")
SHORTHAND = ("sparsity", "method", "scope", "granularity")


def resolve_entries(config, entry_cls: type) -> tuple:
    """Validate a config's default and keyed entries; returns ``(default, entries)``.

    Top-level shorthand fields (``sparsity``, ``method``...) are the default entry's;
    each keyed entry inherits the default's fields it does not set.
    """
    default = config.default or entry_cls()
    shorthand = {k: getattr(config, k) for k in SHORTHAND if getattr(config, k, None) is not None}
    default = _checked(default, shorthand, "")
    check_choice("by", config.by, BY)
    entries = {}
    for key, raw in config.entries.items():
        _check_key(config.by, key, raw, type(config))
        if raw is None:
            entries[key] = None
            continue
        if not isinstance(raw, Mapping):
            raise ConfigError(str(key), raw, f"a table of {', '.join(f.name for f in dataclasses.fields(entry_cls))}, or none to skip")
        built = build_table(entry_cls, raw, f"{key}.")
        entries[key] = _checked(default, {k: getattr(built, k) for k in raw}, str(key))
    return default, entries


def _checked(base, overrides: dict, where: str):
    if re.fullmatch(r"\d+:\d+", str(overrides.get("granularity", ""))) and "sparsity" not in overrides:
        overrides = {**overrides, "sparsity": None}  # N:M sets its own sparsity, N/M
    try:
        return dataclasses.replace(base, **overrides)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error.field}" if where else error.field, error.value, error.allowed) from None


def _check_key(by: str, key, value, config_cls: type) -> None:
    fields = ", ".join(sorted(f.name for f in dataclasses.fields(config_cls) if f.name != "entries"))
    if by == "role" and key not in SELECTABLE_ROLES:
        raise ConfigError(str(key), value, f"the key to be a config field ({fields}) or, with by = 'role', a role: {', '.join(SELECTABLE_ROLES)}")
    if by == "type" and key != "linear":
        raise ConfigError(str(key), value, f"the key to be a config field ({fields}) or, with by = 'type', 'linear'")
    if by == "name":
        try:
            re.compile(str(key))
        except re.error as error:
            raise ConfigError(str(key), value, f"the key to be a regular expression over module paths ({error})") from None


@dataclass(frozen=True)
class Target:
    """A Linear layer to prune: its node (the first that calls it), module path, module and rule."""

    node: fx.Node
    path: str
    module: nn.Linear
    entry: object


def select_targets(graph, by: str, default, entries: dict, *, every_call: bool = False) -> list[Target]:
    """The Linear layers the entries select, in graph order: each module once, or each call of it."""
    gm = graph.module
    if any("role" not in common(n) for n in gm.graph.nodes):
        init_node_metadata(graph)
    targets, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or module.weight.numel() == 0:
            continue  # (an output projection whose heads were all removed has no weights to select)
        role = common(node).get("role")
        found, entry = _lookup(by, entries, role, node.target)
        if not found:
            entry = default if role in ENCODER_ROLES else None
        if entry is not None:
            if not every_call:
                seen.add(node.target)  # a shared module (ALBERT) is pruned once
            targets.append(Target(node, node.target, module, entry))
    return targets


def _lookup(by: str, entries: dict, role: str | None, path: str):
    if by == "role" and role in entries:
        return True, entries[role]
    if by == "type" and "linear" in entries:
        return True, entries["linear"]
    if by == "name":
        for pattern, entry in entries.items():
            if re.fullmatch(pattern, path):
                return True, entry
    return False, None


def input_groups(targets: list[Target]) -> list[list[Target]]:
    """Consecutive targets that read the same input node (a layer's q, k and v), in order."""
    groups: list[list[Target]] = []
    for target in targets:
        source = target.node.args[0] if target.node.args else None
        if groups and groups[-1][0].node.args and groups[-1][0].node.args[0] is source:
            groups[-1].append(target)
        else:
            groups.append([target])
    return groups
