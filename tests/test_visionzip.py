"""VisionZip: dominant tokens by the tower's [CLS] attention, contextual tokens merged by key similarity.

Official definition: dvlab-research/VisionZip, visionzip/clip_encoder.py lines 43-85 (attention and hidden states of
the selection layer, line 43-45; the [CLS] row summed over heads, top-k, line 51-53; the [CLS] token kept among the
dominant ones, line 54; the remaining keys normalised, line 64; ``c`` evenly spaced targets, line 67-68; every other
remaining token assigned to its most similar target, line 72-74; a contextual token = target + mean of its assigned
tokens, line 75-80); visionzip/utils.py line 89 (the key is averaged over heads); visionzip/main.py line 7 (the
dominant count includes [CLS]: ``dominant_num = dominant - 1``).

LLaVA-NeXT (visionzip/llava_arch.py): every crop of every image (the base image and each anyres tile) goes
through the tower as its own image (lines 94-95), so the selection above runs per crop with the same dominant
and contextual counts; the base image's zipped tokens come first (line 110, 121), then the tiles' dominant
patches put back on the tiles' grid and read in its raster order (restore_image_features_sorted, lines 49-75;
``grid_with_newline = restored_features``, line 67: no image_newline token is kept), then every tile's [CLS]
(line 77) and every tile's contextual tokens (line 76), concatenated at line 79.
"""

import pytest
import torch

import v2drop
from v2drop import Method
from v2drop.benchmarks import get_benchmark
from v2drop.scorers import LayerState, VisionFeatures
from v2drop.scorers.visionzip import VisionZipScorer
from v2drop.testing import batch_for, photo, prompt_for


