"""Shared fixtures, and the order the suite runs in."""

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


# The suite runs on two pytest-xdist workers, each taking tests in the order given: a minute-long test left near the
# end keeps one worker busy while the other idles. These files hold the longest tests (tens of seconds each: budgeted
# compress runs, real-model tutorials, the demo, exports checked in fresh processes), so they go first.
LONGEST_FIRST = (
    "tests/app/test_compress.py",
    "tests/test_tutorials.py",
    "tests/app/test_demo.py",
    "tests/app/test_predict.py",
    "tests/app/test_search_storage.py",
    "tests/app/test_export.py",
    "tests/test_docs.py",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: 0 if item.nodeid.startswith(LONGEST_FIRST) else 1)  # stable: the rest keep their order
