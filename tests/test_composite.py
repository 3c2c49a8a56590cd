"""Composite and staged scorers: hand-made combinations, the union of needs, YAML round trips and real runs."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import v2drop
from v2drop import Method, Schedule, register_scorer
from v2drop.scorers import AttentionRequest, LayerState, Scorer, build_scorer
from v2drop.scorers.composite import rank_normalise, zscore_normalise
from v2drop.testing import batch_for

FIXED = {"a": [3.0, 1.0, 2.0], "b": [1.0, 2.0, 3.0]}


def state_of(n=3):
    """A LayerState with one sample of ``n`` vision tokens (only the fields the fixed scorers read)."""
    return LayerState(
        layer_idx=2,
        hidden=torch.zeros(1, n, 4),
        vision_idx=torch.arange(n)[None],
        vision_valid=torch.ones(1, n, dtype=torch.bool),
        vision_coords=torch.zeros(1, n, 3, dtype=torch.long),
        orig_idx=torch.arange(n)[None],
        attention_mask=torch.ones(1, n),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
    )


@pytest.fixture
def fixed_scorers():
    """Two registered scorers returning the hand-made scores a = (3, 1, 2) and b = (1, 2, 3)."""
    for key, values in FIXED.items():

        @dataclass
        class Fixed(Scorer):
            def score(self, state, values=values):
                return torch.tensor([values])

        register_scorer(f"fixed_{key}")(Fixed)


def composite(combine, wa=0.7, wb=0.3):
    return build_scorer(
        "composite", combine=combine, parts=[{"name": "fixed_a", "weight": wa}, {"name": "fixed_b", "weight": wb}]
    )


def test_rank_combination_by_hand(fixed_scorers):
    """Ranks scaled to [0, 1]: a -> (1, 0, .5), b -> (0, .5, 1); 0.7a + 0.3b = (.7, .15, .65): keep 2 = {0, 2}."""
    scorer = composite("rank")
    scores = scorer.score(state_of())
    torch.testing.assert_close(scores, torch.tensor([[0.7, 0.15, 0.65]]))
    assert scorer.select(state_of(), scores, [2]).keep[0].tolist() == [0, 2]


def test_zscore_combination_by_hand(fixed_scorers):
    """z(a) = (1, −1, 0)/√(2/3) = (1.2247, −1.2247, 0), z(b) = (−1.2247, 0, 1.2247);
    0.7·z(a) + 0.3·z(b) = (0.4899, −0.8573, 0.3674): keep 1 = {0}; with the weights swapped, {2}."""
    scores = composite("zscore").score(state_of())
    torch.testing.assert_close(scores, torch.tensor([[0.4899, -0.8573, 0.3674]]), atol=1e-4, rtol=0)
    swapped = composite("zscore", 0.3, 0.7)
    assert swapped.select(state_of(), swapped.score(state_of()), [1]).keep[0].tolist() == [2]


def test_ties_share_their_rank_and_padding_is_ignored():
    scores = torch.tensor([[2.0, 2.0, 5.0, float("-inf")], [1.0, 0.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    torch.testing.assert_close(
        rank_normalise(scores, valid), torch.tensor([[0.25, 0.25, 1.0, 0.0], [1 / 3, 0.0, 5 / 6, 5 / 6]])
    )
    z = zscore_normalise(torch.tensor([[1.0, float("-inf"), 3.0]]), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(z, torch.tensor([[-1.0, -2.0, 1.0]]))  # −inf: below the lowest finite z


def test_needs_are_the_union_of_the_parts():
    scorer = build_scorer(
        "composite", parts=[{"name": "v2drop", "weight": 0.5}, {"name": "fastv", "weight": 0.5, "faithful": True}]
    )
    assert scorer.needs_prev_hidden
    assert scorer.attention_request() == AttentionRequest(layer_offset=-1, full_map=True)
    with pytest.raises(ValueError, match="different layers"):
        build_scorer("composite", parts=[{"name": "fastv"}, {"name": "pdrop"}])
    with pytest.raises(ValueError, match="stage layer must be >= 1"):
        Method("composite", schedule=Schedule.one_shot(0, 0.5))  # v2drop and fastv need layer l − 1
    with pytest.raises(ValueError, match="combine"):
        build_scorer("composite", combine="mean")
    with pytest.raises(ValueError, match="no parameter"):
        build_scorer("composite", parts=[{"name": "v2drop", "weight": 1.0, "metrc": "l1"}])


def test_yaml_presets_round_trip_with_their_weights():
    method = Method.from_preset("composite-v2drop-fastv-llava15-128")
    data = method.to_dict()
    assert data["scorer"] == {
        "name": "composite",
        "combine": "rank",
        "parts": [
            {"name": "v2drop", "weight": 0.7, "metric": "l2"},
            {"name": "fastv", "weight": 0.3, "faithful": False},
        ],
    }
    assert Method.from_dict(data) == method
    data["scorer"]["parts"][0]["weight"] = 0.5  # a sweep changes a weight: a different method
    assert Method.from_dict(data) != method
    staged = Method.from_preset("visionzip-v2drop-llava15-128")
    assert staged.to_dict()["scorer"] == {
        "name": "staged",
        "pre_llm": {
            "name": "visionzip",
            "contextual_ratio": 0.15625,
            "merge_space": "projected",
            "order": "kept_first",
        },
        "llm": {"name": "v2drop", "metric": "l2"},
    }
    assert Method.from_dict(staged.to_dict()) == staged
    assert staged.rescaled(12).schedule.layers == (-1, 1, 6, 8)


def test_a_composite_with_one_weight_keeps_what_its_part_keeps(tiny):
    """Ranks preserve the order of V²Drop's (continuous) scores, so weight 1 on v2drop and 0 on fastv is v2drop."""
    lvlm = tiny("qwen2_vl")
    prompts, images = batch_for(lvlm, 3, "qwen2_vl")
    schedule = Schedule.progressive([2, 4], [0.5, 0.5])
    mixed = Method(
        "composite", schedule=schedule, parts=[{"name": "v2drop", "weight": 1.0}, {"name": "fastv", "weight": 0.0}]
    )
    alone = Method("v2drop", schedule=schedule)
    a = lvlm.generate(prompts, images, method=mixed, max_new_tokens=2)
    b = lvlm.generate(prompts, images, method=alone, max_new_tokens=2)
    assert [t.stages for t in a.traces] == [t.stages for t in b.traces]
    assert a.generated_ids == b.generated_ids