def hand_state(layer_idx=-1):
    """Eight vision tokens (prompt positions 1..8) between two text tokens; one image; D = 2."""
    attention = torch.tensor([[0.05, 0.30, 0.02, 0.20, 0.01, 0.25, 0.04, 0.13]])
    keys = torch.tensor(
        [[[1.0, 0.0], [5.0, 5.0], [1.0, 0.1], [0.2, 1.0], [0.0, 1.0], [5.0, 5.0], [1.0, -0.5], [0.1, 1.0]]]
    )
    hidden = torch.zeros(1, 10, 2)
    hidden[0, 1:9] = torch.stack([torch.arange(8.0), torch.ones(8)], dim=1)  # vision token i has hidden (i, 1)
    return LayerState(
        layer_idx=layer_idx,
        hidden=hidden,
        vision_idx=torch.arange(1, 9)[None],
        vision_valid=torch.ones(1, 8, dtype=torch.bool),
        vision_coords=torch.zeros(1, 8, 3, dtype=torch.long),
        orig_idx=torch.arange(10)[None],
        attention_mask=torch.ones(1, 10),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
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


def projector(x: torch.Tensor) -> torch.Tensor:
    """A hand-made nonlinear projector: (x0, x1) -> (max(x0 - 3, 0), x1)."""
    return torch.stack([(x[..., 0] - 3).clamp(min=0), x[..., 1]], dim=-1)


def tower_state() -> LayerState:
    """``hand_state`` with tower features f_i = (i, 1) and LLM inputs h_i = projector(f_i) = (max(i - 3, 0), 1)."""
    state = hand_state()
    features = torch.stack([torch.arange(8.0), torch.ones(8)], dim=1)[None]
    hidden = state.hidden.clone()
    hidden[0, 1:9] = projector(features[0])
    vision = VisionFeatures(
        cls_attention=state.vision.cls_attention,
        keys=state.vision.keys,
        cls_embeds=state.vision.cls_embeds,
        features=features,
        project=projector,
    )
    return LayerState(**{**state.__dict__, "hidden": hidden, "vision": vision})


def test_tower_merge_projects_the_merged_features_and_differs_from_merging_projections():
    """Same selection as ``test_hand_made_kept_and_merged_tokens`` (targets 0 <- 2, 6 and 4 <- 3, 7).

    projected (ours): h0 + mean(h2, h6) = (0, 1) + ((0 + 3) / 2, 1) = (1.5, 2); h4 + mean(h3, h7) = (1, 1) + (2, 1)
    = (3, 2). tower (official, clip_encoder.py:75-80 then llava_arch.py:33): projector(f0 + mean(f2, f6)) =
    projector((4, 2)) = (1, 2); projector(f4 + mean(f3, f7)) = projector((9, 2)) = (6, 2).
    """
    state = tower_state()
    scores = VisionZipScorer().score(state)
    projected = VisionZipScorer(contextual_ratio=0.4).select(state, scores, [5])
    tower = VisionZipScorer(contextual_ratio=0.4, merge_space="tower").select(state, scores, [5])
    for sel in (projected, tower):  # the kept set, the [CLS] and the targets do not depend on the merge space
        assert sel.keep[0].tolist() == [1, 5] and sel.added_source[0].tolist() == [0, 0, 4]
    torch.testing.assert_close(projected.added_hidden[0], torch.tensor([[100.0, 100.0], [1.5, 2.0], [3.0, 2.0]]))
    torch.testing.assert_close(tower.added_hidden[0], torch.tensor([[100.0, 100.0], [1.0, 2.0], [6.0, 2.0]]))


def test_tower_merge_is_refused_at_a_decoder_stage_and_checked():
    state = tower_state()
    with pytest.raises(ValueError, match="pre_llm stage only"):
        VisionZipScorer(merge_space="tower").select(
            LayerState(**{**state.__dict__, "layer_idx": 2}), state.vision.cls_attention, [5]
        )
    with pytest.raises(ValueError, match="merge_space"):
        VisionZipScorer(merge_space="llm")
    assert VisionZipScorer(merge_space="tower").vision_request().features
    assert not VisionZipScorer().vision_request().features


@pytest.mark.parametrize("budget, dominant, contextual", [(64, 54, 10), (128, 108, 20), (192, 162, 30)])
def test_presets_are_the_official_llava15_settings(budget, dominant, contextual):
    """54+10 / 108+20 / 162+30 (README; main.py:7): ``dominant`` counts the [CLS] token."""
    method = Method.from_preset(f"visionzip-llava15-{budget}")
    assert method.schedule.pre_llm is not None and method.position_policy == "renumber"
    torch.manual_seed(0)
    n = 576
    state = LayerState(
        layer_idx=-1,
        hidden=torch.randn(1, n, 8),
        vision_idx=torch.arange(n)[None],
        vision_valid=torch.ones(1, n, dtype=torch.bool),
        vision_coords=torch.zeros(1, n, 3, dtype=torch.long),
        orig_idx=torch.arange(n)[None],
        attention_mask=torch.ones(1, n),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
        vision=VisionFeatures(
            cls_attention=torch.rand(1, n), keys=torch.randn(1, n, 4), cls_embeds=[torch.randn(1, 8)]
        ),
    )
    count = method.schedule.kept_count(0, n, n)
    sel = method.scorer.select(state, method.scorer.score(state), [count])
    assert len(sel.keep[0]) + 1 == dominant and len(sel.added_source[0]) - 1 == contextual


def test_cls_attention_is_the_towers_own_attention(tiny):
    """The served [CLS] row equals the eager CLIP tower's attention probabilities at the selection layer, heads
    summed."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 2, "llava")
    inputs = lvlm.prepare(prompts, images)
    from v2drop.scorers import VisionRequest

    state = lvlm.adapter.vision_tower_state(inputs, VisionRequest(keys=True, cls_embeds=True))
    tower = lvlm.model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = (
        len(out.attentions) + lvlm.model.config.vision_feature_layer
    )  # attentions[-2] with hidden_states[-2] (line 43-44)
    expected = out.attentions[layer][:, :, 0, 1:].sum(1)  # clip_encoder.py:51-52
    placeholder = inputs["input_ids"] == lvlm.model.config.image_token_id
    torch.testing.assert_close(state["cls_attention"][placeholder], expected.reshape(-1), atol=1e-6, rtol=0)
    with torch.no_grad():
        cls = lvlm.model.model.multi_modal_projector(out.hidden_states[layer + 1][:, 0])
    torch.testing.assert_close(torch.cat(state["cls_embeds"]), cls, atol=1e-6, rtol=0)


def test_pre_llm_run_on_tiny_llava_follows_the_official_definition(tiny):
    """k = 16: c = round(2.5) = 3 contextual, [CLS] + 12 patches dominant; targets every 51 // 3 = 17th remaining
    token."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 3, "llava")
    inputs = lvlm.prepare(prompts, images)
    method = Method(
        "visionzip", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 16]]}, position_policy="renumber"
    )
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
        assert trace.stages == [
            {"layer": -1, "kept": positions[dominant].tolist(), "merged": positions[[0] + targets].tolist()}
        ]
        assert trace.vision_tokens_per_layer == [16] * lvlm.depth


