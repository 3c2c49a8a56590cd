"""HoloV: the budget spread over consecutive crops by their scores, each crop keeping its top [CLS] attention.

Official definition: obananas/HoloV@1d2e65e961e698ff0e7d5bb4625489177dd9deba, llava/model/utils.py ``HoloV`` (lines
22-151): N tokens cut into ``num_patches`` consecutive runs, the first ``N % num_patches`` one longer (lines 32-50);
a run's score is the mean of ``1e3·a + 0.09 · var · mean|1e3·a| / (mean|var| + 1e-6)`` with ``var`` the variance of
a token's masked cosine similarities, both sums over ``m − 1`` (lines 64-92; a run of one token scores its
attention, line 61); weights ``s / (Σ s + 1e-6)``, ``floor(w · k)`` each, the remainder one each to the largest
weights (lines 97-107); a run allotted more than it holds keeps all (lines 112-115), else its top-attention tokens
(lines 117-120). llava_arch.py line 239: 16 runs, on the projected features with the head-mean [CLS] attention.
"""

import pytest
import torch
from prellm_helpers import check_preset, check_proxy_run, kept_by, pre_llm_run, prellm_state

from v2drop.scorers import VisionFeatures, VisionRequest
from v2drop.scorers.holov import HoloVScorer, allocate, crop_score, crop_sizes

# Two crops of four: crop A (tokens 0-3) orthogonal features, crop B (tokens 4-7) one repeated feature.
ATTENTION = torch.tensor([[0.4, 0.03, 0.3, 0.02, 0.1, 0.09, 0.09, 0.09]])
FEATURES = torch.cat([torch.eye(4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, -1)])
FACTOR = 1 + 0.09 * (1 / 3) / (1 / 3 + 1e-6)  # crop B: every token's similarity variance is 1/3 (the masked diagonal)


def hand_state(images=None):
    """Eight vision tokens (prompt positions 1..8) between two text tokens; hidden states = FEATURES."""
    coords = torch.zeros(1, 8, 3, dtype=torch.long)
    if images is not None:
        coords[0, :, 0] = torch.tensor(images)
    hidden = torch.cat([torch.zeros(1, 4), FEATURES, torch.zeros(1, 4)])[None]
    return prellm_state(hidden, 8, coords, VisionFeatures(cls_attention=ATTENTION))


def kept(k, crops=2, images=None):
    return kept_by(HoloVScorer(crops=crops), hand_state(images), k)


def test_crop_sizes():
    assert crop_sizes(10, 4) == [3, 3, 2, 2]
    assert crop_sizes(576, 16) == [36] * 16
    assert crop_sizes(3, 5) == [1, 1, 1]


def test_crop_scores():
    """Orthogonal tokens: similarities and their variance are 0, so the score is 1e3 · mean attention. Identical
    tokens (m = 4): masked similarities 0 1 1 1, mean 1, variance (1 + 0) / 3 = 1/3 for every token, scaled to
    mean|1e3·a| / (1/3 + 1e-6) · 1/3, so the score is 1e3 · mean a · (1 + .09 · (1/3) / (1/3 + 1e-6))."""
    a, b = ATTENTION[0, :4], ATTENTION[0, 4:]
    torch.testing.assert_close(crop_score(FEATURES[:4], a, 0.09), torch.tensor(187.5))
    torch.testing.assert_close(crop_score(FEATURES[4:], b, 0.09), torch.tensor(92.5 * FACTOR))
    torch.testing.assert_close(crop_score(FEATURES[4:], b, 0.0), torch.tensor(92.5))
    torch.testing.assert_close(crop_score(FEATURES[:1], a[:1], 0.09), torch.tensor(0.4))  # one token: its attention


def test_allocation():
    """Scores 187.5 and 100.8: weights .650 and .350; k = 4: floors 2 and 1, the one left to A (3, 1). k = 7: floors
    4 and 2, one more to A gives 5 > 4, so A keeps its 4 and the overflow goes to B (3)."""
    scores = torch.tensor([187.5, 92.5 * FACTOR])
    assert allocate(scores, [4, 4], 4) == [3, 1]
    assert allocate(scores, [4, 4], 7) == [4, 3]
    assert allocate(scores, [4, 4], 9) == [4, 4]
    assert allocate(torch.zeros(3), [2, 2, 2], 2) == [1, 1, 0]  # all weights 0: one each to the first ones


def test_hand_made_kept_set():
    """k = 4: crop A keeps 3 (0: .4, 2: .3, 1: .03), crop B 1 (4: .1). The top-4 [CLS] attention overall would be
    0 2 4 5: the budget spread over the crops keeps a token of A that attention alone would not."""
    assert kept(4) == [0, 1, 2, 4]
    assert kept(7) == [0, 1, 2, 3, 4, 5, 6]  # A's overflow goes to B (ties .09 to the lower index)
    assert kept(8) == list(range(8))


