"""Budgets in either convention (``v2drop.budgets``): ``average`` (vision tokens averaged over the decoder layers, as
in-LLM papers count) or ``entering`` (vision tokens entering the LLM, as pre-LLM papers count), resolved to schedules
on hand-worked examples."""

from __future__ import annotations

import pytest

from v2drop.budgets import Budget, budget_method, fit_budget
from v2drop.method import Method
from v2drop.presets import get_preset, parse_preset
from v2drop.schedule import Schedule


def test_a_plain_number_is_an_average_budget_and_a_mapping_states_its_count():
    assert Budget.parse(128) == Budget(128, "average") == Budget.parse({"tokens": 128, "count": "average"})
    assert Budget.parse({"tokens": 64, "count": "entering"}) == Budget(64, "entering")
    assert Budget.parse(None) is None
    assert Budget.parse(Budget(64, "entering")).to_dict() == {"tokens": 64, "count": "entering"}


@pytest.mark.parametrize(
    "value, message",
    [
        ({"tokens": 64, "count": "layers"}, r"budget: budget count must be one of average, entering, got 'layers'"),
        (-5, r"budget: budget tokens must be a positive number of vision tokens, got -5"),
        ({"tokens": 0, "count": "entering"}, r"positive number of vision tokens, got 0"),
        ({"tokens": 64}, r"exactly the keys tokens and count, got \['tokens'\]"),
        ({"tokens": 64, "count": "average", "extra": 1}, r"exactly the keys tokens and count"),
        ("128", r"expected a number of tokens or \{tokens: N, count: average \| entering\}, got '128'"),
        (True, r"expected a number of tokens"),
    ],
)
def test_bad_budgets_are_one_line_errors(value, message):
    with pytest.raises(ValueError, match=message) as err:
        Budget.parse(value)
    assert "\n" not in str(err.value)


def test_average_budget_on_a_hand_worked_one_shot_schedule():
    """One stage at layer 2 of 4, 100 tokens: layers hold [100, 100, k, k], so an average of 60 needs k = 20 exactly
    (keep 0.2); 61 is reached by no k (it would need k = 22): the largest average below it, 60.5 (k = 21)."""
    schedule = Schedule.one_shot(2, 0.5)
    fitted = fit_budget(schedule, 60, depth=4, n_vision=100)
    assert fitted.layers == (2,) and fitted.tokens_per_layer(4, 100) == [100, 100, 20, 20]
    assert fitted.average_tokens(4, 100) == 60 == Budget(60).of(fitted, 4, 100)
    between = fit_budget(schedule, 60.9, depth=4, n_vision=100)
    assert between.tokens_per_layer(4, 100) == [100, 100, 21, 21] and between.average_tokens(4, 100) == 60.5
    # an in-LLM method lets every token enter, whatever its average
    assert Budget(60, "entering").of(fitted, 4, 100) == 100


def test_entering_budget_on_a_hand_worked_pre_llm_schedule():
    """A pre-LLM stage then half of what is left at layer 4 of 8, 576 tokens: entering 64 keeps exactly 64 before the
    LLM and 32 from layer 4 on (average 48); the same budget counted as an average keeps more before the LLM."""
    schedule = Schedule.progressive(["pre_llm", 4], [0.5, 0.5])
    fitted = fit_budget(schedule, {"tokens": 64, "count": "entering"}, depth=8, n_vision=576)
    assert fitted.layers == (-1, 4)
    assert fitted.tokens_per_layer(8, 576) == [64, 64, 64, 64, 32, 32, 32, 32]
    assert Budget(64, "entering").of(fitted, 8, 576) == 64 and fitted.average_tokens(8, 576) == 48
    average = fit_budget(schedule, 64, depth=8, n_vision=576)
    assert average.average_tokens(8, 576) <= 64 and average.tokens_per_layer(8, 576)[0] > 64
    # an absolute pre-LLM schedule (VisionZip's preset) gets the same exact entering count
    visionzip = Method.from_preset("visionzip-llava15-64", depth=12).schedule
    assert fit_budget(visionzip, Budget(28.4, "entering"), 12, 256).tokens_per_layer(12, 256) == [28] * 12


@pytest.mark.parametrize("n_vision", [256, 576, 729])
def test_entering_budgets_are_exact_for_every_count(n_vision):
    """floor(n · keep) meets every count exactly (the keep fraction is nudged past floating-point error)."""
    schedule = Schedule.one_shot("pre_llm", 0.5)
    for count in range(1, n_vision + 1):
        assert fit_budget(schedule, Budget(count, "entering"), 4, n_vision).tokens_per_layer(4, n_vision)[0] == count


def test_entering_budget_needs_a_stage_before_the_llm():
    in_llm = Schedule.progressive([1, 3], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"needs a stage before the LLM or at layer 0; stages at layers \[1, 3\]"):
        fit_budget(in_llm, Budget(64, "entering"), 4, 100)
    assert fit_budget(in_llm, Budget(100, "entering"), 4, 100) == in_llm  # every token entering meets it
    at_zero = fit_budget(Schedule.progressive([0, 2], [0.9, 0.5]), Budget(30, "entering"), 4, 100)
    assert at_zero.tokens_per_layer(4, 100) == [30, 30, 15, 15]
    with pytest.raises(ValueError, match="one stage before the first decoder layer"):
        fit_budget(Schedule.progressive(["pre_llm", 0], [0.5, 0.5]), Budget(30, "entering"), 4, 100)


def test_budget_method_fits_either_convention():
    """A number keeps its meaning (the same schedule as an explicit average budget); an entering budget keeps the
    same share of the model's vision tokens entering the LLM."""
    plain = budget_method("v2drop", 128, 12, 256)
    assert plain == budget_method("v2drop", {"tokens": 128, "count": "average"}, 12, 256)
    assert plain.schedule.average_tokens(12, 256) <= 128 / 576 * 256
    visionzip = budget_method("visionzip", Budget(128, "entering"), 12, 256)
    assert visionzip.schedule.tokens_per_layer(12, 256)[0] == 56  # floor(128 / 576 · 256)
    with pytest.raises(ValueError, match="needs a stage before the LLM"):
        budget_method("fastv", Budget(128, "entering"), 12, 256)


def test_a_preset_states_its_budget_either_way():
    data = {**get_preset("visionzip-llava15-64").data, "description": "d", "label": "visionzip", "model": "llava15"}
    data["reference_vision_tokens"] = 576
    plain = parse_preset("visionzip-llava15-64", {**data, "budget": 64})
    assert (plain.budget, plain.budget_count) == (64, "average")
    entering = parse_preset("visionzip-llava15-64", {**data, "budget": {"tokens": 64, "count": "entering"}})
    assert (entering.budget, entering.budget_count) == (64, "entering")
    with pytest.raises(ValueError, match=r"budget: budget count must be one of average, entering, got 'all'"):
        parse_preset("visionzip-llava15-64", {**data, "budget": {"tokens": 64, "count": "all"}})
    with pytest.raises(ValueError, match=r"budget must be a positive whole number or absent, got 64.5"):
        parse_preset("visionzip-llava15-64", {**data, "budget": {"tokens": 64.5, "count": "entering"}})
