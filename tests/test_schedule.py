"""Schedules: the spec's keep counts and averages, conversions, rescaling, solving, presets and errors."""

import pytest

from v2drop import Method, Schedule, solve_keep
from v2drop.presets import list_presets


@pytest.mark.parametrize(
    "preset, average", [("v2drop-llava15-192", 193.75), ("v2drop-llava15-128", 131.0), ("v2drop-llava15-64", 66.71875)]
)
def test_paper_presets_average(preset, average):
    method = Method.from_preset(preset)
    assert method.scorer_name == "v2drop" and method.scorer.metric == "l2"
    assert method.schedule.layers == (3, 17, 22)
    assert method.schedule.average_tokens(32, 576) == average


def test_spec_example_tokens_per_layer():
    counts = Method.from_preset("v2drop-llava15-192").schedule.tokens_per_layer(32, 576)
    assert counts == [576] * 3 + [288] * 14 + [86] * 5 + [1] * 10


def test_qwen2vl_preset_reduction():
    schedule = Method.from_preset("v2drop-qwen2vl-778").schedule
    assert schedule.layers == (3, 16, 22)
    assert 0.22 < schedule.average_tokens(28, 1024) / 1024 < 0.235


def test_keep_count_rule():
    s = Schedule.progressive([1, 2], [0.3, 0.0])
    assert s.kept_count(0, 10, 10) == 3  # floor(10 * 0.3)
    assert s.kept_count(1, 3, 10) == 1  # min_keep survives keep 0
    assert s.kept_count(1, 0, 10) == 0  # never more than present
    assert Schedule.progressive([1], [0.0], min_keep=0).kept_count(0, 5, 5) == 0


def test_conversions_round_trip():
    s = Method.from_preset("v2drop-llava15-128").schedule
    absolute = s.to_absolute(576)
    assert [st.keep for st in absolute.stages] == [161, 40, 1]
    assert absolute.tokens_per_layer(32, 576) == s.tokens_per_layer(32, 576)
    cumulative = s.to_cumulative(576)
    assert cumulative.tokens_per_layer(32, 576) == s.tokens_per_layer(32, 576)
    assert s.to_absolute(576).to_relative(576).tokens_per_layer(32, 576) == s.tokens_per_layer(32, 576)


def test_rescale_to_another_depth():
    s = Method.from_preset("v2drop-llava15-192").schedule
    assert s.rescaled(32, 16).layers == (2, 8, 11)
    assert s.rescaled(32, 64).layers == (6, 34, 44)
    assert Method.from_preset("v2drop-llava15-192", depth=12).schedule.layers == (1, 6, 8)
    with pytest.raises(ValueError, match="do not fit"):
        s.rescaled(32, 3)


def test_solve_keep_fastv_budget():
    s = solve_keep([2], 128, 32, 576)
    avg = s.average_tokens(32, 576)
    assert avg <= 128 and Schedule.one_shot(2, 1.0, "absolute").average_tokens(32, 576) < 128
    # kept = (32*128 - 2*576) / 30 = 98.13 -> 98 tokens is the largest count under budget
    assert s.counts(576) == [98]
    s3 = solve_keep([3, 17, 22], 128, 32, 576, fixed={22: 0.0})
    assert s3.stages[2].keep == 0.0 and 127 < s3.average_tokens(32, 576) <= 128
    with pytest.raises(ValueError, match="unreachable"):
        solve_keep([1], 10, 32, 576)


def test_config_round_trip():
    m = Method.from_preset("v2drop-llava15-64")
    again = Method.from_dict(m.to_dict())
    assert again.schedule == m.schedule and again.scorer == m.scorer and again == m


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Schedule.progressive([3, 3], [0.5, 0.5]), r"strictly increase, got \[3, 3\]"),
        (lambda: Schedule.progressive([5, 2], [0.5, 0.5]), "strictly increase"),
        (lambda: Schedule.progressive([2], [1.5]), r"keep fraction must be in \[0, 1\], got 1.5"),
        (lambda: Schedule.progressive([2], [-0.1]), r"in \[0, 1\]"),
        (lambda: Schedule.progressive([2], [0.5], keep_mode="nope"), "keep_mode must be one of"),
        (lambda: Schedule.progressive([2, 3], [0.5]), "2 layers but 1 keep"),
        (lambda: Schedule.from_dict({"stages": [[1, 0.5]], "ratio": 2}), r"Unknown schedule keys \['ratio'\]"),
        (
            lambda: Method.from_preset("v2drop-llava15-100"),
            r"Unknown preset 'v2drop-llava15-100'. Available presets: .*v2drop-llava15-128",
        ),
        (lambda: Method.from_dict({"scorer": "v2drop", "shedule": {}}), r"Unknown method keys \['shedule'\]"),
        (lambda: Method("v2drop", position_policy="shift"), "position_policy must be one of"),
    ],
)
def test_bad_schedules_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_stage_beyond_depth_is_an_error(tiny):
    lvlm = tiny("llava")
    from v2drop.testing import image, prompt_for

    method = Method("v2drop", schedule=Schedule.one_shot(6, 0.5))
    with pytest.raises(ValueError, match=r"Stage layer 6 does not exist: the model has 6 decoder layers \(0..5\)"):
        lvlm.generate([prompt_for(lvlm, "how many ?")], [image(0)], method=method)


def test_presets_listed():
    assert {"v2drop-llava15-192", "v2drop-llava15-128", "v2drop-llava15-64", "v2drop-qwen2vl-778"} <= set(
        list_presets()
    )


def test_scale_to_average_keeps_layers_and_ratios():
    from v2drop.schedule import scale_to_average

    s = Schedule.progressive([1, 6, 8], [0.5, 0.3, 0.0])
    fitted = scale_to_average(s, 12, 256, 256 * 128 / 576)
    assert fitted.layers == (1, 6, 8) and fitted.stages[2].keep == 0.0
    assert fitted.stages[0].keep / fitted.stages[1].keep == pytest.approx(0.5 / 0.3)
    avg = fitted.average_tokens(12, 256)
    assert 256 * 128 / 576 - 3 < avg <= 256 * 128 / 576
    sparse = Schedule.progressive([3, 7, 16], [300, 200, 110], keep_mode="absolute")
    assert scale_to_average(sparse, 32, 576, 150).keep_mode == "cumulative"
