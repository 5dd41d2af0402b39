"""Structured pruning: remove attention heads, FFN neurons and whole layers from the graph."""

from . import analyze_heads, factorize, remove_ffn_neurons, remove_heads, remove_layers, structured_search  # noqa: F401  (registration)
