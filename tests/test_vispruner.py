"""VisPruner: important tokens by the tower's [CLS] attention, diverse ones by iterative de-duplication.

Official definition: Theia-4869/VisPruner, llava/model/llava_arch.py ``encode_images`` (lines 141-186): the [CLS] row
of the selection layer's attention, head-averaged (line 154), sorted descending (line 155); the first
``int(T · important_ratio)`` are important (lines 150, 156), the rest are the residual list (line 157); each round
(lines 161-176) takes ``r = min(8, R − T_div)``, scores the residual's even-place tokens by their largest cosine
similarity to an odd-place one (lines 168-170), drops the r highest, and continues with the rest of the even-place
tokens in descending score order followed by the odd-place ones (lines 172-176). clip_encoder.py ``feature_select``
(lines 35-52): the features are the selection layer's patch outputs, before the projector.
"""

import pytest
import torch
from prellm_helpers import check_preset, check_proxy_run, kept_by, pre_llm_run, prellm_state

from v2drop.scorers import VisionFeatures, VisionRequest
from v2drop.scorers.vispruner import VisPrunerScorer, remove_duplicates
from v2drop.testing import batch_for

ATTENTION = torch.tensor([[0.05, 0.30, 0.02, 0.20, 0.01, 0.25, 0.04, 0.13]])
# token:            0            1           2           3           4           5           6           7
FEATURES = torch.tensor(
    [[[-1.0, 0.0], [5.0, 5.0], [1.0, 0.2], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0], [1.0, 0.0], [0.0, 1.0]]]
)


def hand_state(images=None):
    """Eight vision tokens (prompt positions 1..8) of one image between two text tokens."""
    coords = torch.zeros(1, 8, 3, dtype=torch.long)
    if images is not None:
        coords[0, :, 0] = torch.tensor(images)
    vision = VisionFeatures(cls_attention=ATTENTION, features=FEATURES)
    return prellm_state(torch.zeros(1, 10, 2), 8, coords, vision)


def kept(k, ratio=0.5, images=None):
    return kept_by(VisPrunerScorer(important_ratio=ratio), hand_state(images), k)


def test_hand_made_kept_set():
    """k = 5, ratio 0.5: int(2.5) = 2 important, 3 diverse (lines 150-151).

    [CLS] order (line 155): 1 (.30), 5 (.25), 3 (.20), 7 (.13), 0 (.05), 6 (.04), 2 (.02), 4 (.01): important 1, 5;
    residual 3 7 0 6 2 4 (R = 6), r = min(8, 6 − 3) = 3 (line 163). Even places 3 0 2, odd places 7 6 4 (line 168);
    largest cosine to an odd one: 3 (0,1) -> 1 (token 7), 0 (−1,0) -> 0 (token 7), 2 (1,.2) -> .981 (token 6); the
    three highest go, so the residual is 7 6 4 = 3 tokens and the loop ends. Kept: 1 4 5 6 7.
    """
    assert kept(5) == [1, 4, 5, 6, 7]


def test_hand_made_round_keeps_the_least_duplicated_even_tokens():
    """k = 6: 3 important (1, 5, 3); residual 7 0 6 2 4, T_div 3, r = min(8, 2) = 2. Even places 7 6 4, odd 0 2:
    7 (0,1) -> .196 (token 2), 6 (1,0) -> .981 (token 2), 4 (1,1) -> .832 (token 2): 6 and 4 go; residual 7 0 2.
    (R = 5 is odd here: the official index broadcast at line 174 only holds for an even R, which 576-token images
    with the preset budgets always have; the remaining even-place tokens are kept, as the definition says.)"""
    assert kept(6) == [0, 1, 2, 3, 5, 7]


def test_ratio_one_keeps_the_top_cls_attention_and_zero_only_diverse():
    assert kept(3, ratio=1.0) == [1, 3, 5]
    residual = torch.sort(ATTENTION[0], descending=True, stable=True).indices
    assert kept(3, ratio=0.0) == sorted(remove_duplicates(FEATURES[0], residual, 3).tolist())


