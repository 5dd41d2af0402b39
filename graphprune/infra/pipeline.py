"""Running passes: one at a time (``run_pass``) or as a pipeline (``run_pipeline``).

Both are functional: they return a new graph and never change the caller's graph,
also when a pass fails halfway through a rewrite.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..ir.graph import Graph
from ..ir.summary import set_common_metadata_provider
from .config import build_config, config_to_dict
from .errors import PassError, PipelineError
from .registry import PassInfo, get_pass


def run_pass(
    graph: Graph, name: str, config: Mapping[str, Any] | Any | None = None, *, inplace: bool = False, data=None
) -> tuple[Graph, dict]:
    """Run the registered pass ``name`` on a copy of ``graph``; return ``(new_graph, info)``.

    Raises ``ValueError`` for an unknown pass or a bad config (naming the pass, the
    field, the value and what is allowed) and ``PassError`` when the pass itself
    fails. ``graph`` is unchanged in every case, unless ``inplace=True``: then the
    pass works on ``graph`` itself (for callbacks during training, where an
    optimizer holds the graph's parameters) and a failure may leave it half-done.
    ``data`` is calibration data for passes that take it (Wanda, SparseGPT, ...):
    a TextDataset, tokenised examples or ready batches.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "add_common_metadata", {"seq_len": 128})
    """
    _check_graph(graph)
    info = get_pass(name)
    cfg = build_config(name, info.config_cls, config)
    if data is not None and not info.takes_data:
        raise ValueError(f"pass {name!r} takes no calibration data; call it without data=")
    work = graph if inplace else graph.copy(share_tensors=info.kind == "analysis")
    return _apply(work, info, cfg, data)


def run_pipeline(graph: Graph, steps: Sequence | str | os.PathLike, *, data=None) -> tuple[Graph, list[dict]]:
    """Run passes in order; ``steps`` is a list of ``(name, config)`` or a TOML file path.

    Every step's pass and config are checked before anything runs. A step that fails
    raises ``PipelineError`` naming it and the steps before it; ``graph`` is unchanged.
    ``data`` reaches every step whose pass takes calibration data.

    TOML form: an array of ``[[passes]]`` tables, each with ``name`` and its config fields::

        [[passes]]
        name = "init_metadata"

        [[passes]]
        name = "add_common_metadata"
        seq_len = 128
    """
    _check_graph(graph)
    resolved = resolve_steps(load_steps(steps) if isinstance(steps, (str, os.PathLike)) else normalise_steps(steps))
    work = graph.copy(share_tensors=all(info.kind == "analysis" for info, _ in resolved))
    infos: list[dict] = []
    for index, (info, cfg) in enumerate(resolved):
        try:
            work, step_info = _apply(work, info, cfg, data)
        except Exception as error:
            previous = [i.name for i, _ in resolved[:index]]
            raise PipelineError(
                f"pipeline step {index + 1} ({info.name!r}) failed after {previous or 'no steps'}: {error}",
                step=index + 1,
                name=info.name,
                previous=previous,
            ) from error
        infos.append(step_info)
    return work, infos


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file as a dict; a missing or malformed file is a ValueError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"pipeline file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"pipeline file {str(path)!r} is not valid TOML: {error}") from None


def load_steps(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """Read ``[[passes]]`` steps from a TOML file."""
    data = read_toml(path)
    passes = data.get("passes")
    if not isinstance(passes, list) or not all(isinstance(p, dict) for p in passes):
        raise ValueError(f"pipeline file {str(path)!r} needs an array of [[passes]] tables, each with a name")
    return normalise_steps(passes)


def normalise_steps(steps) -> list[tuple[str, dict]]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise ValueError(f"pipeline steps must be a list of (name, config) or a TOML path, got {type(steps).__name__}")
    out = []
    for index, step in enumerate(steps, start=1):
        if isinstance(step, Mapping):
            step = dict(step)
            name = step.pop("name", None)
            config = step
        elif isinstance(step, (tuple, list)) and len(step) == 2:
            name, config = step
        elif isinstance(step, str):
            name, config = step, None
        else:
            raise ValueError(f"pipeline step {index}: expected (name, config), got {step!r}")
        if not isinstance(name, str):
            raise ValueError(f"pipeline step {index}: pass name must be a string, got {name!r}")
        out.append((name, config))
    return out


def resolve_steps(steps: list[tuple[str, Any]]) -> list[tuple[PassInfo, Any]]:
    resolved = []
    for index, (name, config) in enumerate(steps, start=1):
        try:
            info = get_pass(name)
            resolved.append((info, build_config(name, info.config_cls, config)))
        except ValueError as error:
            raise ValueError(f"pipeline step {index}: {error}") from None
    return resolved


def _apply(work: Graph, info: PassInfo, cfg, data=None) -> tuple[Graph, dict]:
    try:
        result = info.fn(work, cfg, data=data) if info.takes_data else info.fn(work, cfg)
    except (ValueError, PassError):
        raise
    except Exception as error:
        raise PassError(f"pass {info.name!r} failed: {type(error).__name__}: {error}") from error
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Graph) and isinstance(result[1], dict)):
        raise PassError(f"pass {info.name!r} must return (graph, info_dict), returned {type(result).__name__}")
    new_graph, step_info = result
    record = {"pass": info.name, "config": config_to_dict(cfg)}
    if info.takes_data and data is not None:
        record["data"] = _data_name(data)
    new_graph.history.append(record)
    return new_graph, step_info


def _data_name(data) -> str:
    inner = getattr(data, "data", data)  # CalibrationData wraps the examples
    name = getattr(inner, "name", "") or type(inner).__name__
    return f"{name} ({len(inner)} examples)" if hasattr(inner, "__len__") and not hasattr(inner, "batch_size") else name


def _check_graph(graph) -> None:
    if not isinstance(graph, Graph):
        raise TypeError(f"expected a graphprune.Graph (from graphprune.trace or graphprune.load), got {type(graph).__name__}")


# graph.summary() computes missing metadata with the analysis pass; the IR cannot
# import this module, so the dependency is handed down to it here.
set_common_metadata_provider(lambda graph: run_pass(graph, "add_common_metadata")[0])