def test_tower_merge_on_tiny_llava_is_the_official_merge_then_project(tiny):
    """On the engine's real pre-LLM state: each contextual token is the model's projector applied to the tower's
    selection-layer output of the target plus the mean of those of its joined tokens (clip_encoder.py:43, 75-80;
    llava_arch.py:33); the projected-space merge gives other tokens (the projector is an MLP with a GELU)."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 3, "llava")
    inputs = lvlm.prepare(prompts, images)
    scorer = VisionZipScorer(merge_space="tower")
    method = Method(scorer, schedule={"keep_mode": "absolute", "stages": [["pre_llm", 16]]}, position_policy="renumber")
    states = []
    score = scorer.score
    scorer.score = lambda state: states.append(state) or score(state)
    lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    state = states[0]
    scores = score(state)
    counts = [16] * len(prompts)
    tower = VisionZipScorer(merge_space="tower").select(state, scores, counts)
    projected = VisionZipScorer().select(state, scores, counts)
    with torch.no_grad():
        out = lvlm.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[len(out.hidden_states) + lvlm.model.config.vision_feature_layer][:, 1:]
        for b in range(len(prompts)):
            assert tower.keep[b].tolist() == projected.keep[b].tolist()
            targets = tower.added_source[b][1:]
            rest = [i for i in range(64) if i not in set(tower.keep[b].tolist())]
            keys = state.vision.keys[b, rest] / state.vision.keys[b, rest].norm(dim=-1, keepdim=True)
            is_target = torch.tensor([i in set(targets.tolist()) for i in rest])
            assign = (keys[~is_target] @ keys[is_target].T).argmax(1)
            joined = feats[b, rest][~is_target]
            merged = torch.stack(
                [
                    feats[b, t] + joined[assign == j].mean(0) if (assign == j).any() else feats[b, t]
                    for j, t in enumerate(targets.tolist())
                ]
            )
            expected = lvlm.model.model.multi_modal_projector(merged)
            torch.testing.assert_close(tower.added_hidden[b][1:], expected, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(projected.added_hidden[b][1:], expected, atol=1e-3)


def test_official_presets_merge_in_the_tower_space():
    for budget in (64, 128, 192):
        official = Method.from_preset(f"visionzip-official-llava15-{budget}")
        ours = Method.from_preset(f"visionzip-llava15-{budget}")
        assert official.scorer.merge_space == "tower" and ours.scorer.merge_space == "projected"
        assert official.schedule.to_dict() == ours.schedule.to_dict() and official.position_policy == "renumber"
        assert official.scorer.contextual_ratio == ours.scorer.contextual_ratio


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_families_without_a_cls_token_are_refused(tiny, family):
    """Qwen2-VL / 2.5-VL and OneVision (SigLIP) towers have no [CLS]; the official code supports neither."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 1, family)
    method = Method("visionzip", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 4]]})
    with pytest.raises(ValueError, match="no \\[CLS\\] token") as err:
        lvlm.generate(prompts, images, method=method, max_new_tokens=1)
    if family == "llava_onevision":
        assert "official VisionZip code supports LLaVA-1.5 and LLaVA-NeXT only" in str(err.value)


