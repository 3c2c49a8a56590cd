"""Methods are immutable values that round-trip through config data; presets are package data."""

import dataclasses
import pickle
from pathlib import Path

import pytest

import v2drop
from v2drop import Method, Schedule, list_presets, list_scorers
from v2drop.method import resolve_method
from v2drop.scorers import SCORERS, Scorer

PRESET_FILES = sorted(p.stem for p in (Path(v2drop.__file__).parent / "presets").glob("*.yaml"))


def test_presets_are_the_package_data_files():
    assert PRESET_FILES and list_presets() == PRESET_FILES


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_round_trips(name):
    method = Method.from_preset(name)
    again = Method.from_dict(method.to_dict())
    assert again == method and hash(again) == hash(method)
    assert again.to_dict() == method.to_dict()
    assert pickle.loads(pickle.dumps(method)) == method


@pytest.mark.parametrize("name", list_scorers())
def test_method_from_a_scorer_instance_round_trips(name):
    """The registered name is recorded, not the class name, so ``from_dict`` finds the scorer again."""
    scorer = SCORERS.get(name)()
    method = Method(scorer, schedule=Schedule.progressive([2, 4], [0.5, 0.25]), reference_depth=6)
    data = method.to_dict()
    assert data["scorer"]["name"] == name
    assert Method.from_dict(data) == method
    assert Method.from_dict(data) == Method(name, schedule=Schedule.progressive([2, 4], [0.5, 0.25]), reference_depth=6)


def test_equality_compares_every_part():
    base = Method("v2drop", schedule=Schedule.one_shot(2, 0.5))
    assert base == Method("v2drop", schedule={"stages": [[2, 0.5]]})
    assert base != Method("v2drop", schedule=Schedule.one_shot(2, 0.5), metric="l1")
    assert base != Method("random", schedule=Schedule.one_shot(2, 0.5))
    assert base != Method("v2drop", schedule=Schedule.one_shot(3, 0.5))
    assert base != Method("v2drop", schedule=Schedule.one_shot(2, 0.5), position_policy="renumber")
    assert base != Method("v2drop", schedule=Schedule.one_shot(2, 0.5), reference_depth=32)
    assert Method.none() == Method.from_dict({"scorer": "none"}) != base


def test_unregistered_scorer_class_is_a_clear_error():
    @dataclasses.dataclass
    class Mine(Scorer):
        def score(self, state):  # pragma: no cover - never run
            raise NotImplementedError

    with pytest.raises(ValueError, match=r"Scorer class .*Mine is not registered.*register_scorer"):
        Method(Mine(), schedule=Schedule.one_shot(2, 0.5))


def test_method_is_immutable_and_rescaled_returns_a_new_one():
    method = Method.from_preset("v2drop-llava15-128")
    with pytest.raises(AttributeError, match="immutable"):
        method.schedule = Schedule.none()
    small = method.rescaled(16)
    assert small is not method and small.reference_depth == 16 and small.schedule.layers == (2, 8, 11)
    assert method.schedule.layers == (3, 17, 22) and method.reference_depth == 32
    assert method.rescaled(32) is method


def test_preset_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("scorer: {name: random, seed: 3}\nschedule: {stages: [[1, 0.5]]}\n")
    assert Method.from_preset(str(path)) == Method("random", schedule=Schedule.one_shot(1, 0.5), seed=3)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        Method.from_preset(str(tmp_path / "missing.yaml"))


def test_resolve_method_combines_scorer_schedule_and_arguments():
    method = resolve_method("random", "v2drop-llava15-128", {"seed": 4})
    preset = Method.from_preset("v2drop-llava15-128")
    assert method.scorer_name == "random" and method.scorer.seed == 4 and method.schedule == preset.schedule
    assert resolve_method("v2drop-llava15-128", scorer_args={"metric": "l1"}).scorer.metric == "l1"
    assert resolve_method("none") == Method.none()
    with pytest.raises(ValueError, match="needs --schedule"):
        resolve_method("v2drop")
    with pytest.raises(ValueError, match="Unknown scorer 'nope'"):
        resolve_method("nope")


def test_importing_the_library_loads_no_heavy_framework():
    """``import v2drop`` (and its evaluation and search packages) leaves Lightning, Optuna, wandb, matplotlib and pandas
    unloaded.
    """
    import subprocess
    import sys

    code = (
        "import sys, v2drop, v2drop.evaluation, v2drop.search, v2drop.method; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'optuna', 'wandb', 'matplotlib', 'pandas'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(v2drop.__file__).parent.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