def test_each_image_is_pruned_alone_with_an_equal_share():
    """Two images (tokens 0-3 and 4-7), k = 4: two per image, each 1 important + 1 diverse. Image 0: [CLS] order
    1 3 0 2, important 1, residual 3 0 2, r = min(8, 2) = 2, even places 3 2 score 0 and −.196 against 0: both go,
    keep 0. Image 1: order 5 7 6 4, important 5, residual 7 6 4, even places 7 4 against 6: 0 and .707, both go, 6."""
    assert kept(4, images=[0, 0, 0, 0, 1, 1, 1, 1]) == [0, 1, 5, 6]


def test_served_features_are_the_towers_selection_layer_outputs(tiny):
    """The served features are hidden_states[vision_feature_layer][:, 1:] of the CLIP tower (clip_encoder.py:37-40)."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 2, "llava")
    inputs = lvlm.prepare(prompts, images)
    state = lvlm.adapter.vision_tower_state(inputs, VisionRequest(features=True))
    with torch.no_grad():
        out = lvlm.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    expected = out.hidden_states[lvlm.model.config.vision_feature_layer][:, 1:]
    placeholder = inputs["input_ids"] == lvlm.model.config.image_token_id
    torch.testing.assert_close(state["features"][placeholder], expected.reshape(-1, expected.shape[-1]).float())


def test_pre_llm_run_on_tiny_llava_follows_the_definition(tiny):
    """k = 16 per image on the tiny LLaVA (64 patches): the kept set is keep_in_group on the tower's own outputs."""
    lvlm = tiny("llava", "eager")
    inputs, out = pre_llm_run(lvlm, "llava", "vispruner", 16)
    with torch.no_grad():
        tower = lvlm.model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = lvlm.model.config.vision_feature_layer
    cls = tower.attentions[layer][:, :, 0, 1:].mean(1)  # line 154
    feats = tower.hidden_states[layer][:, 1:]
    for b, trace in enumerate(out.traces):
        first = inputs["attention_mask"][b].tolist().index(1)
        positions = (inputs["input_ids"][b] == lvlm.model.config.image_token_id).nonzero().flatten() - first
        expected = VisPrunerScorer().keep_in_group(feats[b], cls[b], 16).sort().values
        assert trace.stages == [{"layer": -1, "kept": positions[expected].tolist()}]
        assert trace.vision_tokens_per_layer == [16] * lvlm.depth


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets_keep_their_budget(budget):
    assert check_preset("vispruner", budget).scorer.important_ratio == 0.5


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_runs_on_the_bundled_proxy(budget):
    check_proxy_run("vispruner", budget)


def official_steps(features, attention, T, ratio):
    """The official encode_images steps (lines 148-183) for one 576-token image, written out with a batch of one."""
    important_num = int(T * ratio)
    diverse_num = T - important_num
    order = attention.argsort(descending=True)
    important, residual = order[:important_num], order[important_num:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse_num > 0:
        R = len(residual)
        r = min(8, R - diverse_num)
        if r <= 0:
            break
        a, b = unit[residual[::2]], unit[residual[1::2]]
        best = (a @ b.T).max(dim=-1).values
        distinct = best.argsort(descending=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    chosen = torch.cat([important, residual]) if diverse_num > 0 else important
    return sorted(chosen.tolist())


@pytest.mark.parametrize("T, ratio", [(192, 0.5), (128, 0.5), (64, 0.5), (64, 0.75), (100, 0.3)])
def test_matches_the_official_steps_on_a_576_token_image(T, ratio):
    """Random (tie-free) attention and features of a 24 × 24 image: the same kept set as the official steps."""
    torch.manual_seed(T)
    features, attention = torch.randn(576, 32), torch.rand(576)
    assert sorted(VisPrunerScorer(important_ratio=ratio).keep_in_group(features, attention, T).tolist()) == (
        official_steps(features, attention, T, ratio)
    )
