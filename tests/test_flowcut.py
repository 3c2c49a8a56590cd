"""FlowCut: its score and adaptive count on hand-worked tensors, its presets on the bundled proxy, its refusals."""

import math

import pytest
import torch

import v2drop
from v2drop import Method, Schedule
from v2drop.schedule import VISION, Stage
from v2drop.scorers import EncoderFeatures, LayerState, build_scorer
from v2drop.scorers.flowcut import adaptive_prune, flowcut_scores
from v2drop.testing import FAMILIES, batch_for

# One image, two heads, [CLS] + two patches, head dim 2.
ATTENTION = torch.tensor([[[0.2, 0.5, 0.3]], [[0.2, 0.1, 0.7]]])[None].expand(1, 2, 3, 3).clone()  # (1, H, T, T)
VALUES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[None, None].expand(1, 2, 3, 2).clone()  # (1, H, T, hd)


def test_scores_by_hand():
    # relation: the [CLS] row on the patches, heads averaged: (0.3, 0.5) -> normalised (0.375, 0.625)
    # semantic: softmax of the [CLS] value against every value, (1, 0, 1) -> patches (1, e) / (2e + 1),
    #   normalised (1, e) / (1 + e); magnitude: |v|_1 of the head-averaged values, (1, 2)
    e = math.e
    expected = torch.tensor([[(0.375 + 1 / (1 + e)) * 1, (0.625 + e / (1 + e)) * 2]])
    torch.testing.assert_close(flowcut_scores(ATTENTION, VALUES), expected)


def test_adaptive_prune_by_hand():
    flat = torch.full((4,), 0.25)
    assert adaptive_prune(flat, remaining=4, target=1) == 0  # a flat [CLS] attention drops nothing
    peaked = torch.tensor([0.7, 0.1, 0.1, 0.1])
    entropy = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    r = (4 - 1) / math.sqrt(4) * (1 - (entropy / math.log(4)) ** 2)  # 0.81
    assert adaptive_prune(peaked, remaining=4, target=1) == round(r) == 1
    assert adaptive_prune(peaked, remaining=1, target=1) == 2  # 1.62: fewer layers left, more dropped


def state(attention, values, layer=2, last=4, prev=None):
    n = attention.shape[-1] - 1
    return LayerState(
        layer_idx=VISION + layer,
        hidden=torch.zeros(1, n + 1, 2),
        vision_idx=torch.arange(1, n + 1)[None],
        vision_valid=torch.ones(1, n, dtype=torch.bool),
        vision_coords=torch.zeros(1, n, 3, dtype=torch.long),
        orig_idx=torch.arange(n + 1)[None],
        attention_mask=torch.ones(1, n + 1, dtype=torch.long),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
        encoder=EncoderFeatures(layer, 5, last, attention, values, prev),
    )


def test_score_is_the_running_average_and_select_is_adaptive():
    scorer = build_scorer("flowcut")
    first = scorer.score(state(ATTENTION, VALUES))
    torch.testing.assert_close(first, flowcut_scores(ATTENTION, VALUES))
    prev = torch.tensor([[4.0, 0.0]])
    torch.testing.assert_close(scorer.score(state(ATTENTION, VALUES, prev=prev)), 0.5 * prev + 0.5 * first)
    # four patches, a peaked [CLS] row: 1 dropped four layers before the stage (target 1), none three layers before
    # (an odd number), all but the target at the stage
    attention = torch.zeros(1, 1, 5, 5)
    attention[0, 0, 0] = torch.tensor([0.0, 0.7, 0.1, 0.1, 0.1])
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    assert scorer.select(state(attention, None, layer=2, last=6), scores, [1]).keep[0].tolist() == [0, 2, 3]
    assert scorer.select(state(attention, None, layer=3, last=6), scores, [1]).keep[0].tolist() == [0, 1, 2, 3]
    assert scorer.select(state(attention, None, layer=6, last=6), scores, [1]).keep[0].tolist() == [0]
    assert scorer.select(state(attention, None, layer=2, last=6), scores, [4]).keep[0].tolist() == [0, 1, 2, 3]


def test_flowcut_runs_at_encoder_stages_only():
    with pytest.raises(ValueError, match="prunes inside the vision encoder"):
        Method("flowcut", schedule=Schedule.one_shot(2, 0.5))
    with pytest.raises(ValueError, match="prunes inside the vision encoder"):
        Method("flowcut", schedule=Schedule.one_shot("pre_llm", 0.5))
    with pytest.raises(ValueError, match="l >= 1"):
        Method("flowcut", schedule=Schedule.one_shot("vision:0", 0.5))


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets_are_the_official_schedule(budget):
    preset = v2drop.get_preset(f"flowcut-llava15-{budget}")
    method = preset.method(32)
    assert method.schedule.stages == (Stage(VISION + 22, budget),) and method.schedule.tower_reference == 23
    assert method.schedule.tokens_per_layer(32, 576) == [budget] * 32 and method.position_policy == "renumber"
    assert (preset.budget, preset.reference_vision_tokens, preset.data["scorer"]) == (budget, 576, {"name": "flowcut"})


def test_preset_runs_on_the_proxy_and_reduces_tokens():
    from v2drop.benchmarks import get_benchmark

    lvlm = v2drop.load("proxy")
    samples = get_benchmark("digits").load("test", 2)
    prompts = [lvlm.format_prompt(s.question) for s in samples]
    images = [list(s.images) for s in samples]
    method = Method.from_preset("flowcut-llava15-64", depth=lvlm.depth)
    out = lvlm.generate(prompts, images, method=method, max_new_tokens=3)
    for trace in out.traces:  # the 2-layer tower read at its last layer: vision:22 of 23 becomes vision:2
        assert [(s["layer"] - VISION, len(s["kept"])) for s in trace.stages] == [(2, 64)]
        assert trace.vision_tokens == 256 and trace.vision_tokens_per_layer == [64] * lvlm.depth
        assert trace.encoder_tokens_per_layer == [257, 257]  # scored before layer 1, pruned after layer 1
    assert all(len(ids) > 0 for ids in out.generated_ids)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_other_families_refuse_with_a_reason(tiny, family):
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 1, family)
    method = Method("flowcut", schedule=Schedule.one_shot("vision:1", 0.5))
    with pytest.raises(ValueError, match="vision-encoder stages .* run on a CLIP-like tower with a \\[CLS\\] token"):
        lvlm.generate(prompts, images, method=method, max_new_tokens=1)
