"""Sweeping across methods: ``scorers: all``, per-scorer kinds and parameters, presets first, the wandb dashboard read
back offline.
"""

import csv
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from v2drop import Method, Schedule, list_scorers, register_scorer
from v2drop.presets import find_presets, get_preset
from v2drop.scorers import Scorer
from v2drop.scorers.base import scorer_params
from v2drop.search import (
    SweepConfig,
    conditional,
    expand_presets,
    fits,
    make_storage,
    method_params,
    resolve_scorers,
    run_sweep,
    suggest_method,
    validate,
)
from v2drop.search.space import preset_method
from v2drop.testing import EchoBench

ROOT = Path(__file__).resolve().parent.parent


# Every method but the oracle: pre-LLM scorers with their own kinds, a weighted composite, a staged scorer.
SPACE = {
    "scorers": {
        "*": {},
        "composite": {"parts": [["v2drop", "dart"], ["v2drop", "fastv"]], "combine": ["rank", "zscore"]},
        "staged": {"pre_llm": ["visionzip", "divprune"], "llm": ["v2drop", "fastv"]},
        "dart": {"pivot_order": ["position", "official"]},
        "visionzip": {"merge_space": ["projected", "tower"], "order": ["kept_first", "official"]},
    },
    "exclude": ["given"],
    "weights": {"composite": [0.0, 1.0]},
    "kinds": ["one-shot", "progressive"],
    "scorer_kinds": {
        "fastv": ["one-shot"],
        "dart": ["one-shot"],
        "visionzip": ["pre-llm"],
        "divprune": ["pre-llm"],
        "vispruner": ["pre-llm"],
        "hiprune": ["pre-llm"],
        "cdpruner": ["pre-llm"],
        "downsample": ["pre-llm"],
        "pool": ["pre-llm"],
        "holov": ["pre-llm"],
        "vidcom2": ["pre-llm"],
        "frames": ["pre-llm"],
        "frame_pool": ["pre-llm"],
        "holitom": ["pre-llm"],
        "fastvid": ["pre-llm"],
        "staged": ["pre-llm+progressive"],
        "flowcut": ["vision"],
        "vscan": ["vision+one-shot"],
    },
    "position_policy": {
        name: "renumber"
        for name in (
            "pdrop",
            "sparsevlm",
            "visionzip",
            "divprune",
            "vispruner",
            "hiprune",
            "cdpruner",
            "downsample",
            "pool",
            "holov",
            "flowcut",
            "vidcom2",
            "frames",
            "frame_pool",
            "vscan",
            "holitom",
        )
    },
    "stages": [2, 4],
    "vision_layers": [1, 23],
    "tower_reference": 23,
}


def config(tmp_path, search=None, **kw):
    data = {
        "study": "methods",
        "model": "tiny",
        "benchmark": "echo",
        "trials": 10,
        "total_trials": None,
        "run_dir": str(tmp_path / "run"),
        "objectives": ["accuracy", "flops"],
        "enqueue_presets": ["*-llava15-128"],
        "eval": {"limit": 2, "batch_size": 2, "max_new_tokens": 1, "warmup": 0},
        "confirm": {"limit": 2},
        "search": search or SPACE,
        "wandb": {"mode": "disabled"},
    }
    data.update(kw)
    return SweepConfig.from_dict(data)


def test_all_means_every_registered_scorer_but_the_excluded():
    @register_scorer("test-newcomer")
    @dataclass
    class Newcomer(Scorer):
        def score(self, state):
            return state.vision_idx.float()

    cfg = config(Path("."))
    names = resolve_scorers(cfg.search)
    assert list(names) == [n for n in list_scorers() if n != "given"] and "test-newcomer" in names and "dart" in names
    searched = ("composite", "staged", "dart", "visionzip")  # SPACE searches these scorers' parameters
    assert all(params == {} for name, params in names.items() if name not in searched)
    star = config(
        Path("."), search={"scorers": {"*": {}, "v2drop": {"metric": ["l1"]}}, "exclude": ["given", "test-*"]}
    )
    names = resolve_scorers(star.search)
    assert names["v2drop"] == {"metric": ["l1"]} and "test-newcomer" not in names and "given" not in names
    assert resolve_scorers(config(Path("."), search={"scorers": {"dart": None}}).search) == {"dart": {}}


