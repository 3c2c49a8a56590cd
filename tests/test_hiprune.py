"""HiPrune: anchors by a middle tower layer's attention, their grid neighbours as buffers, registers by a deep layer.

Official definition: Danielement321/HiPrune, LLaVA/llava/model/llava_arch.py ``encode_images`` (lines 140-180): the
received ("global") attention of a layer is its attention map averaged over heads and then over query tokens, patch
columns (lines 147, 151); the deep layer is ``mm_vision_select_layer`` (line 145), the object layer
``HIPRUNE_OBJECT_LAYER`` (line 149, ``attentions[l - 1]``); ``round(T · alpha / 5)`` anchors by ``topk`` (lines 152,
156); buffers: each anchor ± 1 and ± 24 on the flattened 24 × 24 grid, clamped to [0, 575] (lines 157-162); the rest by
the deep attention minus 1 on the chosen ones, ``topk`` of ``T − |anchors ∪ buffers|`` (lines 163-170).
"""

import pytest
import torch
from prellm_helpers import check_preset, check_proxy_run, kept_by, pre_llm_run, prellm_state

from v2drop.scorers import VisionFeatures, VisionRequest
from v2drop.scorers.hiprune import HiPruneScorer, hiprune_keep
from v2drop.testing import batch_for


def grid_state(shallow, deep, object_layer=0.375):
    """Sixteen vision tokens of one 4 × 4 image (prompt positions 1..16) between two text tokens."""
    coords = torch.zeros(1, 16, 3, dtype=torch.long)
    coords[0, :, 1] = torch.arange(16) // 4
    coords[0, :, 2] = torch.arange(16) % 4
    vision = VisionFeatures(cls_attention=torch.zeros(1, 16), received={object_layer: shallow[None], None: deep[None]})
    return prellm_state(torch.zeros(1, 18, 2), 16, coords, vision)


DEEP = torch.tensor([0.1, 0.2, 0.3, 0.05, 0.04, 0.9, 0.02, 0.01, 0.3, 0.06, 0.07, 0.08, 0.03, 0.02, 0.01, 0.5])


def kept(anchor, k, alpha=1.0):
    shallow = torch.full((16,), 0.01)
    shallow[anchor] = 0.5
    return kept_by(HiPruneScorer(alpha=alpha), grid_state(shallow, DEEP), k)


def test_hand_made_anchor_buffers_and_registers():
    """k = 6, alpha 1: round(6 / 5) = 1 anchor (line 152), token 6 (row 1, column 2); buffers 5, 7, 2, 10 (± 1, ± 4);
    one register (6 − 5): the largest deep attention outside them, token 15 (.5; token 5's .9 is taken)."""
    assert kept(6, 6) == [2, 5, 6, 7, 10, 15]


def test_buffers_follow_the_flat_index_wrapping_rows_and_clamped_at_the_ends():
    """Anchor 3 (a row's last token): +1 is 4 (the next row's first, flat arithmetic as official), −4 is −1 -> 0
    (clamped, line 162); {3, 2, 4, 0, 7}; one register: 5 (.9)."""
    assert kept(3, 6) == [0, 2, 3, 4, 5, 7]


def test_anchors_and_buffers_beyond_k_are_cut_in_concatenation_order():
    """k = 3: the anchor then its −1 and +1 neighbours (the order of line 157's cat), no register."""
    assert kept(6, 3, alpha=1.0) == [5, 6, 7]


def test_no_anchor_keeps_the_deep_attention_top_k():
    """alpha 0: round(0) anchors; the k largest deep attentions: 5 (.9), 15 (.5), 2 and 8 (.3 each, lower index)."""
    assert kept(6, 4, alpha=0.0) == [2, 5, 8, 15]
    assert hiprune_keep(torch.zeros(16), DEEP, 4, 0.0, 4).tolist() == [2, 5, 8, 15]


