"""Structured pruning: remove attention heads, FFN neurons and whole layers from the graph."""

from . import analyze_heads, commit_gates, factorize, l0_structured, remove_ffn_neurons, remove_heads, remove_hidden, remove_layers, structured_search  # noqa: F401  (registration)