@pytest.mark.parametrize(
    "search, message",
    [
        ({"scorers": "most"}, "search.scorers 'most': give 'all'"),
        (
            {"scorers": {"dart": {"pivots": [4]}}},
            "scorer 'dart' has no parameter 'pivots'; valid parameters: pivot_image, pivot_order, pivot_text",
        ),
        ({"scorers": {"dart": {"pivot_image": [4, -1]}}}, r"search.scorers.dart.pivot_image: the choice -1 is invalid"),
        ({"scorers": {"dart": {}}, "scorer_kinds": {"fastv": ["one-shot"]}}, r"search.scorer_kinds names \['fastv'\]"),
        ({"scorers": {"dart": {}}, "scorer_kinds": {"dart": ["once"]}}, "search.scorer_kinds.dart must list"),
        (
            {"scorers": {"pdrop": {}}, "position_policy": {"pdrop": "shift"}},
            "search.position_policy.pdrop must be one of",
        ),
        (
            {"scorers": {"v2drop": {}}, "layers": [0, None]},
            "search.layers starts at 0, but V2DropScorer needs the layer before",
        ),
        ({"scorers": {"*": {"metric": ["l1"]}}}, "takes no parameters"),
        ({"scorers": "all", "exclude": ["*"]}, "search.scorers is empty"),
        (
            {"scorers": {"visionzip": {}}, "kinds": ["pre_llm"]},
            r"search.kinds must list kinds from \['one-shot', 'progressive', 'pre-llm'",
        ),
        (
            {"scorers": {"v2drop": {}}, "kinds": ["pre-llm+progressive"]},
            "search.kinds: kind 'pre-llm\\+progressive' starts with a stage before the LLM, but V2DropScorer needs the "
            "layer before",
        ),
        (
            {"scorers": {"staged": {"llm": ["v2drop"]}}, "scorer_kinds": {"staged": ["pre-llm+one-shot"]}},
            r"search.scorer_kinds.staged: .* has no pre_llm part.* \(staged, staged.llm=v2drop\)",
        ),
        (
            {"scorers": {"staged": {"pre_llm": ["divprune", "fastv"]}}, "scorer_kinds": {"staged": ["pre-llm"]}},
            r"FastVScorer .* \(staged, staged.pre_llm=fastv\)",
        ),
        (
            {"scorers": {"v2drop": {}}, "weights": {"v2drop": [0, 1]}},
            "search.weights.v2drop: scorer 'v2drop' has no 'parts' to weigh",
        ),
        (
            {"scorers": {"v2drop": {}}, "weights": {"composite": [0, 1]}},
            r"search.weights names \['composite'\], which are not among",
        ),
        (
            {"scorers": {"composite": {}}, "weights": {"composite": [0.5, 0.2]}},
            r"search.weights.composite must be a \[low, high\] range",
        ),
        (
            {
                "scorers": {"composite": {"parts": [["v2drop", {"name": "v2drop", "metric": "l1"}]]}},
                "weights": {"composite": [0, 1]},
            },
            r"the parts \['v2drop', 'v2drop'\] repeat a scorer",
        ),
        ({"scorers": {"composite": {"parts": [["v2drop", "fastv"], [{"name": "v2drop"}, "fastv"]]}}}, "share a label"),
        (
            {"scorers": {"composite": {"parts": [["fastv", "pdrop"]]}}},
            "search.scorers.composite.parts: the choice .* is invalid: .*different layers",
        ),
    ],
)
def test_bad_cross_method_spaces_stop_before_the_model_loads(tmp_path, search, message):
    with pytest.raises(ValueError, match=message):
        validate(config(tmp_path, search=search))


def test_preset_patterns_expand_and_a_pattern_matching_nothing_is_an_error(tmp_path):
    assert expand_presets(["dart-llava15-*"]) == ["dart-llava15-128", "dart-llava15-192", "dart-llava15-64"]
    with pytest.raises(ValueError, match="'dartt-\\*' matches no preset"):
        validate(config(tmp_path, enqueue_presets=["dartt-*"]))


def test_a_scorer_with_its_own_kinds_gets_its_own_kind_parameter():
    cfg = config(Path("."))
    trial = optuna.trial.FixedTrial(
        {"scorer": "dart", "dart.pivot_order": "position", "dart.kind": "one-shot", "layer_0": 2, "keep_0": 0.25}
    )
    method = suggest_method(trial, cfg.search, depth=6)
    assert method.scorer_name == "dart" and method.schedule.layers == (2,) and method.schedule.stages[0].keep == 0.25
    trial = optuna.trial.FixedTrial(
        {
            "scorer": "pdrop",
            "kind": "progressive",
            "stages": 2,
            "layer_0": 1,
            "keep_0": 0.5,
            "layer_1": 3,
            "keep_1": 0.5,
        }
    )
    method = suggest_method(trial, cfg.search, depth=6)
    assert method.position_policy == "renumber" and method.schedule.layers == (1, 3)
    assert conditional(cfg) and not conditional(config(Path("."), search={"scorers": {"v2drop": {}}}))


