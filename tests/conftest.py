"""Shared fixtures."""

import pytest

import graphprune

from .models import make_model, trace_once


@pytest.fixture(scope="session")
def tiny_graph():
    """A traced tiny BertForSequenceClassification with common metadata (do not mutate)."""
    model = make_model()
    graph = trace_once(model)
    graph, _ = graphprune.run_pass(graph, "add_common_metadata", {"seq_len": 16})
    return graph