def crop_state():
    """Twelve vision tokens of one LLaVA-NeXT image: crop 0 (base) = tokens 0-4, crop 1 (a tile) = 5, 6, 8, 9, 10,
    image_newline tokens at 7 and 11; token i has hidden (i, 1)."""
    attention = torch.tensor([[0.1, 0.5, 0.3, 0.05, 0.05, 0.2, 0.1, 0.0, 0.6, 0.05, 0.05, 0.0]])
    keys = torch.tensor(
        [
            [
                [1.0, 0.0],
                [0.0, 1.0],
                [0.1, 1.0],
                [0.0, 1.0],
                [1.0, 0.2],
                [1.0, 0.0],
                [1.0, 0.3],
                [0.0, 0.0],
                [1.0, 0.8],
                [0.0, 1.0],
                [0.1, 1.0],
                [0.0, 0.0],
            ]
        ]
    )
    crops = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1, 1, 1, 1, -1]])
    hidden = torch.zeros(1, 14, 2)
    hidden[0, 1:13] = torch.stack([torch.arange(12.0), torch.ones(12)], dim=1)
    return LayerState(
        layer_idx=-1,
        hidden=hidden,
        vision_idx=torch.arange(1, 13)[None],
        vision_valid=torch.ones(1, 12, dtype=torch.bool),
        vision_coords=torch.zeros(1, 12, 3, dtype=torch.long),
        orig_idx=torch.arange(14)[None],
        attention_mask=torch.ones(1, 14),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
        vision=VisionFeatures(
            cls_attention=attention, keys=keys, cls_embeds=[torch.tensor([[100.0, 100.0], [200.0, 200.0]])], crops=crops
        ),
    )


def test_hand_made_anyres_image_is_zipped_per_crop():
    """k = 8 over 2 crops: 4 per crop (the official per-crop dominant + contextual), contextual_ratio 0.5 -> c = 2,
    [CLS] + 1 dominant patch per crop (main.py:7).

    Crop 0: the largest [CLS] attention is token 1 (0.5, clip_encoder.py:51-53); rest 0 2 3 4, step 4 // 2 = 2,
    targets 0 and 3 (line 67-68); 2 (.1, 1) joins 3 (0, 1) and 4 (1, .2) joins 0 (1, 0) (line 72-74): contextual
    h0 + h4 = (4, 2) and h3 + h2 = (5, 2) (line 75-80). Crop 1: token 8 (0.6); rest 5 6 9 10, targets 5 and 9;
    6 (1, .3) joins 5, 10 (.1, 1) joins 9: (11, 2) and (19, 2). The newline tokens 7 and 11 are dropped
    (llava_arch.py:67). Added: both [CLS] (line 77), then the contextual tokens crop by crop (line 76, 79).
    """
    state = crop_state()
    sel = VisionZipScorer(contextual_ratio=0.5).select(state, VisionZipScorer().score(state), [8])
    assert sel.keep[0].tolist() == [1, 8]
    assert sel.added_source[0].tolist() == [0, 5, 0, 3, 5, 9]
    torch.testing.assert_close(
        sel.added_hidden[0],
        torch.tensor([[100.0, 100.0], [200.0, 200.0], [4.0, 2.0], [5.0, 2.0], [11.0, 2.0], [19.0, 2.0]]),
    )


def test_uneven_share_gives_the_first_crop_one_more():
    """k = 7: crop 0 keeps 4 (as above), crop 1 keeps 3: c = round(1.5) = 2, its [CLS], no dominant patch;
    rest 5 6 8 9 10, step 5 // 2 = 2, targets 5 and 8 (1, .8); 6 (1, .3) joins 5 (cosines .958 vs .927), 9 (0, 1)
    and 10 (.1, 1) join 8: h5 + h6 = (11, 2) and h8 + mean(h9, h10) = (17.5, 2)."""
    state = crop_state()
    sel = VisionZipScorer(contextual_ratio=0.5).select(state, VisionZipScorer().score(state), [7])
    assert sel.keep[0].tolist() == [1]
    assert sel.added_source[0].tolist() == [0, 5, 0, 3, 5, 8]
    torch.testing.assert_close(sel.added_hidden[0][-2:], torch.tensor([[11.0, 2.0], [17.5, 2.0]]))


