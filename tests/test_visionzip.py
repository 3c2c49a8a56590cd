"""VisionZip: dominant tokens by the tower's [CLS] attention, contextual tokens merged by key similarity.

Official definition: dvlab-research/VisionZip, visionzip/clip_encoder.py lines 43-85 (attention and hidden states of
the selection layer, line 43-45; the [CLS] row summed over heads, top-k, line 51-53; the [CLS] token kept among the
dominant ones, line 54; the remaining keys normalised, line 64; ``c`` evenly spaced targets, line 67-68; every other
remaining token assigned to its most similar target, line 72-74; a contextual token = target + mean of its assigned
tokens, line 75-80); visionzip/utils.py line 89 (the key is averaged over heads); visionzip/main.py line 7 (the
dominant count includes [CLS]: ``dominant_num = dominant - 1``).
"""

import pytest
import torch

import v2drop
from v2drop import Method
from v2drop.benchmarks import get_benchmark
from v2drop.scorers import LayerState, VisionFeatures
from v2drop.scorers.visionzip import VisionZipScorer
from v2drop.testing import batch_for


def hand_state(layer_idx=-1):
    """Eight vision tokens (prompt positions 1..8) between two text tokens; one image; D = 2."""
    attention = torch.tensor([[0.05, 0.30, 0.02, 0.20, 0.01, 0.25, 0.04, 0.13]])
    keys = torch.tensor([[[1.0, 0.0], [5.0, 5.0], [1.0, 0.1], [0.2, 1.0], [0.0, 1.0], [5.0, 5.0], [1.0, -0.5], [0.1, 1.0]]])
    hidden = torch.zeros(1, 10, 2)
    hidden[0, 1:9] = torch.stack([torch.arange(8.0), torch.ones(8)], dim=1)  # vision token i has hidden (i, 1)
    return LayerState(
        layer_idx=layer_idx, hidden=hidden, vision_idx=torch.arange(1, 9)[None], vision_valid=torch.ones(1, 8, dtype=torch.bool),
        vision_coords=torch.zeros(1, 8, 3, dtype=torch.long), orig_idx=torch.arange(10)[None], attention_mask=torch.ones(1, 10),
        sample_keys=torch.zeros(1, dtype=torch.long), layer=None,
        vision=VisionFeatures(cls_attention=attention, keys=keys, cls_embeds=[torch.tensor([[100.0, 100.0]])]),
    )


def test_hand_made_kept_and_merged_tokens():
    """k = 5 with contextual_ratio 0.4: c = round(2.0) = 2 contextual, 3 dominant = [CLS] + 2 patches (main.py:7).

    Dominant patches (clip_encoder.py:51-53): the two largest [CLS] attentions, tokens 1 (0.30) and 5 (0.25).
    Remaining, in order: 0 2 3 4 6 7; step = 6 // 2 = 3, targets at 0 and 3 of them: tokens 0 and 4 (line 67-68).
    Keys: 2 (1, .1) and 6 (1, −.5) are closest to 0 (1, 0); 3 (.2, 1) and 7 (.1, 1) to 4 (0, 1) (line 72-74).
    Contextual (line 75-80): h0 + mean(h2, h6) = (0, 1) + (4, 1) = (4, 2); h4 + mean(h3, h7) = (4, 1) + (5, 1) = (9, 2).
    """
    state = hand_state()
    sel = VisionZipScorer(contextual_ratio=0.4).select(state, VisionZipScorer().score(state), [5])
    assert sel.keep[0].tolist() == [1, 5]
    assert sel.added_source[0].tolist() == [0, 0, 4]  # [CLS] takes the image's first token's place, then the targets
    torch.testing.assert_close(sel.added_hidden[0], torch.tensor([[100.0, 100.0], [4.0, 2.0], [9.0, 2.0]]))


def test_a_decoder_stage_merges_without_a_cls_token():
    """At a decoder stage there is no projected [CLS] to add: 3 dominant patches 1, 5, 3 (0.20); rest 0 2 4 6 7,
    step 5 // 2 = 2, targets 0 and 4; 2, 6 join 0 and 7 joins 4: (0,1) + (4,1) = (4, 2) and (4,1) + (7,1) = (11, 2)."""
    state = hand_state(layer_idx=2)
    sel = VisionZipScorer(contextual_ratio=0.4).select(state, VisionZipScorer().score(state), [5])
    assert sel.keep[0].tolist() == [1, 3, 5]
    assert sel.added_source[0].tolist() == [0, 4]
    torch.testing.assert_close(sel.added_hidden[0], torch.tensor([[4.0, 2.0], [11.0, 2.0]]))