def test_served_received_attention_is_the_towers_head_and_query_mean(tiny):
    """Layer 1 and the selection layer of the eager CLIP tower: attentions[l - 1].mean(heads).mean(queries)[:, 1:]."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 2, "llava")
    inputs = lvlm.prepare(prompts, images)
    state = lvlm.adapter.vision_tower_state(inputs, VisionRequest(received_layers=(1, None)))
    with torch.no_grad():
        out = lvlm.model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    placeholder = inputs["input_ids"] == lvlm.model.config.image_token_id
    for served, attn in zip(
        state["received"], [out.attentions[0], out.attentions[lvlm.model.config.vision_feature_layer]]
    ):
        expected = attn.mean(1).mean(1)[:, 1:]
        torch.testing.assert_close(served[placeholder], expected.reshape(-1), atol=1e-6, rtol=0)


def test_a_share_of_the_depth_names_a_rounded_layer(tiny):
    """object_layer 0.375 of a 24-layer tower is layer 9; of the tiny 2-layer tower, round(0.75) = layer 1."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 1, "llava")
    inputs = lvlm.prepare(prompts, images)
    by_share = lvlm.adapter.vision_tower_state(inputs, VisionRequest(received_layers=(0.375,)))["received"][0]
    by_number = lvlm.adapter.vision_tower_state(inputs, VisionRequest(received_layers=(1,)))["received"][0]
    torch.testing.assert_close(by_share, by_number)


@pytest.mark.parametrize("bad", [0, 1.5, "9", True])
def test_bad_object_layer_is_refused(bad):
    with pytest.raises(ValueError, match="object_layer"):
        HiPruneScorer(object_layer=bad)


def test_pre_llm_run_on_tiny_llava_follows_the_definition(tiny):
    """k = 16 per image on the tiny LLaVA (8 × 8 patches): hiprune_keep on the tower's own received attention."""
    lvlm = tiny("llava", "eager")
    inputs, out = pre_llm_run(lvlm, "llava", "hiprune", 16, alpha=0.5)
    with torch.no_grad():
        attn = lvlm.model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    shallow = attn[0].mean(1).mean(1)[:, 1:]
    deep = attn[lvlm.model.config.vision_feature_layer].mean(1).mean(1)[:, 1:]
    for b, trace in enumerate(out.traces):
        first = inputs["attention_mask"][b].tolist().index(1)
        positions = (inputs["input_ids"][b] == lvlm.model.config.image_token_id).nonzero().flatten() - first
        expected = hiprune_keep(shallow[b], deep[b], 16, 0.5, 8)  # round(16 · .5 / 5) = 2 anchors
        assert trace.stages == [{"layer": -1, "kept": positions[expected].tolist()}]
        assert trace.vision_tokens_per_layer == [16] * lvlm.depth


@pytest.mark.parametrize("budget, anchors", [(192, 4), (128, 3), (64, 1)])
def test_presets_keep_their_budget(budget, anchors):
    method = check_preset("hiprune", budget)
    assert method.scorer.alpha == 0.1 and round(0.375 * 24) == 9
    assert round(budget * method.scorer.alpha / 5) == anchors


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_runs_on_the_bundled_proxy(budget):
    check_proxy_run("hiprune", budget)


def official_steps(shallow, deep, T, alpha):
    """The official encode_images steps (lines 152-170) for one 576-token image, written out for a batch of one."""
    anchors = torch.topk(shallow[None], k=round(T * alpha / 5), dim=1)[1]
    near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - 24, anchors + 24], dim=1).clamp(0, 575)
    near = torch.unique(near, sorted=False)[None]
    mask = torch.zeros(1, 576, dtype=torch.bool)
    mask.scatter_(1, near, True)
    rest = torch.topk((deep - mask.int().squeeze())[None], k=T - near.shape[1], dim=1)[1]
    return sorted(torch.cat([near, rest], dim=1)[0].tolist())


@pytest.mark.parametrize("T, alpha", [(192, 0.1), (128, 0.1), (64, 0.1), (64, 0.5), (300, 0.2)])
def test_matches_the_official_steps_on_a_576_token_image(T, alpha):
    """Random (tie-free) attention of a 24 × 24 image: the same kept set as the official steps."""
    torch.manual_seed(T)
    shallow, deep = torch.rand(576), torch.rand(576) / 10  # received attention: below 1, as official assumes
    assert hiprune_keep(shallow, deep, T, alpha, 24).tolist() == official_steps(shallow, deep, T, alpha)
