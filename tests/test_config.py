"""The shared config layer: defaults <- YAML <- key=value, typed, unknown keys listed."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from v2drop.config import config_from_dict, config_to_dict, load_config, parse_overrides


@dataclass
class Section:
    """A nested section."""

    steps: int = 3  # steps
    layers: list = field(default_factory=lambda: [1, None])  # a plain list


@dataclass
class Example:
    """A config with a section, a plain dict and a union."""

    name: str = "x"  # a name
    limit: int | None = None  # optional count
    devices: int | str = 1  # a count or "auto"
    scorers: dict = field(default_factory=lambda: {"v2drop": {}})  # plain dict
    section: Section = field(default_factory=Section)
    other: Section = field(default_factory=lambda: Section(steps=9))


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: y\nsection: {steps: 5}\nscorers: {fastv: {}}\n")
    cfg = load_config(Example, path, overrides=["section.steps=7", "limit=20", "devices=auto", "section.layers=[2, 3]"])
    assert cfg == Example(
        name="y", limit=20, devices="auto", scorers={"fastv": {}}, section=Section(7, [2, 3]), other=Section(steps=9)
    )
    assert isinstance(cfg.section, Section)


def test_section_default_is_the_fields_own_default():
    cfg = config_from_dict(Example, {"other": {"layers": [4]}})
    assert cfg.other == Section(steps=9, layers=[4])


def test_round_trip():
    cfg = load_config(Example, overrides=["scorers={a: {p: [1, 2]}}"])
    assert config_from_dict(Example, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, words",
    [
        ({"nmae": "y"}, ["'nmae'", "valid keys", "name", "section"]),
        ({"section": {"stpes": 1}}, ["'section.stpes'", "steps", "layers"]),
        ({"section": 3}, ["section", "steps"]),
        ({"limit": "many"}, ["limit", "many"]),
    ],
)
def test_bad_data_is_a_one_line_error_naming_the_key(data, words):
    with pytest.raises(ValueError) as err:
        config_from_dict(Example, data)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_overrides_parse_yaml_and_reject_malformed_items():
    assert parse_overrides(["a.b=1", "c=[x, y]", "d=null"]) == {"a": {"b": 1}, "c": ["x", "y"], "d": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["limit"])
    with pytest.raises(ValueError, match="YAML"):
        parse_overrides(["a=[1,"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(Example, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(Example, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Example, scalar)
