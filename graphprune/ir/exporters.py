"""The registry of export formats behind ``Graph.export``.

The formats themselves (ONNX, AOTInductor, HF folders) live in the application layer
(``graphprune.app.export``), which registers them here when the package is imported;
the graph IR only dispatches, so it never imports upward. A user's own format is
registered the same way::

    @graphprune.register_exporter("tflite")
    def export_tflite(graph, path, **options): ...
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ExportError


_EXPORTERS: dict[str, Callable] = {}


def register_exporter(name: str, fn: Callable | None = None):
    """Register ``fn(graph, path, **options) -> dict`` as format ``name`` (usable as a decorator)."""

    def add(fn: Callable) -> Callable:
        if name in _EXPORTERS and _EXPORTERS[name] is not fn:
            raise ValueError(f"an export format named {name!r} is already registered")
        _EXPORTERS[name] = fn
        return fn

    return add if fn is None else add(fn)


def export_formats() -> list[str]:
    return sorted(_EXPORTERS)


def export_graph(graph, path, format: str, **options) -> dict:
    """Write ``graph`` to the artefact folder ``path`` in ``format``; returns the artefact's manifest."""
    if format not in _EXPORTERS:
        known = ", ".join(export_formats()) or "none registered (import graphprune to register the built-in ones)"
        raise ExportError(f"export: format {format!r} is not one of: {known}")
    gates = graph.meta.get("gates")
    if gates:  # gates are a training device: what ships is the committed graph
        raise ExportError(f"export {format}: the graph still carries {gates['method']!r} gates; run the 'commit_gates' pass first")
    return _EXPORTERS[format](graph, path, **options)