@pytest.mark.parametrize("budget, dominant, contextual", [(64, 54, 10), (128, 108, 20), (192, 162, 30)])
def test_presets_are_the_official_llava15_settings(budget, dominant, contextual):
    """54+10 / 108+20 / 162+30 (README; main.py:7): ``dominant`` counts the [CLS] token."""
    method = Method.from_preset(f"visionzip-llava15-{budget}")
    assert method.schedule.pre_llm is not None and method.position_policy == "renumber"
    torch.manual_seed(0)
    n = 576
    state = LayerState(
        layer_idx=-1, hidden=torch.randn(1, n, 8), vision_idx=torch.arange(n)[None], vision_valid=torch.ones(1, n, dtype=torch.bool),
        vision_coords=torch.zeros(1, n, 3, dtype=torch.long), orig_idx=torch.arange(n)[None], attention_mask=torch.ones(1, n),
        sample_keys=torch.zeros(1, dtype=torch.long), layer=None,
        vision=VisionFeatures(cls_attention=torch.rand(1, n), keys=torch.randn(1, n, 4), cls_embeds=[torch.randn(1, 8)]),
    )
    count = method.schedule.kept_count(0, n, n)
    sel = method.scorer.select(state, method.scorer.score(state), [count])
    assert len(sel.keep[0]) + 1 == dominant and len(sel.added_source[0]) - 1 == contextual


def test_cls_attention_is_the_towers_own_attention(tiny):
    """The served [CLS] row equals the eager CLIP tower's attention probabilities at the selection layer, heads summed."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 2, "llava")
    inputs = lvlm.prepare(prompts, images)
    from v2drop.scorers import VisionRequest

    state = lvlm.adapter.vision_tower_state(inputs, VisionRequest(keys=True, cls_embeds=True))
    tower = lvlm.model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = len(out.attentions) + lvlm.model.config.vision_feature_layer  # attentions[-2] with hidden_states[-2] (line 43-44)
    expected = out.attentions[layer][:, :, 0, 1:].sum(1)  # clip_encoder.py:51-52
    placeholder = inputs["input_ids"] == lvlm.model.config.image_token_id
    torch.testing.assert_close(state["cls_attention"][placeholder], expected.reshape(-1), atol=1e-6, rtol=0)
    with torch.no_grad():
        cls = lvlm.model.model.multi_modal_projector(out.hidden_states[layer + 1][:, 0])
    torch.testing.assert_close(torch.cat(state["cls_embeds"]), cls, atol=1e-6, rtol=0)


def test_pre_llm_run_on_tiny_llava_follows_the_official_definition(tiny):
    """k = 16: c = round(2.5) = 3 contextual, [CLS] + 12 patches dominant; targets every 51 // 3 = 17th remaining token."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 3, "llava")
    inputs = lvlm.prepare(prompts, images)
    method = Method("visionzip", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 16]]}, position_policy="renumber")
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=2, stop_at_eos=False)
    with torch.no_grad():
        attn = lvlm.model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    cls = attn[len(attn) + lvlm.model.config.vision_feature_layer][:, :, 0, 1:].sum(1)
    for b, trace in enumerate(out.traces):
        first = inputs["attention_mask"][b].tolist().index(1)
        positions = (inputs["input_ids"][b] == lvlm.model.config.image_token_id).nonzero().flatten() - first
        dominant = sorted(torch.sort(cls[b], descending=True, stable=True).indices[:12].tolist())
        rest = [i for i in range(64) if i not in dominant]
        targets = rest[:: len(rest) // 3][:3]
        assert trace.stages == [{"layer": -1, "kept": positions[dominant].tolist(), "merged": positions[[0] + targets].tolist()}]
        assert trace.vision_tokens_per_layer == [16] * lvlm.depth


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_families_without_a_served_cls_token_are_refused(tiny, family):
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 1, family)
    method = Method("visionzip", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 4]]})
    match = "no \\[CLS\\] token" if family.startswith("qwen") else "anyres"
    with pytest.raises(ValueError, match=match):
        lvlm.generate(prompts, images, method=method, max_new_tokens=1)


def test_runs_on_the_bundled_proxy():
    """The proxy is a LLaVA with a CLIP tower: it has a [CLS] token, so VisionZip runs on it."""
    lvlm = v2drop.load("proxy")
    assert lvlm.model.config.vision_feature_select_strategy == "default"  # the tower's [CLS] exists and is dropped by HF
    sample = get_benchmark("digits").load("test", 1)[0]
    out = lvlm.generate([lvlm.format_prompt(sample.question)], [list(sample.images)], method="visionzip-llava15-64", max_new_tokens=2)
    trace = out.traces[0]
    assert len(trace.stages[0]["kept"]) == 53 and len(trace.stages[0]["merged"]) == 11
    assert trace.vision_tokens_per_layer == [64] * lvlm.depth
