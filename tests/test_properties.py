"""Property: any config dict either runs or raises ValueError, and never changes the graph."""

import dataclasses
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphprune
from graphprune.ir.metadata import common

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def config_dicts(info):
    fields = [f.name for f in dataclasses.fields(info.config_cls)] if info.config_cls else []
    names = st.sampled_from(fields + ["bogus", "", "seq len"]) if fields else st.sampled_from(["bogus", "x"])
    return st.one_of(st.none(), st.dictionaries(names, values, max_size=4))


def _snapshot(graph):
    return (
        {k: v.clone() for k, v in graph.module.state_dict().items()},
        {n.name: repr(dict(common(n))) for n in graph.nodes},
        repr(graph.meta),
        repr(graph.history),
        graph.module.code,
    )


@pytest.mark.parametrize("name", sorted(graphprune.list_passes()))
def test_random_configs_run_or_raise_value_error(name, tiny_graph):
    info = graphprune.get_pass(name)
    before = _snapshot(tiny_graph)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(config_dicts(info))
    def check(config):
        try:
            graphprune.run_pass(tiny_graph, name, config)
        except ValueError:
            pass
        after = _snapshot(tiny_graph)
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
        assert before[1:] == after[1:]

    check()
