from dataclasses import dataclass
from typing import Literal

import pytest

import graphprune
from graphprune.infra.config import build_config


@dataclass(frozen=True)
class ToyConfig:
    ratio: float = 0.5
    steps: int = 3
    mode: Literal["l1", "random"] = "l1"
    layers: tuple[int, ...] = ()
    verbose: bool = False

    def __post_init__(self):
        graphprune.check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        graphprune.check_range("steps", self.steps, 1)


def test_every_registered_pass_resolves_and_is_described():
    passes = graphprune.list_passes()
    assert {"init_metadata", "add_common_metadata"} <= set(passes)
    for name, description in passes.items():
        info = graphprune.get_pass(name)
        assert info.name == name and callable(info.fn)
        assert description and description == info.description
        assert info.kind in ("analysis", "transform")


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        graphprune.register_pass("init_metadata")(lambda g, c: (g, {}))


def test_registration_checks_its_arguments():
    with pytest.raises(ValueError, match="identifier"):
        graphprune.register_pass("bad name")
    with pytest.raises(ValueError, match="dataclass"):
        graphprune.register_pass("x_pass", config=dict)

    @dataclass
    class Mutable:
        a: int = 1

    with pytest.raises(ValueError, match="frozen"):
        graphprune.register_pass("x_pass", config=Mutable)


def test_config_from_dict_with_defaults_and_coercion():
    raw = {"ratio": 0, "layers": [1, 2], "mode": "random"}
    cfg = build_config("toy", ToyConfig, raw)
    assert cfg == ToyConfig(ratio=0.0, layers=(1, 2), mode="random")
    assert raw == {"ratio": 0, "layers": [1, 2], "mode": "random"}  # caller's dict untouched
    assert build_config("toy", ToyConfig, None) == ToyConfig()
    assert build_config("toy", ToyConfig, cfg) is cfg


@pytest.mark.parametrize(
    "raw, field, allowed",
    [
        ({"ratio": 1.0}, "ratio", "ratio < 1.0"),
        ({"ratio": "half"}, "ratio", "a number"),
        ({"ratio": float("nan")}, "ratio", "0.0 <= ratio < 1.0"),
        ({"steps": 0}, "steps", "1 <= steps"),
        ({"steps": True}, "steps", "an integer"),
        ({"steps": 2.5}, "steps", "an integer"),
        ({"mode": "l2"}, "mode", "'l1', 'random'"),
        ({"layers": [1, "x"]}, "layers", "a list of an integer"),
        ({"verbose": 1}, "verbose", "true or false"),
        ({"ratoi": 0.1}, "ratoi", "allowed fields"),
    ],
)
def test_bad_config_values_name_pass_field_value_and_allowed(raw, field, allowed):
    with pytest.raises(ValueError) as error:
        build_config("toy", ToyConfig, raw)
    message = str(error.value)
    assert "'toy'" in message and repr(field) in message and allowed in message
    value = next(iter(raw.values()))
    assert repr(value) in message or field == "ratoi"


def test_config_must_be_a_table():
    with pytest.raises(ValueError, match="'toy'.*table"):
        build_config("toy", ToyConfig, [("ratio", 0.1)])
    with pytest.raises(ValueError, match="takes no config"):
        build_config("init_metadata", None, {"x": 1})


def test_unknown_pass_lists_the_registered_ones(tiny_graph):
    with pytest.raises(ValueError, match="unknown pass 'prune_everything'.*add_common_metadata"):
        graphprune.run_pass(tiny_graph, "prune_everything")