def test_pre_llm_composite_and_staged_trials_map_onto_methods():
    """A pre-LLM kind suggests keep_pre_llm; composite weights are normalised; a staged trial picks both of its
    scorers."""
    search = SweepConfig.from_dict({"search": SPACE}).search
    method = suggest_method(
        optuna.trial.FixedTrial({"scorer": "divprune", "divprune.kind": "pre-llm", "keep_pre_llm": 0.25}),
        search,
        depth=6,
    )
    assert (
        method.schedule.layers == (-1,)
        and method.schedule.stages[0].keep == 0.25
        and method.position_policy == "renumber"
    )
    trial = optuna.trial.FixedTrial(
        {
            "scorer": "composite",
            "composite.parts": "v2drop+dart",
            "composite.combine": "zscore",
            "composite.weights.v2drop": 0.3,
            "composite.weights.dart": 0.1,
            "kind": "one-shot",
            "layer_0": 2,
            "keep_0": 0.5,
        }
    )
    method = suggest_method(trial, search, depth=6)
    assert method.scorer.combine == "zscore" and [p["name"] for p in method.scorer.parts] == ["v2drop", "dart"]
    assert [p["weight"] for p in method.scorer.parts] == pytest.approx([0.75, 0.25])
    zero = dict(trial.params, **{"composite.weights.v2drop": 0.0, "composite.weights.dart": 0.0})
    assert [p["weight"] for p in suggest_method(optuna.trial.FixedTrial(zero), search, depth=6).scorer.parts] == [
        0.5,
        0.5,
    ]
    trial = optuna.trial.FixedTrial(
        {
            "scorer": "staged",
            "staged.pre_llm": "divprune",
            "staged.llm": "fastv",
            "staged.kind": "pre-llm+progressive",
            "keep_pre_llm": 0.5,
            "stages": 2,
            "layer_0": 1,
            "keep_0": 0.5,
            "layer_1": 4,
            "keep_1": 0.25,
        }
    )
    method = suggest_method(trial, search, depth=6)
    assert method.schedule.layers == (-1, 1, 4) and method.scorer.pre_llm == {"name": "divprune"}
    assert method.scorer.llm["name"] == "fastv" and method_params(method, search) == trial.params


def test_a_vision_trial_is_one_encoder_stage_written_for_the_reference_tower():
    search = config(Path(".")).search
    params = {"scorer": "flowcut", "flowcut.kind": "vision", "vision_layer": 5, "keep_vision": 0.25}
    method = suggest_method(optuna.trial.FixedTrial(params), search, depth=6)
    assert method.schedule.to_dict() == {
        "stages": [["vision:5", 0.25]],
        "keep_mode": "relative",
        "min_keep": 1,
        "tower_reference": 23,
    }
    assert method.position_policy == "renumber" and method_params(method, search) == params
    assert fits(method, search, 6) and not fits(
        Method("flowcut", schedule=Schedule.one_shot("vision:5", 0.25)), search, 6
    )
    with pytest.raises(ValueError, match="search.vision_layers"):
        validate(config(Path("."), search={**SPACE, "vision_layers": [3, 1]}))


@pytest.mark.parametrize("preset", [p.name for p in find_presets(model="llava15") if p.budget is not None])
def test_every_paper_preset_is_reproduced_by_its_enqueued_parameters(preset):
    """What the sweep enqueues for a preset suggests back the preset itself (as relative fractions of 576 tokens).

    Composites come back with their parts and normalised weights, staged scorers with both parts,
    pre-LLM presets with their stage before the LLM.
    """
    dart = {"pivot_image": [2, 4], "pivot_order": ["position", "official"]}
    cfg = config(Path("."), search={**SPACE, "scorers": {**SPACE["scorers"], "dart": dart}})
    method = preset_method(preset, 12)
    assert fits(method, cfg.search, 12)
    again = suggest_method(optuna.trial.FixedTrial(method_params(method, cfg.search)), cfg.search, depth=12)
    assert again.scorer_name == method.scorer_name and again.position_policy == method.position_policy
    assert again.schedule.layers == method.schedule.layers
    assert [s.keep for s in again.schedule.stages] == pytest.approx([min(s.keep, 0.9) for s in method.schedule.stages])
    expected, got = scorer_params(method.scorer), scorer_params(again.scorer)
    if "parts" in expected:  # weights are searched, then normalised: compare them as numbers
        total = sum(p["weight"] for p in expected["parts"])
        assert [p.pop("weight") for p in got["parts"]] == pytest.approx(
            [p.pop("weight") / total for p in expected["parts"]]
        )
    assert got == expected