def test_one_crop_is_the_top_attention_and_each_image_is_alone():
    assert kept(3, crops=1) == [0, 2, 4]
    # two images (tokens 0-3, 4-7), k = 4: two each, each image one crop -> its top-2 attention
    assert kept(4, crops=1, images=[0, 0, 0, 0, 1, 1, 1, 1]) == [0, 2, 4, 5]


def official_holov(features, attention, num_patches, k):
    """The official loop for one image (lines 29-135), as kept indices; the inputs are chosen so that no crop
    overflows and no attention ties."""
    n = len(attention)
    size, rem = divmod(n, num_patches)
    starts, scores = [], []
    start = 0
    for p in range(num_patches):
        m = size + (1 if p < rem else 0)
        f, a = features[start : start + m], attention[start : start + m]
        unit = f / (f.norm(dim=1, keepdim=True) + 1e-6)
        s = (unit @ unit.T) * (1 - torch.eye(m))
        mean = s.sum(1) / (m - 1)
        var = ((s - mean[:, None]) ** 2).sum(1) / (m - 1)
        scaled = a * 1e3
        var = var * (scaled.abs().mean() / (var.abs().mean() + 1e-6))
        scores.append((scaled + 0.09 * var).mean())
        starts.append((start, m))
        start += m
    w = torch.stack(scores) / (torch.stack(scores).sum() + 1e-6)
    alloc = (w * k).floor().long()
    remaining = k - int(alloc.sum())
    if remaining > 0:
        alloc[torch.topk(w, k=min(remaining, len(w))).indices] += 1
    picked = []
    for (start, m), a in zip(starts, alloc.tolist()):
        assert a < m  # no overflow in these inputs
        picked += (start + torch.topk(attention[start : start + m], a).indices).tolist()
    return sorted(picked)


@pytest.mark.parametrize("k", [8, 24, 40])
def test_matches_the_official_steps(k):
    """Random features (100 tokens, D = 32) and attention, 6 crops of 17/17/17/17/16/16: the same kept set."""
    torch.manual_seed(k)
    features, attention = torch.randn(100, 32), torch.rand(100) * 0.01 + 0.001
    expected = official_holov(features, attention, 6, k)
    got = HoloVScorer(crops=6).keep_in_image(features, attention, k).tolist()
    assert got == expected


def test_pre_llm_run_follows_the_definition(tiny):
    """k = 5 of each sample's one 64-token image: the definition on the layer-0 embeddings and the served [CLS]
    attention."""
    lvlm = tiny("llava")
    inputs, out = pre_llm_run(lvlm, "llava", "holov", 5, crops=4)
    with torch.no_grad():
        embeds = lvlm.adapter.embed(inputs)
        cls = lvlm.adapter.vision_tower_state(inputs, VisionRequest())["cls_attention"]
    vision = lvlm.adapter.vision_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    pad = (inputs["attention_mask"] == 0).sum(1)
    for b, trace in enumerate(out.traces):
        positions = vision[b].nonzero().flatten()
        expected = HoloVScorer(crops=4).keep_in_image(embeds[b, positions], cls[b, positions], 5)
        assert trace.stages[0]["layer"] == -1
        assert trace.stages[0]["kept"] == (positions[expected] - pad[b]).tolist()
        assert trace.vision_tokens_per_layer == [5] * lvlm.depth


def test_llava_next_keeps_k_without_the_newlines(tiny):
    lvlm = tiny("llava_next")
    inputs, out = pre_llm_run(lvlm, "llava_next", "holov", 6)
    with torch.no_grad():
        crops = lvlm.adapter.vision_tower_state(inputs, VisionRequest())["crops"]
    pad = (inputs["attention_mask"] == 0).sum(1)
    for b, trace in enumerate(out.traces):
        kept_pos = torch.tensor(trace.stages[0]["kept"]) + pad[b]
        assert len(kept_pos) == 6 and bool((crops[b, kept_pos] >= 0).all())


def test_refused_without_a_cls_token(tiny):
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        pre_llm_run(tiny("qwen2_vl"), "qwen2_vl", "holov", 3)


def test_bad_crops_are_refused():
    with pytest.raises(ValueError, match="positive int"):
        HoloVScorer(crops=0)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets_keep_their_budget(budget):
    method = check_preset("holov", budget)
    assert method.scorer.crops == 16 and method.scorer.alpha == 0.09


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_runs_on_the_bundled_proxy(budget):
    check_proxy_run("holov", budget)
