"""The pass registry: built-in and user passes are registered the same way.

Built-in passes live in the ``graphprune.passes`` package (source folder
``passes/``), which the core never imports by name: it is found through the
``graphprune.passes`` entry point group, as any third-party pass package would be.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Literal

PassKind = Literal["analysis", "transform"]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable
    config_cls: type | None
    kind: PassKind
    description: str
    takes_data: bool = False  # the function has a ``data`` parameter: run_pass(..., data=...) reaches it


_REGISTRY: dict[str, PassInfo] = {}
_plugins_loaded = False


def register_pass(name: str, *, config: type | None = None, kind: PassKind = "transform"):
    """Register ``fn(graph, config) -> (graph, info)`` as the pass ``name``.

    A pass that needs calibration data declares a ``data`` parameter,
    ``fn(graph, config, data=None)``; ``run_pass(..., data=...)`` passes it on.

    Args:
        name: unique pass name, used in ``run_pass`` and TOML pipelines.
        config: a frozen dataclass of the pass's fields, or None for no config.
        kind: ``"analysis"`` passes only write metadata (they run on a copy that
            shares tensors); ``"transform"`` passes may rewrite anything (they run
            on a full copy, so the caller's graph is never changed).

    Example:
        >>> @dataclass(frozen=True)
        ... class DropConfig:
        ...     keep_classifier: bool = True
        >>> @graphprune.register_pass("remove_dropout", config=DropConfig)
        ... def remove_dropout(graph, config):
        ...     ...
        ...     return graph, {"removed": n}
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_pass: name {name!r} must be an identifier-like string")
    if kind not in ("analysis", "transform"):
        raise ValueError(f"register_pass({name!r}): kind {kind!r} must be 'analysis' or 'transform'")
    if config is not None and not (dataclasses.is_dataclass(config) and isinstance(config, type)):
        raise ValueError(f"register_pass({name!r}): config must be a dataclass class, got {config!r}")
    if config is not None and not config.__dataclass_params__.frozen:
        raise ValueError(f"register_pass({name!r}): config class {config.__name__} must be frozen (@dataclass(frozen=True))")

    def decorator(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered ({_REGISTRY[name].fn.__module__})")
        doc = inspect.getdoc(fn) or ""
        takes_data = "data" in inspect.signature(fn).parameters
        _REGISTRY[name] = PassInfo(name, fn, config, kind, doc.splitlines()[0] if doc else "", takes_data)
        return fn

    return decorator


def unregister_pass(name: str) -> None:
    """Remove a pass (for tests and interactive sessions)."""
    _REGISTRY.pop(name, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group="graphprune.passes"):
        entry.load()


def get_pass(name: str) -> PassInfo:
    _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown pass {name!r}; registered passes: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_passes() -> dict[str, str]:
    """Registered pass names with their one-line descriptions, sorted by name."""
    _load_plugins()
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