def test_a_preset_outside_the_parameter_choices_does_not_fit():
    cfg = config(Path("."), search={"scorers": {"dart": {"pivot_image": [2, 8]}}, "kinds": ["one-shot"]})
    assert not fits(Method.from_preset("dart-llava15-64", depth=12), cfg.search, 12)
    # a setting the space does not search is its default in every trial: the official variants do not fit
    defaults = config(Path("."), search={**SPACE, "scorers": {"*": {}}}).search
    assert fits(Method.from_preset("visionzip-llava15-64", depth=12), defaults, 12)
    assert not fits(Method.from_preset("visionzip-official-llava15-64", depth=12), defaults, 12)
    assert not fits(Method.from_preset("dart-official-llava15-64", depth=12), defaults, 12)
    only_fastv = config(Path("."), search={**SPACE, "scorers": {"composite": {"parts": [["v2drop", "fastv"]]}}})
    assert fits(Method.from_preset("composite-v2drop-fastv-llava15-128", depth=12), only_fastv.search, 12)
    assert not fits(Method.from_preset("composite-v2drop-dart-llava15-128", depth=12), only_fastv.search, 12)
    decoder_only = config(
        Path("."),
        search={
            "scorers": {"divprune": {}},
            "kinds": ["one-shot", "progressive"],
            "position_policy": {"divprune": "renumber"},
        },
    )
    assert not fits(preset_method("divprune-llava15-64", 12), decoder_only.search, 12)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cross_method_sweep_puts_every_method_on_one_front(tiny, tmp_path):
    presets = expand_presets(["*-llava15-128"])
    cfg = config(tmp_path, trials=len(presets) + 3)
    result = run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(2), progress=False)
    trials = read_csv(tmp_path / "run" / "trials.csv")
    assert set(presets) | {"none"} <= {t["label"] for t in trials}
    assert {t["scorer"] for t in trials} >= {n for n in list_scorers() if n != "given"} | {"none"}
    for t in trials:
        if t["scorer"] in ("dart", "fastv"):
            assert t["kind"] == "one-shot" and t[f"{t['scorer']}.kind"] == "one-shot"
        if t["scorer"] in ("visionzip", "divprune"):
            assert t["kind"] == "pre-llm" and t["schedule"] == f"pre_llm:{float(t['keep_pre_llm']):.3f}"
            if t["label"]:  # the 128-token preset: 128 of 576 as a relative fraction
                assert float(t["keep_pre_llm"]) == pytest.approx(128 / 576)
    for column in (
        "scorer",
        "kind",
        "layer_0",
        "keep_0",
        "stages",
        "dart.kind",
        "fastv.kind",
        "keep_pre_llm",
        "composite.parts",
        "composite.weights.v2drop",
        "composite.weights.dart",
        "composite.weights.fastv",
        "staged.pre_llm",
        "staged.llm",
    ):
        assert column in trials[0]
    rows = {r["label"]: r for r in result["rows"]}
    assert (
        rows["pdrop-llava15-128"]["kind"] == "progressive" and len(rows["pdrop-llava15-128"]["schedule"].split()) == 4
    )
    staged = rows["visionzip-v2drop-llava15-128"]
    assert (
        staged["kind"] == "pre-llm+progressive"
        and staged["staged.pre_llm"] == "visionzip"
        and staged["keep_pre_llm"] == 0.5
    )
    composite = rows["composite-v2drop-dart-llava15-128"]
    assert composite["composite.parts"] == "v2drop+dart" and composite["composite.weights.v2drop"] == pytest.approx(0.6)
    study = optuna.load_study(study_name="methods", storage=make_storage(cfg))
    method = next(
        t for t in study.trials if t.user_attrs.get("label") == "composite-v2drop-dart-llava15-128"
    ).user_attrs["method"]
    assert [(p["name"], p["weight"]) for p in method["scorer"]["parts"]] == [
        ("v2drop", pytest.approx(0.6)),
        ("dart", pytest.approx(0.4)),
    ]
    assert {c["scorer"] for c in result["confirmed"]} == {r["scorer"] for r in result["front"]}