def next_batch(lvlm):
    """Four images of different sizes: 2 or 3 crops each, some tiles unpadded (fewer rows or columns)."""
    sizes = [(32, 32), (64, 40), (40, 64), (48, 32)]
    return [prompt_for(lvlm, "how many ?") for _ in sizes], [photo(i, w, h) for i, (w, h) in enumerate(sizes)]


def test_next_serves_each_crops_own_cls_attention_on_its_tokens(tiny):
    """A 32x32 image is the base crop (64 tokens) plus one 8x8 tile laid out row by row with a newline after each
    row: the served [CLS] attention, crop numbers and [CLS] features are the eager tower's, crop by crop."""
    lvlm = tiny("llava_next", "eager")
    prompts, images = next_batch(lvlm)
    inputs = lvlm.prepare(prompts[:1], images[:1])
    from v2drop.scorers import VisionRequest

    state = lvlm.adapter.vision_tower_state(inputs, VisionRequest(keys=True, cls_embeds=True))
    with torch.no_grad():
        out = lvlm.model.model.vision_tower(
            inputs["pixel_values"][0, :2], output_attentions=True, output_hidden_states=True
        )
    layer = len(out.attentions) + lvlm.model.config.vision_feature_layer
    expected = out.attentions[layer][:, :, 0, 1:].sum(1)  # (2 crops, 64) clip_encoder.py:51-52
    placeholder = (inputs["input_ids"][0] == lvlm.model.config.image_token_id).nonzero().flatten()
    assert len(placeholder) == 64 + 8 * 9
    base, tile = placeholder[:64], placeholder[64:].view(8, 9)
    served, crops = state["cls_attention"][0], state["crops"][0]
    torch.testing.assert_close(served[base], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(served[tile[:, :8].flatten()], expected[1], atol=1e-6, rtol=0)
    assert (
        crops[base].tolist() == [0] * 64
        and crops[tile[:, :8]].flatten().tolist() == [1] * 64
        and crops[tile[:, 8]].tolist() == [-1] * 8
    )
    with torch.no_grad():
        cls = lvlm.model.model.multi_modal_projector(out.hidden_states[layer + 1][:, 0])
    torch.testing.assert_close(state["cls_embeds"][0], cls, atol=1e-6, rtol=0)


def test_next_runs_per_crop_and_a_batch_keeps_what_each_image_keeps_alone(tiny):
    """k = 40 on images of 2 or 3 crops: every crop keeps its share, newlines go, and batched == alone."""
    lvlm = tiny("llava_next")
    prompts, images = next_batch(lvlm)
    method = Method(
        "visionzip", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 40]]}, position_policy="renumber"
    )
    out = lvlm.generate(prompts, images, method=method, max_new_tokens=2, stop_at_eos=False)
    inputs = lvlm.prepare(prompts, images)
    newline = lvlm.model.model.image_newline
    with torch.no_grad():
        embeds = lvlm.adapter.embed(inputs)
    for b, trace in enumerate(out.traces):
        crops = 2 if b == 0 else 3
        (stage,) = trace.stages
        assert len(stage["kept"]) + len(stage["merged"]) == 40 and trace.vision_tokens_per_layer == [40] * lvlm.depth
        per_crop = [40 // crops + (1 if i < 40 % crops else 0) for i in range(crops)]
        contextual = [round(k * 10 / 64) for k in per_crop]
        assert len(stage["merged"]) == crops + sum(contextual)  # one [CLS] per crop, then the contextual tokens
        first = inputs["attention_mask"][b].tolist().index(1)
        kept = embeds[b, first:][stage["kept"]]
        assert not any(torch.equal(row, newline.to(row.dtype)) for row in kept)  # no image_newline token stays
        alone = lvlm.generate([prompts[b]], [images[b]], method=method, max_new_tokens=2, stop_at_eos=False)
        assert alone.traces[0].stages == trace.stages and alone.generated_ids[0] == out.generated_ids[b]


def test_real_next_geometry_keeps_the_official_per_crop_counts():
    """LLaVA-v1.6 geometry (336px CLIP/14, anyres): a 500x300 photo is the base image plus two unpadded tiles.
    k = 3 · 64 gives every crop the official 54 + 10 (main.py:7 per crop): 53 dominant patches, its [CLS] and
    10 contextual tokens, so 159 kept and 33 added; no newline token stays."""
    from v2drop.scorers import VisionRequest
    from v2drop.testing import build_real

    lvlm = build_real("llava_next")
    inputs = lvlm.prepare([prompt_for(lvlm, "how many ?")], [photo(0, 500, 300)])
    state = lvlm.adapter.vision_tower_state(inputs, VisionRequest(keys=True, cls_embeds=True))
    crops = state["crops"][0][inputs["input_ids"][0] == lvlm.model.config.image_token_id]
    assert len(state["cls_embeds"][0]) == 3 and int((crops == 0).sum()) == 576
    assert 0 < int((crops == 1).sum()) == int((crops == 2).sum()) < 576  # the tiles lost their padding rows or columns
    method = Method(
        "visionzip", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 3 * 64]]}, position_policy="renumber"
    )
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    (stage,) = out.traces[0].stages
    assert len(stage["kept"]) == 3 * 53 and len(stage["merged"]) == 3 * 11
    newline_positions = set(((crops == -1).nonzero().flatten()).tolist())
    image_positions = (inputs["input_ids"][0] == lvlm.model.config.image_token_id).nonzero().flatten().tolist()
    assert not {image_positions[i] for i in newline_positions} & set(stage["kept"])


