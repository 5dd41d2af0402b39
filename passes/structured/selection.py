"""Which units to remove: explicit lists checked against the graph, or the lowest scores.

Shared by ``remove_heads`` and ``remove_ffn_neurons`` (units are heads or neurons).
"""

from __future__ import annotations

import torch

from graphprune.infra.config import ConfigError, check_choice, check_range

SCOPES = ("global", "local")


def explicit_removals(field: str, requested: dict, sizes: list[int], min_keep: int, unit: str) -> list[list[int]]:
    """``{layer: [indices]}`` (keys may be strings, as in TOML) -> per-layer sorted removals, checked."""
    removed: list[list[int]] = [[] for _ in sizes]
    for key, indices in requested.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{field}.{key}", indices, f"layer indices 0..{len(sizes) - 1} as keys") from None
        if not 0 <= layer < len(sizes):
            raise ConfigError(f"{field}.{key}", indices, f"a layer index in 0..{len(sizes) - 1}")
        chosen = sorted(set(int(i) for i in indices))
        if any(not 0 <= i < sizes[layer] for i in chosen):
            raise ConfigError(f"{field}.{key}", indices, f"{unit} indices in 0..{sizes[layer] - 1} (layer {layer} has {sizes[layer]})")
        if sizes[layer] - len(chosen) < min_keep:
            raise ConfigError(
                f"{field}.{key}", indices,
                f"at most {sizes[layer] - min_keep} {unit}s removed from layer {layer} (min_{unit}s = {min_keep}; "
                f"set min_{unit}s = 0 to empty a layer)",
            )
        removed[layer] = chosen
    return removed


def lowest_scores(scores: list[torch.Tensor], fraction: float, scope: str, min_keep: int) -> list[list[int]]:
    """Remove ``round(fraction * units)`` units with the lowest scores, per layer (``local``) or over all (``global``).

    Global ranking normalises each layer's scores by their L2 norm (Michel et al.
    2019), so layers with larger gradients do not keep everything; no layer keeps
    fewer than ``min_keep`` units.
    """
    if scope == "local":
        out = []
        for s in scores:
            count = min(round(fraction * len(s)), max(0, len(s) - min_keep))
            out.append(sorted(torch.argsort(s, stable=True)[:count].tolist()))
        return out
    total = sum(len(s) for s in scores)
    budget = round(fraction * total)
    flat = [(float(v / (s.norm() + 1e-12)), layer, i) for layer, s in enumerate(scores) for i, v in enumerate(s)]
    flat.sort()
    removed: list[list[int]] = [[] for _ in scores]
    for _, layer, index in flat:
        if budget == 0:
            break
        if len(scores[layer]) - len(removed[layer]) > min_keep:
            removed[layer].append(index)
            budget -= 1
    return [sorted(r) for r in removed]


def check_unit_config(config, explicit_field: str, min_field: str, criteria: tuple) -> None:
    """The checks ``remove_heads`` and ``remove_ffn_neurons`` share (their configs have the same shape)."""
    check_choice("method", config.method, criteria)
    check_choice("scope", config.scope, SCOPES)
    check_range("fraction", config.fraction, 0.0, 1.0, high_open=True)
    check_range(min_field, getattr(config, min_field), 0)
    check_range("num_samples", config.num_samples, 1)
    explicit = getattr(config, explicit_field)
    if explicit is not None and not isinstance(explicit, dict):
        raise ConfigError(explicit_field, explicit, f"a table {{layer: [{explicit_field[:-1]} indices]}}")


def choose_removals(pass_name: str, explicit: dict | None, field: str, sizes: list[int], min_keep: int, unit: str, score) -> list[list[int]]:
    """Per layer, the sorted indices to remove: the explicit table, or the lowest of ``score()``'s per-layer scores."""
    try:
        if explicit is not None:
            return explicit_removals(field, explicit, sizes, min_keep, unit)
        return score()
    except ConfigError as error:
        raise ValueError(f"pass '{pass_name}': {error}") from None
