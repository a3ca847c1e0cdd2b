"""common.typed_section: a dataclass is a config section's keys, types, defaults and constraints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mmctr import common
from mmctr.common import ConfigError, typed_section


@dataclass
class Inner:
    k: int = 1
    mode: Literal["a", "b", "c"] = "a"


@dataclass
class Section:
    name: str                                                    # required: no default
    size: int = field(default=8, metadata={"min": 1})
    rate: float = field(default=0.5, metadata={"range": (0, 1)})
    scale: float = field(default=1.0, metadata={"positive": True})
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    widths: list[int] = field(default_factory=lambda: [4, 2], metadata={"min": 1})
    tags: list[str] = field(default_factory=list, metadata={"nonempty": True})
    shape: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (0, "x")
    limit: Optional[int] = None
    budget: float | None = None
    inner: Inner = field(default_factory=Inner)


def load(**raw):
    return typed_section(Section, {"name": "n", **raw}, "sec")


def error(**raw) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(**raw)
    assert isinstance(caught.value, common.UserError) and "\n" not in str(caught.value)
    return caught.value


def test_missing_keys_take_the_defaults():
    assert load() == Section(name="n")
    assert load().widths is not Section(name="n").widths  # default_factory: a fresh list each time


def test_a_missing_required_key_is_an_error():
    with pytest.raises(ConfigError) as caught:
        typed_section(Section, {}, "sec")
    assert str(caught.value) == "config: missing key sec.name (a string, no default)"
    assert caught.value.key == "sec.name"


def test_an_unknown_key_is_an_error_naming_the_known_ones():
    exc = error(sise=3)
    assert str(exc).startswith("config: unknown key sec.sise (known: name, size, rate, scale, flag, mode,")
    assert exc.key == "sec.sise" and exc.detail.startswith("unknown key (known: name, size,")


def test_the_section_must_be_a_mapping():
    for raw in (None, [1], "x"):
        with pytest.raises(ConfigError, match=r"^config: sec must be a mapping of keys, got "):
            typed_section(Section, raw, "sec")


def test_bool_is_only_true_or_false():
    assert load(flag=True).flag is True
    for value in (1, 0, "yes", None):
        assert str(error(flag=value)) == f"config: sec.flag must be true or false, got {value!r}"


def test_int_takes_whole_floats_but_not_bools():
    loaded = load(size=8192.0)
    assert loaded.size == 8192 and type(loaded.size) is int
    assert str(error(size=True)) == "config: sec.size must be an integer, got True"
    assert str(error(size=2.5)) == "config: sec.size must be an integer, got 2.5"
    assert str(error(size="big")) == "config: sec.size must be an integer, got 'big'"
    assert str(error(size=[1, 2])) == "config: sec.size must be an integer, got [1, 2]"


def test_float_takes_ints_but_not_bools_or_text():
    loaded = load(scale=3)
    assert loaded.scale == 3.0 and type(loaded.scale) is float
    assert str(error(scale=False)) == "config: sec.scale must be a number, got False"
    assert str(error(scale="1e-3")) == "config: sec.scale must be a number, got '1e-3'"
    # .inf passes every bound (NaN fails them all: test_metadata_constraints)
    assert str(error(budget=float("inf"))) == "config: sec.budget must be a finite number, got inf"
    assert str(error(scale=float("-inf"))) == "config: sec.scale must be a finite number, got -inf"


def test_str():
    assert load(name="x").name == "x"
    assert str(error(name=3)) == ("config: sec.name must be a string, got 3 (YAML read a number, true/false or a "
                                  "date: quote the text, name: '2025' in a file, \"sec.name='2025'\" after --set)")
    assert "quote the text" in str(error(name=common.parse_yaml("2025-01-01")))
    assert str(error(name=["x"])) == "config: sec.name must be a string, got ['x']"


def test_literal_is_a_choice_of_the_same_type():
    assert load(mode="slow").mode == "slow"
    assert str(error(mode="medium")) == "config: sec.mode must be fast or slow, got 'medium'"
    assert str(error(inner={"mode": "d"})) == "config: sec.inner.mode must be one of a, b, c, got 'd'"


def test_literal_does_not_confuse_true_and_1():
    @dataclass
    class Numbers:
        n: Literal[1, 2] = 1

    assert typed_section(Numbers, {"n": 2}, "s").n == 2
    with pytest.raises(ConfigError, match=r"^config: s.n must be 1 or 2, got True$"):
        typed_section(Numbers, {"n": True}, "s")


def test_lists_and_tuples_check_every_item():
    loaded = load(widths=[8, 4.0], shape=[3], pair=[1, "y"])
    assert loaded.widths == [8, 4] and loaded.shape == (3,) and loaded.pair == (1, "y")
    assert str(error(widths=[8, "x"])) == "config: sec.widths must be a list of integers, got [8, 'x'] (item 1: 'x')"
    assert str(error(widths=8)) == "config: sec.widths must be a list of integers, got 8"
    assert str(error(tags=["a", 1])) == "config: sec.tags must be a list of strings, got ['a', 1] (item 1: 1)"
    assert str(error(pair=[1])).startswith("config: sec.pair must be a list of 2 values (an integer; a string)")
    assert load(shape=[]).shape == ()


def test_optional_takes_null_or_the_type():
    assert load(limit=None).limit is None and load(limit=3.0).limit == 3
    assert load(budget=None).budget is None and load(budget=2).budget == 2.0
    assert str(error(limit="x")) == "config: sec.limit must be an integer, got 'x'"
    assert str(error(budget="x")) == "config: sec.budget must be a number, got 'x'"
    assert str(error(size=None)) == "config: sec.size must be an integer, got None"  # not Optional


def test_nested_sections_are_typed_recursively():
    assert load(inner={"k": 5.0}).inner == Inner(k=5, mode="a")
    assert load(inner={}).inner == Inner()
    exc = error(inner={"q": 1})
    assert str(exc) == "config: unknown key sec.inner.q (known: k, mode)" and exc.key == "sec.inner.q"
    assert str(error(inner={"k": "s"})) == "config: sec.inner.k must be an integer, got 's'"
    assert str(error(inner=3)) == "config: sec.inner must be a mapping of keys, got 3"


@pytest.mark.parametrize("raw, message", [
    ({"size": 0}, "sec.size must be at least 1, got 0"),
    ({"rate": 1.5}, "sec.rate must be in [0, 1], got 1.5"),
    ({"rate": -1}, "sec.rate must be in [0, 1], got -1"),
    ({"scale": 0}, "sec.scale must be positive, got 0"),
    ({"scale": float("nan")}, "sec.scale must be positive, got nan"),  # NaN fails every comparison
    ({"widths": [4, 0]}, "sec.widths items must each be at least 1, got [4, 0]"),
    ({"tags": []}, "sec.tags must not be empty, got []"),
])
def test_metadata_constraints(raw, message):
    exc = error(**raw)
    assert str(exc) == f"config: {message}"
    assert f"{exc.key} {exc.detail}" == message


def test_constraints_on_max():
    @dataclass
    class Capped:
        n: int = field(default=1, metadata={"max": 3})

    assert typed_section(Capped, {"n": 3}, "s").n == 3
    with pytest.raises(ConfigError, match=r"^config: s.n must be at most 3, got 4$"):
        typed_section(Capped, {"n": 4}, "s")


def test_an_unsupported_annotation_is_a_programming_error():
    @dataclass
    class Odd:
        d: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="unsupported annotation"):
        typed_section(Odd, {"d": {}}, "s")


@pytest.mark.parametrize("value", ["1e3", "1e-3", ".inf", "2025", "null", "yes", "abc", 1e-3, 1000.0, 7, True, None,
                                   [64, 32], {"column": "item_emb_d128_v3"}])
def test_a_written_config_reads_back_as_written(value, tmp_path):
    """A run's config.yaml trains the run again: a text such as '1e3', which YAML 1.1 (PyYAML's
    writer) leaves unquoted and the config reader (YAML 1.2) takes for a number, is quoted."""
    common.write_yaml(tmp_path / "config.yaml", {"run": {"name": value}})
    assert common.parse_yaml((tmp_path / "config.yaml").read_text()) == {"run": {"name": value}}