def test_runs_on_the_bundled_proxy():
    """The proxy is a LLaVA with a CLIP tower: it has a [CLS] token, so VisionZip runs on it."""
    lvlm = v2drop.load("proxy")
    assert (
        lvlm.model.config.vision_feature_select_strategy == "default"
    )  # the tower's [CLS] exists and is dropped by HF
    sample = get_benchmark("digits").load("test", 1)[0]
    out = lvlm.generate(
        [lvlm.format_prompt(sample.question)], [list(sample.images)], method="visionzip-llava15-64", max_new_tokens=2
    )
    trace = out.traces[0]
    assert len(trace.stages[0]["kept"]) == 53 and len(trace.stages[0]["merged"]) == 11
    assert trace.vision_tokens_per_layer == [64] * lvlm.depth


# The official sequence order (dvlab-research/VisionZip@3151f6df4fca36a4cd1c985e5956e725b1f9ad02): clip_encoder.py
# lines 54-57 keeps [CLS] and the top-k patches with a boolean mask and ``masked_select``, which reads them in index
# order ([CLS] first, then the dominant patches by index, not by score); line 83 appends the contextual tokens in
# target order; llava_arch.py line 33 projects that, and LLaVA's prepare_inputs_labels_for_multimodal puts it at the
# image placeholder with contiguous positions (position_ids = arange). LLaVA-NeXT: the base crop's [CLS], dominant,
# contextual tokens (line 110, 121), then the tiles' dominant patches in raster order, every tile's [CLS], every tile's
# contextual tokens (restore_image_features_sorted, lines 75-79).


