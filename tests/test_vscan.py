"""VScan: its scans, merge and LLM stage on hand-worked tensors, its presets on the bundled proxy, its refusals.

Official code: Tencent/SelfEvolvingAgent @ a82450e1b5e15070bee79ee8b79f8d9a97cb85f7, VScan/llava/model/llava_arch.py
(window_cls_selection, encode_images, token_merging) and VScan/llava/model/modeling_llama_x.py (layer_prune).
"""

import pytest
import torch

import v2drop
from v2drop import Method, Schedule
from v2drop.schedule import VISION, Stage
from v2drop.scorers import AttentionRequest, EncoderFeatures, LayerState, Merge, build_scorer
from v2drop.scorers.pdrop import PDropScorer
from v2drop.scorers.vscan import nearest_merge, window_scan
from v2drop.testing import FAMILIES, batch_for

GRID = torch.arange(16)
ROWS, COLS = GRID // 4, GRID % 4  # a 4 x 4 patch grid; 2 x 2 tiles: {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}


def encoder_state(deep_cls: torch.Tensor, hidden: torch.Tensor, shallow: torch.Tensor | None) -> LayerState:
    """One tower image at an encoder stage: 16 patches, two heads whose [CLS] rows average to ``deep_cls``."""
    n = len(deep_cls)
    attention = torch.zeros(1, 2, n + 1, n + 1)
    spread = torch.linspace(-0.01, 0.01, n)  # the heads differ; their mean is deep_cls
    attention[0, 0, 0, 1:], attention[0, 1, 0, 1:] = deep_cls + spread, deep_cls - spread
    coords = torch.stack([torch.zeros_like(GRID), ROWS, COLS], -1)[None]
    return LayerState(
        layer_idx=VISION + 2,
        hidden=torch.cat([torch.zeros(1, 1, hidden.shape[-1]), hidden[None]], 1),
        vision_idx=torch.arange(1, n + 1)[None],
        vision_valid=torch.ones(1, n, dtype=torch.bool),
        vision_coords=coords,
        orig_idx=torch.arange(n + 1)[None],
        attention_mask=torch.ones(1, n + 1, dtype=torch.long),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
        encoder=EncoderFeatures(
            2, 2, 2, attention=attention, cls_attention={} if shallow is None else {6: shallow[None]}
        ),
    )


def test_local_scan_takes_the_best_of_each_tile():
    scores = torch.zeros(16)
    scores[[5, 2, 12, 15]] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    scores[[0, 3, 8, 10]] = 0.5  # each tile's second best
    assert window_scan(scores, ROWS, COLS, 2, 1).tolist() == [2, 5, 12, 15]
    assert window_scan(scores, ROWS, COLS, 2, 2).tolist() == [0, 2, 3, 5, 8, 10, 12, 15]
    assert window_scan(torch.zeros(16), ROWS, COLS, 2, 1).tolist() == [0, 2, 8, 10]  # ties: the lower index
    assert window_scan(scores, ROWS, COLS, 1, 3).tolist() == [2, 5, 12]  # one tile: the global top 3


def test_nearest_merge_by_hand():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    merge = nearest_merge(hidden, torch.tensor([0, 1, 5]))
    # 2 -> 0, 3 -> 1, 4 is as close to 0 as to 1 (cos 0.707): the lower; 5 draws none and stays as it is
    assert isinstance(merge, Merge) and merge.keep[0].tolist() == [5]
    assert merge.anchors[0].tolist() == [0, 1]
    assert merge.members[0].tolist() == [0, 1, 2, 3, 4] and merge.groups[0].tolist() == [0, 1, 0, 1, 0]
    assert merge.weights[0].tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 3, 1 / 2, 1 / 3])
    merged = merge.combine(0, hidden[merge.members[0]])  # the official (retained + Σ merged) / (1 + count)
    torch.testing.assert_close(merged, torch.tensor([[4 / 3, 1.1 / 3], [0.05, 2.0]]))
    nothing_left = nearest_merge(hidden, torch.arange(6))
    assert not isinstance(nothing_left, Merge) and nothing_left.keep[0].tolist() == list(range(6))