def test_staged_parts_must_fit_their_stages():
    with pytest.raises(ValueError, match="no pre_llm part"):
        Method("staged", schedule={"stages": [["pre_llm", 0.5]]})
    with pytest.raises(ValueError, match="pre-LLM"):
        Method("staged", schedule={"stages": [["pre_llm", 0.5]]}, pre_llm={"name": "v2drop"})
    with pytest.raises(ValueError, match="cannot be staged"):
        build_scorer("staged", llm={"name": "staged"})


def test_dotted_parameters_reach_nested_weights():
    """A sweep sets nested parameters by path; the result is a new, valid method and the original is unchanged."""
    from v2drop.scorers.composite import with_params

    base = Method.from_preset("composite-v2drop-fastv-llava15-128").to_dict()
    data = dict(
        base, scorer=with_params(base["scorer"], {"parts.0.weight": 0.5, "parts.1.faithful": True, "combine": "zscore"})
    )
    method = Method.from_dict(data)
    assert (
        method.scorer.parts[0]["weight"] == 0.5
        and method.scorer.parts[1]["faithful"]
        and method.scorer.combine == "zscore"
    )
    assert base["scorer"]["parts"][0]["weight"] == 0.7
    staged = with_params({"name": "staged", "llm": {"name": "v2drop", "metric": "l2"}}, {"llm.metric": "cosine"})
    assert Method.from_dict({"scorer": staged}).scorer.at(3).metric == "cosine"
    with pytest.raises(ValueError, match="parts.5.weight"):
        with_params(base["scorer"], {"parts.5.weight": 1.0})


STAGED_YAML = """\
# written by a user: DivPrune keeps 96 of the projected vision tokens, then FastV halves them twice
description: "staged DivPrune -> FastV"
scorer:
  name: staged
  pre_llm: {name: divprune}
  llm: {name: fastv}
schedule:
  keep_mode: absolute
  stages: [[pre_llm, 96], [2, 48], [6, 24]]
"""


@pytest.mark.parametrize("source", ["preset file", "user file"])
def test_yaml_only_methods_evaluate_through_the_cli(tmp_path, source):
    """`experiments.evaluate --method <file.yaml>` runs a composite preset file and a user's staged YAML on the
    proxy."""
    from experiments.evaluate import main

    if source == "preset file":
        path = Path(v2drop.__file__).parent / "presets" / "composite-v2drop-dart-llava15-128.yaml"
    else:
        path = tmp_path / "staged.yaml"
        path.write_text(STAGED_YAML)
    trace = tmp_path / "trace.jsonl"
    result = main(
        [
            "--method",
            str(path),
            "--model",
            "proxy",
            "--limit",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "2",
            "--warmup",
            "0",
            "--no-progress",
            "--store",
            str(tmp_path / "run"),
            "--save-trace",
            str(trace),
        ]
    )
    method = Method.from_preset(str(path), depth=12)  # the proxy: 12 layers, 256 vision tokens per image
    assert Method.from_dict(result["config"]["method"]) == Method.from_preset(str(path))
    assert result["metrics"]["average_vision_tokens"] == pytest.approx(method.schedule.average_tokens(12, 256))
    stages = [[s["layer"] for s in json.loads(line)["stages"]] for line in trace.read_text().splitlines()]
    assert stages == [list(method.schedule.layers)] * 2