def test_official_order_on_hand_made_tokens():
    """k = 5 as in test_hand_made_kept_and_merged_tokens; the sequence t0 v0..v7 t9 becomes
    t0, [CLS] (100, 100), v1 (1, 1), v5 (5, 1), (4, 2), (9, 2), t9: [CLS] before the image's first patch, the dominant
    patches in index order, the contextual tokens in target order; kept_first puts [CLS] after v5."""
    from v2drop.engine.loop import SampleTrace
    from v2drop.engine.sequence import Sequence
    from v2drop.engine.stages import apply_selection

    state = hand_state()
    scores = VisionZipScorer().score(state)
    sequences = {}
    for order in ("official", "kept_first"):
        sel = VisionZipScorer(contextual_ratio=0.4, order=order).select(state, scores, [5])
        assert sel.keep[0].tolist() == [1, 5] and sel.added_source[0].tolist() == [0, 0, 4]
        vision = torch.zeros(1, 10, dtype=torch.bool)
        vision[0, 1:9] = True
        seq = Sequence(
            state.hidden.clone(), torch.arange(10)[None], torch.ones(1, 10, dtype=torch.long), torch.arange(10)[None],
            vision, torch.zeros(1, 10, 3, dtype=torch.long), torch.full((1, 10), -1),
        )  # fmt: skip
        sequences[order] = apply_selection(seq, sel, state.vision_idx, -1, [SampleTrace()]).renumbered()
    official = sequences["official"]
    expected = torch.tensor([[0.0, 0.0], [100.0, 100.0], [1.0, 1.0], [5.0, 1.0], [4.0, 2.0], [9.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(official.hidden[0], expected)
    assert official.position_ids[0].tolist() == list(range(7))
    assert official.orig_idx[0].tolist() == [0, 1, 2, 6, 1, 5, 9]  # [CLS] and targets in their sources' names
    assert sequences["kept_first"].orig_idx[0].tolist() == [0, 2, 6, 1, 1, 5, 9]
    torch.testing.assert_close(sequences["kept_first"].hidden[0, 3], torch.tensor([100.0, 100.0]))


def test_official_order_on_hand_made_anyres_image():
    """k = 8 as in test_hand_made_anyres_image_is_zipped_per_crop, official order: base [CLS] (before token 0),
    dominant 1, base contextual (4, 2) and (5, 2) (right after the base crop, token 4), the tile's dominant 8, then the
    tile's [CLS] and its contextual (11, 2) and (19, 2) after the image's last token (llava_arch.py:79)."""
    state = crop_state()
    sel = VisionZipScorer(contextual_ratio=0.5, order="official").select(state, VisionZipScorer().score(state), [8])
    assert sel.keep[0].tolist() == [1, 8]
    assert sel.added_source[0].tolist() == [0, 0, 3, 5, 5, 9]
    assert sel.added_place[0].tolist() == [0, 5, 5, 12, 12, 12]
    torch.testing.assert_close(
        sel.added_hidden[0],
        torch.tensor([[100.0, 100.0], [4.0, 2.0], [5.0, 2.0], [200.0, 200.0], [11.0, 2.0], [19.0, 2.0]]),
    )


def test_presets_use_the_official_order():
    for budget in (64, 128, 192):
        assert Method.from_preset(f"visionzip-official-llava15-{budget}").scorer.order == "official"
        assert Method.from_preset(f"visionzip-llava15-{budget}").scorer.order == "kept_first"
    with pytest.raises(ValueError, match="order must be 'kept_first' or 'official'"):
        VisionZipScorer(order="score")


@torch.no_grad()
def official_first_logits(lvlm, inputs, b: int, dominant: int, contextual: int) -> torch.Tensor:
    """Sample ``b``'s first logits from the official VisionZip sequence, built by hand: clip_encoder.py:43-83
    transcribed on the eager tower, the model's projector (llava_arch.py:33), the features at the placeholder of the
    unpadded prompt, contiguous positions."""
    cfg = lvlm.model.config
    tower = lvlm.model.model.vision_tower
    out = tower(inputs["pixel_values"][b : b + 1], output_attentions=True, output_hidden_states=True)
    layer = len(out.attentions) + cfg.vision_feature_layer  # attentions[-2] with hidden_states[-2] (line 43-44)
    hidden = out.hidden_states[layer + 1][0]  # (1 + P, C)
    enc = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers[layer]
    metric = enc.self_attn.k_proj(enc.layer_norm1(out.hidden_states[layer][0]))
    metric = metric.view(len(hidden), cfg.vision_config.num_attention_heads, -1).mean(1)  # utils.py:89
    top = out.attentions[layer][0, :, 0, 1:].sum(0).topk(dominant - 1).indices + 1  # line 51-53
    mask = torch.ones(len(hidden), dtype=torch.bool)
    mask[0], mask[top] = False, False
    kept = hidden[~mask]  # masked_select: [CLS], then the dominant patches by index (line 56-57)
    rest, keys = hidden[mask], metric[mask] / metric[mask].norm(dim=-1, keepdim=True)
    targets = torch.arange(0, len(rest), len(rest) // contextual)[:contextual]  # line 67-68
    others = ~torch.isin(torch.arange(len(rest)), targets)
    assign = (keys[others] @ keys[targets].T).argmax(1)  # line 72-74
    joined = [rest[others][assign == j].sum(0) / max(1, int((assign == j).sum())) for j in range(contextual)]
    features = lvlm.model.model.multi_modal_projector(torch.cat([kept, rest[targets] + torch.stack(joined)]))
    ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
    placeholder = (ids == cfg.image_token_id).nonzero().flatten()
    embeds = lvlm.model.get_input_embeddings()(ids)
    sequence = torch.cat([embeds[: placeholder[0]], features.to(embeds.dtype), embeds[placeholder[-1] + 1 :]])[None]
    text = lvlm.model.model.language_model(inputs_embeds=sequence, position_ids=torch.arange(sequence.shape[1])[None])
    return lvlm.model.lm_head(text.last_hidden_state[0, -1]).float()


def test_official_order_on_tiny_llava_equals_the_official_sequence(tiny):
    """k = 16 (c = 3, [CLS] + 12 patches), merge_space tower, order official, a padded batch of three: each sample's
    first logits equal the LLM run by hand on the official sequence (official_first_logits); kept_first gives other
    logits."""
    lvlm = tiny("llava", "eager")
    inputs = lvlm.prepare(*batch_for(lvlm, 3, "llava"))
    logits = {}
    for order in ("official", "kept_first"):
        method = Method(
            VisionZipScorer(merge_space="tower", order=order),
            schedule={"keep_mode": "absolute", "stages": [["pre_llm", 16]]},
            position_policy="renumber",
        )
        logits[order] = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False).first_logits
    for b in range(3):
        expected = official_first_logits(lvlm, inputs, b, dominant=13, contextual=3)
        torch.testing.assert_close(logits["official"][b], expected, atol=1e-5, rtol=0)
        assert not torch.allclose(logits["kept_first"][b], expected, atol=1e-4)


def test_bad_added_places_are_refused():
    from v2drop.engine.loop import SampleTrace
    from v2drop.engine.sequence import Sequence
    from v2drop.engine.stages import apply_selection
    from v2drop.scorers.base import Selection

    state = hand_state()
    vision = torch.zeros(1, 10, dtype=torch.bool)
    vision[0, 1:9] = True
    seq = Sequence(
        state.hidden.clone(), torch.arange(10)[None], torch.ones(1, 10, dtype=torch.long), torch.arange(10)[None],
        vision, torch.zeros(1, 10, 3, dtype=torch.long), torch.full((1, 10), -1),
    )  # fmt: skip
    added = {"keep": [torch.tensor([1])], "added_hidden": [torch.ones(1, 2)], "added_source": [torch.tensor([0])]}
    with pytest.raises(ValueError, match="each -1 .. 8"):
        apply_selection(seq, Selection(**added, added_place=[torch.tensor([9])]), state.vision_idx, -1, [SampleTrace()])
    with pytest.raises(ValueError, match="not both"):
        both = Selection(**added, added_place=[torch.tensor([0])], added_at_source=True)
        apply_selection(seq, both, state.vision_idx, -1, [SampleTrace()])
    after_kept = Selection(**added, added_place=[torch.tensor([-1])])
    new = apply_selection(seq, after_kept, state.vision_idx, -1, [SampleTrace()])
    assert new.orig_idx[0].tolist() == [0, 2, 1, 9]  # -1: right after the last kept vision token


def test_official_preset_on_the_bundled_proxy_is_the_official_sequence():
    """visionzip-official-llava15-64 on the proxy (a LLaVA with a CLIP tower, 576 patches): 54 + 10 tokens whose
    first logits equal the LLM run by hand on the official sequence (official_first_logits)."""
    lvlm = v2drop.load("proxy", attn_implementation="eager")
    sample = get_benchmark("digits").load("test", 1)[0]
    inputs = lvlm.prepare([lvlm.format_prompt(sample.question)], [list(sample.images)])
    out = lvlm.generate_from_inputs(inputs, Method.from_preset("visionzip-official-llava15-64"), max_new_tokens=1)
    assert out.traces[0].vision_tokens_per_layer == [64] * lvlm.depth
    expected = official_first_logits(lvlm, inputs, 0, dominant=54, contextual=10)
    torch.testing.assert_close(out.first_logits[0], expected, atol=1e-5, rtol=0)
