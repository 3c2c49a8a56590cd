"""Methods are immutable values that round-trip through config data; presets are package data."""

import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

import v2drop
from v2drop import Method, Schedule, list_presets, list_scorers
from v2drop.budgets import PAPER_BUDGETS, PAPER_VISION_TOKENS
from v2drop.method import resolve_method
from v2drop.presets import IDENTITY_KEYS, find_presets, get_preset, parse_preset, preset_name, preset_text
from v2drop.schedule import PRE_LLM
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


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_carries_its_identity_as_data_that_agrees_with_its_name(name):
    """The file's label, model and budget (or reduction) make its name; its scorer is the method's."""
    raw = yaml.safe_load(preset_text(name))
    preset = get_preset(name)  # raises on a file whose data contradicts its name
    assert {"description", "label", "model"} <= set(raw) and set(raw) & set(IDENTITY_KEYS) == {
        k for k in IDENTITY_KEYS if raw.get(k) is not None
    }
    assert preset_name(preset.label, preset.model, preset.budget, preset.reduction, preset.retention) == name
    assert preset.scorer == Method.from_preset(name).scorer_name and preset.method() == Method.from_preset(name)
    # one measure of how much is kept, at most
    assert sum(x is not None for x in (preset.budget, preset.reduction, preset.retention)) <= 1
    if preset.model == "llava15":
        assert preset.reference_vision_tokens == PAPER_VISION_TOKENS


def test_a_preset_whose_data_contradicts_its_name_is_an_error():
    data = yaml.safe_load(preset_text("v2drop-llava15-128"))
    assert parse_preset("v2drop-llava15-128", data).budget == 128
    with pytest.raises(
        ValueError, match=r"'v2drop-llava15-64' .*contradicts its data.*make the name 'v2drop-llava15-128'"
    ):
        parse_preset("v2drop-llava15-64", data)
    with pytest.raises(ValueError, match=r"make the name 'fastv-llava15-128'"):
        parse_preset("v2drop-llava15-128", {**data, "label": "fastv"})
    with pytest.raises(ValueError, match=r"make the name 'v2drop-qwen2vl-128'"):
        parse_preset("v2drop-llava15-128", {**data, "model": "qwen2vl"})
    with pytest.raises(ValueError, match=r"has no label, model; every preset sets description, label, model"):
        parse_preset("v2drop-llava15-128", {k: v for k, v in data.items() if k not in ("label", "model")})
    with pytest.raises(ValueError, match=r"budget must be a positive whole number or absent, got '128'"):
        parse_preset("v2drop-llava15-128", {**data, "budget": "128"})
    with pytest.raises(ValueError, match=r"reduction must be a share between 0 and 1 or absent, got 77.8"):
        parse_preset("v2drop-qwen2vl-77800", {**data, "model": "qwen2vl", "budget": None, "reduction": 77.8})
    video = yaml.safe_load(preset_text("vidcom2-onevision-25"))
    assert parse_preset("vidcom2-onevision-25", video).retention == 0.25
    with pytest.raises(ValueError, match=r"make the name 'vidcom2-onevision-15'"):
        parse_preset("vidcom2-onevision-25", {**video, "retention": 0.15})
    with pytest.raises(ValueError, match=r"retention must be a share between 0 and 1 or absent, got 25"):
        parse_preset("vidcom2-onevision-2500", {**video, "retention": 25})
    with pytest.raises(ValueError, match=r"set at most one of budget, reduction and retention"):
        parse_preset("vidcom2-onevision-25", {**video, "budget": 128, "reference_vision_tokens": 576})
    fastv = yaml.safe_load(preset_text("fastv-llava15-128"))
    with pytest.raises(ValueError, match=r"counts vision tokens .* but sets no reference_vision_tokens"):
        parse_preset("fastv-llava15-128", {**fastv, "reference_vision_tokens": None})


def test_find_presets_selects_by_fields():
    fastv = find_presets(scorer="fastv", model="llava15")
    assert [p.budget for p in fastv] == sorted(PAPER_BUDGETS, key=str) and {p.label for p in fastv} == {"fastv"}
    assert all(p.name in list_presets() for p in fastv)
    assert {p.name for p in find_presets(model="qwen2vl")} == {n for n in list_presets() if "-qwen2vl-" in n}
    assert {p.scorer for p in find_presets(model="qwen2vl")} == {"v2drop", "dart"}
    composites = find_presets(scorer="composite")
    assert {p.label for p in composites} == {"composite-v2drop-dart", "composite-v2drop-fastv"}
    assert find_presets(label="composite-v2drop-dart", budget=128) == [composites[0]]
    assert find_presets(scorer="v2drop", budget=64) == [get_preset("v2drop-llava15-64")]
    assert find_presets(scorer="no-such-scorer") == []
    every = find_presets()
    assert [p.name for p in every] == list_presets() and len({p.name for p in every}) == len(every)


@pytest.mark.parametrize("name", list_scorers())
def test_method_from_a_scorer_instance_round_trips(name):
    """The registered name is recorded, not the class name, so ``from_dict`` finds the scorer again."""
    scorer = SCORERS.get(name)()
    if scorer.encoder_request() is not None:  # encoder-only scorers
        schedule = Schedule.progressive(["vision:1", "vision:2"], [0.5, 0.25])
    else:
        schedule = Schedule.progressive([2, 4], [0.5, 0.25])
        try:
            scorer.check_layer(2)
        except ValueError:  # a scorer of the pre-LLM stage only (downsample)
            schedule = Schedule.one_shot(PRE_LLM, 0.5)
    method = Method(scorer, schedule=schedule, reference_depth=6)
    data = method.to_dict()
    assert data["scorer"]["name"] == name
    assert Method.from_dict(data) == method
    assert Method.from_dict(data) == Method(name, schedule=schedule, reference_depth=6)


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
    copy = tmp_path / "copy.yaml"  # a shipped preset's file, identity keys and all, read as a method file
    copy.write_text(preset_text("fastv-llava15-128"))
    assert Method.from_preset(str(copy)) == Method.from_preset("fastv-llava15-128")
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
    unloaded, but for what transformers' own generation module loads (transformers 5.19, vLLM's, imports
    scikit-learn there, which imports pandas).
    """
    import subprocess
    import sys

    heavy = "{'lightning', 'optuna', 'wandb', 'matplotlib', 'pandas'}"

    def loaded(imports: str) -> str:
        code = f"import sys, {imports}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(v2drop.__file__).parent.parent
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert loaded("transformers.generation.utils") in ("[]", "['pandas']")
    assert loaded("v2drop, v2drop.evaluation, v2drop.search, v2drop.method") == loaded("transformers.generation.utils")