def test_encoder_stage_local_then_global_scan_then_merge():
    shallow = torch.zeros(16)
    shallow[[5, 2, 12, 15]] = 1.0  # the local scan's pick: one per tile
    deep = torch.linspace(0.1, 0.0, 16)  # decreasing: the global scan wants the lowest indices...
    deep[2] = 0.5  # ... and 2, which the local scan already took, so it goes on to the next
    hidden = torch.eye(16)  # orthogonal patches; each dropped one leans towards one retained patch
    for dropped, nearest in {6: 0, 7: 0, 8: 0, 9: 15, 10: 0, 11: 0, 13: 0, 14: 0}.items():
        hidden[dropped] += 2 * hidden[nearest]
    scorer = build_scorer("vscan", windows=2)
    state = encoder_state(deep, hidden, shallow)
    scores = scorer.score(state)
    torch.testing.assert_close(scores, deep[None])  # heads averaged
    merge = scorer.select(state, scores, [8])  # 4 local (one a tile), 4 global
    retained = sorted(merge.keep[0].tolist() + merge.anchors[0].tolist())
    assert retained == [0, 1, 2, 3, 4, 5, 12, 15]
    groups = {int(a): sorted(merge.members[0][merge.groups[0] == g].tolist()) for g, a in enumerate(merge.anchors[0])}
    assert groups == {0: [0, 6, 7, 8, 10, 11, 13, 14], 15: [9, 15]}
    assert merge.keep[0].tolist() == [1, 2, 3, 4, 5, 12]
    # the stage before the shallow layer: the local scan reads this stage's attention too
    alone = scorer.select(encoder_state(deep, hidden, None), scores, [8])
    # local: 0, 2, 8, 10 (each tile's best of this attention); global: the next best 1, 3, 4, 5
    assert sorted(alone.keep[0].tolist() + alone.anchors[0].tolist()) == [0, 1, 2, 3, 4, 5, 8, 10]
    # a stage keeping every patch keeps them as they are
    assert scorer.select(state, scores, [16]).keep[0].tolist() == list(range(16))


def test_llm_stage_is_pdrop_on_the_last_instruction_token():
    scorer = build_scorer("vscan")
    assert isinstance(scorer.at(16), PDropScorer) and scorer.at(VISION + 23) is scorer
    assert scorer.at(16).attention_request() == AttentionRequest(layer_offset=0)
    state = LayerState(
        layer_idx=16,
        hidden=torch.zeros(1, 6, 4),
        vision_idx=torch.tensor([[1, 2, 3, 4]]),
        vision_valid=torch.ones(1, 4, dtype=torch.bool),
        vision_coords=torch.zeros(1, 4, 3, dtype=torch.long),
        orig_idx=torch.arange(6)[None],
        attention_mask=torch.ones(1, 6, dtype=torch.long),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
        attention=torch.tensor([[[0.1, 0.3, 0.05, 0.2, 0.15, 0.2]]]),
    )
    scores = scorer.score(state)
    torch.testing.assert_close(scores, torch.tensor([[0.3, 0.05, 0.2, 0.15]]))
    assert scorer.select(state, scores, [2]).keep[0].tolist() == [0, 2]


def test_stage_kinds_and_parameters_are_checked():
    with pytest.raises(ValueError, match="not at the pre-LLM stage"):
        Method("vscan", schedule=Schedule.one_shot("pre_llm", 0.5))
    with pytest.raises(ValueError, match="l >= 1"):
        Method("vscan", schedule=Schedule.one_shot("vision:0", 0.5))
    with pytest.raises(ValueError, match="global_ratio"):
        build_scorer("vscan", global_ratio=1.5)
    with pytest.raises(ValueError, match="windows"):
        build_scorer("vscan", windows=0)
    Method("vscan", schedule=Schedule.from_dict({"stages": [["vision:1", 0.5], [2, 0.5]]}))


@pytest.mark.parametrize(("budget", "encoder", "llm"), [(192, 288, 96), (128, 192, 64), (64, 96, 32)])
def test_presets_are_the_official_schedule(budget, encoder, llm):
    preset = v2drop.get_preset(f"vscan-llava15-{budget}")
    method = preset.method(32)
    assert method.schedule.stages == (Stage(VISION + 23, encoder), Stage(16, llm))
    assert method.schedule.tower_reference == 23 and method.position_policy == "renumber"
    assert method.schedule.average_tokens(32, 576) == budget
    assert (preset.budget, preset.reference_vision_tokens, preset.data["scorer"]) == (budget, 576, {"name": "vscan"})