# -- the wandb dashboard, read back from the offline run -------------------------------------------


def offline_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file.

    wandb 0.31 ships no reader in Python, so this reads the format directly: a 7-byte header
    (``:W&B``, magic, version), then LevelDB-log records in 32 KiB blocks, each with a 7-byte
    header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, records, parts = 7, 32768, [], []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        parts.append(raw[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def logged(run_dir: Path, timeout: float = 60.0) -> tuple[dict, dict]:
    """(config items, final summary) of an offline run: ``{key: value}`` with nested keys joined by '/'.

    ``run.finish()`` can return before wandb's service has written the last records, so this
    waits for the run's ``exit`` record.
    """
    deadline = time.time() + timeout
    while True:
        records = offline_records(next(run_dir.glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.2)
    config, summary = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else record.summary.update if kind == "summary" else []
        target = config if kind == "config" else summary
        for item in items:
            target[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config, summary


def test_wandb_dashboard_is_in_the_offline_run(tiny, tmp_path):
    trials = len(expand_presets(["*-llava15-128"])) + 2  # none, every preset, one searched trial
    cfg = config(tmp_path, trials=trials, wandb={"mode": "offline"})
    result = run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(2), progress=False)
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    config_items, summary = logged(run)
    charts = {
        k.removeprefix("_wandb/visualize/"): v["panel_config"]
        for k, v in config_items.items()
        if k.startswith("_wandb/visualize/")
    }
    assert charts["front_validation"]["panelDefId"] == "wandb/scatter/v0"
    assert charts["front_validation"]["fieldSettings"] == {"x": "flops_ratio", "y": "accuracy_metric"}
    assert charts["front_confirmed"]["fieldSettings"] == {"x": "test_flops_ratio", "y": "test_accuracy"}
    assert charts["all_trials"]["panelDefId"] == "wandb/scatter/v0"
    assert charts["method_fronts"]["panelDefId"] == "wandb/lineseries/v0"
    assert charts["fronts_validation_vs_confirmed"]["panelDefId"] == "wandb/lineseries/v0"

    def table(key):
        return json.loads((run / "files" / summary[f"{key}/path"]).read_text())

    trials = table("trials")
    assert len(trials["data"]) == len(result["rows"]) == cfg.trials
    columns = trials["columns"]
    searched = {k for t in optuna.load_study(study_name="methods", storage=make_storage(cfg)).trials for k in t.params}
    assert searched - {"scorer", "kind"} <= set(columns) and {
        "scorer",
        "kind",
        "is_pareto",
        "label",
        "flops",
        "accuracy",
    } <= set(columns)
    assert {
        "composite.weights.v2drop",
        "keep_pre_llm",
        "staged.pre_llm",
    } <= searched  # one column each, for parallel coordinates
    # hover: each point's row carries its method and schedule in one label (the built-in scatter's tooltip shows the
    # row)
    hover, label = columns.index("hover"), columns.index("label")
    rows = {row[label]: row for row in trials["data"]}
    assert rows["visionzip-v2drop-llava15-128"][hover].startswith(
        "staged(pre_llm=visionzip, llm=v2drop) · pre-llm+progressive pre_llm:0.500 "
    )
    assert rows["composite-v2drop-dart-llava15-128"][hover].startswith(
        "composite(parts=v2drop+dart, combine=zscore, weights.v2drop=0.60, weights.dart=0.40) · progressive "
    )
    assert rows["none"][hover].startswith("none · none")
    for key, (table_key, x) in {
        "front_validation": ("front_validation_table", "flops_ratio"),
        "front_confirmed": ("front_confirmed_table", "test_flops_ratio"),
        "all_trials": ("all_trials_table", "flops_ratio"),
    }.items():
        shown = table(table_key)
        assert {"hover", "scorer", "schedule", x} <= set(shown["columns"]), key
        assert all(row[shown["columns"].index("hover")] for row in shown["data"])
    by_scorer = {row[columns.index("scorer")] for row in trials["data"]}
    assert len(by_scorer) > 3
    front = table("front_validation_table")
    assert len(front["data"]) == len(result["front"])
    confirmed = table("confirmed_front")
    assert len(confirmed["data"]) == len(result["confirmed"]) and "test_accuracy" in confirmed["columns"]
    methods = table("method_fronts_table")
    assert {row[methods["columns"].index("lineKey")] for row in methods["data"]} <= by_scorer - {"none"}
    both = table("fronts_validation_vs_confirmed_table")
    assert {row[both["columns"].index("lineKey")] for row in both["data"]} == {"validation", "confirmed"}
    assert (
        summary["front_size"] == len(result["front"])
        and summary["trial_count"] == cfg.trials
        and "dart" in summary["method_names"]
    )


def test_shipped_methods_config_validates_and_enqueues_every_method_at_every_budget():
    cfg = SweepConfig.load(ROOT / "configs" / "sweep" / "methods.yaml")
    validate(cfg, depth=12)  # the proxy's depth
    presets = expand_presets(cfg.enqueue_presets)
    fitting = [p for p in presets if fits(preset_method(p, 12), cfg.search, 12)]
    assert fitting == presets
    methods = {Method.from_preset(p).scorer_name for p in presets}
    assert methods == set(resolve_scorers(cfg.search)) == {n for n in list_scorers() if n != "given"}
    enqueued = [get_preset(p) for p in presets]
    single = {p.label for p in enqueued if p.scorer not in ("composite", "staged")}
    # every single method at every budget
    assert {(p.label, p.budget) for p in enqueued} >= {(m, b) for m in single for b in (192, 128, 64)}
    assert {
        "composite-v2drop-dart-llava15-128",
        "composite-v2drop-fastv-llava15-128",
        "visionzip-v2drop-llava15-128",
    } <= set(presets)
    assert cfg.search.weights == {"composite": [0.0, 1.0]} and cfg.search.scorers["staged"]["pre_llm"] == [
        "visionzip",
        "divprune",
    ]
    assert cfg.trials >= len(presets) + 1 + 20  # room to search after the presets


def test_shipped_video_config_enqueues_every_video_preset_at_every_retention():
    """configs/sweep/video.yaml: every LLaVA-OneVision video preset (25/15/10%) is enqueued and fits the space."""
    cfg = SweepConfig.load(ROOT / "configs" / "sweep" / "video.yaml")
    assert cfg.benchmark == "digits-video"
    validate(cfg, depth=12)  # the proxy's depth
    presets = expand_presets(cfg.enqueue_presets)
    assert set(presets) == {p.name for p in find_presets(model="onevision")}
    assert [p for p in presets if fits(preset_method(p, 12), cfg.search, 12)] == presets
    assert {get_preset(p).retention for p in presets} == {0.25, 0.15, 0.10}
    assert cfg.trials >= len(presets) + 1 + 10  # room to search after the presets


def test_every_trial_the_shipped_space_draws_is_a_valid_method():
    """Random trials over methods.yaml's space (no evaluation) build Methods of every scorer and kind, at the proxy's
    depth.
    """
    cfg = SweepConfig.load(ROOT / "configs" / "sweep" / "methods.yaml")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(300):
        trial = study.ask()
        method = suggest_method(trial, cfg.search, depth=12)
        method.schedule.check_depth(12)
        params = method_params(method, cfg.search)  # the trial's own parameters, its weights normalised
        assert fits(method, cfg.search, 12) and params.keys() == trial.params.keys()
        assert {k: v for k, v in params.items() if ".weights." not in k} == {
            k: v for k, v in trial.params.items() if ".weights." not in k
        }
        if method.scorer_name == "composite":
            weights = [trial.params[f"composite.weights.{p['name']}"] for p in method.scorer.parts]
            assert [p["weight"] for p in method.scorer.parts] == pytest.approx([w / sum(weights) for w in weights])
        seen.add((method.scorer_name, trial.params.get(f"{method.scorer_name}.kind", trial.params.get("kind"))))
        study.tell(trial, [0.0, 0.0])
    assert {name for name, _ in seen} == set(resolve_scorers(cfg.search))
    assert {
        ("visionzip", "pre-llm"),
        ("divprune", "pre-llm"),
        ("staged", "pre-llm+progressive"),
        ("composite", "one-shot"),
        ("composite", "progressive"),
        ("flowcut", "vision"),
        ("vscan", "vision+one-shot"),
    } <= seen


def test_cli_cross_method_error_exits_2_before_the_model_loads(capsys):
    from experiments.sweep import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--config",
                str(ROOT / "configs" / "sweep" / "methods.yaml"),
                "--set",
                "search.scorers.dart.pivot_image=[4, -1]",
            ]
        )
    assert exit_.value.code == 2
    assert "search.scorers.dart.pivot_image: the choice -1 is invalid" in capsys.readouterr().err