def test_presets_run_on_the_proxy_and_reduce_tokens():
    from v2drop.benchmarks import get_benchmark

    lvlm = v2drop.load("proxy")
    samples = get_benchmark("digits").load("test", 2)
    prompts = [lvlm.format_prompt(s.question) for s in samples]
    images = [list(s.images) for s in samples]
    out = lvlm.generate(
        prompts, images, method=Method.from_preset("vscan-llava15-64", depth=lvlm.depth), max_new_tokens=3
    )
    for trace in out.traces:  # vision:23 of 23 becomes vision:2 (the shallow layer 6: 1); layer 16 of 32 is 6 of 12
        encoder = trace.stages[0]
        assert [s["layer"] for s in trace.stages] == [VISION + 2, 6]
        assert len(encoder["kept"]) + len(encoder["merged"]) == 96 and len(encoder["merged"]) > 0
        assert sum(len(m) for m in encoder["members"]) == 256 - len(encoder["kept"])  # every other patch merged
        assert trace.vision_tokens_per_layer == [96] * 6 + [32] * 6
    assert all(len(ids) > 0 for ids in out.generated_ids)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_other_families_refuse_with_a_reason(tiny, family):
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 1, family)
    method = Method("vscan", schedule=Schedule.from_dict({"stages": [["vision:1", 0.5], [2, 0.5]]}))
    with pytest.raises(ValueError, match="vision-encoder stages .* run on a CLIP-like tower with a \\[CLS\\] token"):
        lvlm.generate(prompts, images, method=method, max_new_tokens=1)


def test_the_encoder_stage_is_the_official_rule_on_transformers_tower_outputs():
    """The official encode_images (transcribed here on transformers' eager attentions and hidden states) on a
    four-layer CLIP tower read at hidden_states[3]: the same retained slots and merged features. The merge is on the
    tower's features, then projected (the official merges the projector's outputs: docs/methods.md, VScan (1))."""
    from transformers import CLIPVisionConfig

    from v2drop.engine.encoder import run_encoder_stages
    from v2drop.engine.loop import SampleTrace, sample_keys
    from v2drop.testing import image, random_llava

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
        patch_size=4, initializer_range=0.2,
    )  # fmt: skip
    lvlm = random_llava(hidden=64, layers=3, image_size=32, patch=4, vision=vision)  # 8 x 8 patches
    inputs = lvlm.prepare([lvlm.format_prompt("w1 w2"), lvlm.format_prompt("w3")], [image(0, 32), image(1, 32)])
    schedule = Schedule.from_dict({"keep_mode": "absolute", "stages": [["vision:3", 16]]})
    method = Method("vscan", schedule=schedule, shallow_layer=2, windows=2)
    traces = [SampleTrace() for _ in range(2)]
    with torch.no_grad():
        embeds, keep = run_encoder_stages(
            lvlm.adapter, inputs, method, sample_keys(inputs["input_ids"], inputs["attention_mask"]), traces
        )
        tower = lvlm.model.model.vision_tower
        tower.set_attn_implementation("eager")
        try:
            out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        finally:
            tower.set_attn_implementation(lvlm.model.config._attn_implementation)
        projected = lvlm.model.model.multi_modal_projector
        vision_mask = lvlm.adapter.vision_mask(inputs["input_ids"])
        for b in range(2):
            shallow = out.attentions[1][b, :, 0, 1:].mean(0).view(8, 8)  # layer 1 produces hidden_states[2]
            deep = out.attentions[2][b, :, 0, 1:].mean(0).clone()  # layer 2 produces hidden_states[3]
            local = []
            for i in range(2):
                for j in range(2):  # 4 x 4 windows, 16 // 2 // 4 = 2 patches each
                    top = shallow[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(-1).topk(2).indices
                    local += [int((4 * i + t // 4) * 8 + 4 * j + t % 4) for t in top]
            deep[local] = 0
            retained = sorted(local + deep.topk(16 - 8).indices.tolist())
            features = out.hidden_states[3][b, 1:]
            rest = [p for p in range(64) if p not in retained]
            sim = torch.nn.functional.cosine_similarity(features[rest, None], features[retained][None], dim=-1)
            merged = features[retained].clone()
            count = torch.ones(len(retained))
            for p, r in zip(rest, sim.argmax(1).tolist()):
                merged[r] += features[p]
                count[r] += 1
            expected = projected(merged / count[:, None])
            slots = int(vision_mask[b].nonzero()[0]) + torch.tensor(retained)
            assert keep[b].logical_and(vision_mask[b]).nonzero().flatten().tolist() == slots.tolist()
            torch.testing.assert_close(embeds[b, slots].float(), expected.float(), rtol=1e-4, atol=1e-5)
