"""HoliTom (official code: cokeshao/HoliTom@e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0): the segmentation, the density
peaks and the merged values on hand-worked tensors, the inner merge against the official in-place loop, and runs on
the proxy's ``digits-video`` and the tiny OneVision and Qwen2.5-VL video paths."""

import math

import pytest
import torch

import v2drop
from tests.prellm_helpers import prellm_state
from tests.reference_helpers import language_model_logits, video_embeddings
from tests.test_video import qwen_video_inputs, real_onevision, video_prompt
from v2drop import Method
from v2drop.benchmarks import get_benchmark
from v2drop.presets import find_presets
from v2drop.scorers import select_keep
from v2drop.scorers.holitom import HoliTomInner, HoliTomScorer, dpc_knn, holitom_groups, static_windows
from v2drop.testing import batch_for, video_frames


def merged_values(merge, hidden: torch.Tensor) -> dict[int, list]:
    """Per anchor (index into the vision tokens), the merged token Σ weight · hidden over its group."""
    out = {}
    for g, anchor in enumerate(merge.anchors[0].tolist()):
        mask = merge.groups[0] == g
        out[anchor] = (merge.weights[0][mask, None] * hidden[merge.members[0][mask]]).sum(0)
    return out


def test_segmentation_picks_the_windows_that_save_the_most():
    """Five frames of three places; similarities above 0.8 marked +. Windows save (frames − 1) · static places:
    [0, 1] 2, [0, 2] 2, [1, 2] 1, [3, 4] 3, anything across frame 2 → 3 nothing."""
    sim = torch.tensor(
        [
            [0.9, 0.9, 0.1],  # 0 → 1: places 0, 1 alike
            [0.9, 0.1, 0.1],  # 1 → 2: place 0
            [0.1, 0.1, 0.1],  # 2 → 3: none
            [0.9, 0.9, 0.9],  # 3 → 4: all
        ]
    )
    # [0, 2] saves 2, no more than [0, 1] with frame 2 alone: the earlier choice (the shorter window) stays
    assert static_windows(sim, 0.8, 1024) == ([(0, 1), (2, 2), (3, 4)], 5.0)
    assert static_windows(sim, 0.8, 1) == ([(i, i) for i in range(5)], 0.0)  # no window of two frames allowed
    assert static_windows(sim, 0.95, 1024) == ([(i, i) for i in range(5)], 0.0)  # nothing alike
    lower = static_windows(torch.tensor([[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]]), 0.8, 2)
    assert lower == ([(0, 1), (2, 2)], 3.0)  # a window of at most 2 frames: [0, 1] (first of the equal choices)
    assert static_windows(torch.tensor([[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]]), 0.8, 3) == ([(0, 2)], 6.0)


def test_density_peaks_and_cluster_merge():
    """Points 0, 1/8, 3/8 | 5, 21/4 on a line (exact in binary), 2 nearest neighbours (itself included).

    Densities exp(−d²/2) with d the nearest distance: 1/8 for the first two, 1/4 for the others (ties: the lower
    index counts as denser). Peaks: token 0 the largest distance 5.25, token 1 1/8, token 2 1/4, token 3 4.625 (to
    token 2), token 4 1/4: the centres are 0 and 3. Merged with beta 0.6: 0.6·0 + 0.2·(1/8 + 3/8) = 0.1 and
    0.6·5 + 0.4·5.25 = 5.1.
    """
    x = torch.tensor([[0.0], [0.125], [0.375], [5.0], [5.25]])
    centres, dist = dpc_knn(x, 2, 2)
    assert centres.tolist() == [0, 3]
    frames = torch.zeros(5, dtype=torch.long)
    groups = holitom_groups(x, frames, 0.4, neighbours=2)  # one frame: ceil(5 · 0.4) = 2 clusters
    assert [m.tolist() for m, _ in groups] == [[0, 1, 2], [3, 4]]
    assert torch.cat([w for _, w in groups]).tolist() == pytest.approx([0.6, 0.2, 0.2, 0.6, 0.4])
    values = [float((w[:, None] * x[m]).sum()) for m, w in groups]
    assert values == pytest.approx([0.1, 5.1])
    centred = holitom_groups(x, frames, 0.4, beta=1.0, neighbours=2)  # beta 1: the centres alone
    assert [float((w[:, None] * x[m]).sum()) for m, w in centred] == [0.0, 5.0]


def four_frames() -> torch.Tensor:
    """(12, 2): four frames of three places. Place 0 turns slowly (cosines 0.98, 0.98) in frames 0-2, place 1 too
    (1, 0.96); place 2 flips every frame; frame 3 differs from frame 2 everywhere."""
    return torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
            [[1.0, 0.2], [0.0, 1.0], [-1.0, 1.0]],
            [[1.0, 0.4], [0.3, 1.0], [1.0, -1.0]],
            [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
        ]
    ).reshape(12, 2)


def test_static_tokens_are_averaged_over_their_window_and_clustered():
    """Frames 0-2 are one window (places 0, 1 static: saves 2 · 2), frame 3 alone. At retention 0.25 of 12 tokens
    the share becomes 0.25 · 12 / 8 = 0.375: round(2 · 0.375) = 1 static cluster, ceil(1 · 0.375) = 1 dynamic token
    a window frame, ceil(3 · 0.375) = 2 clusters in frame 3."""
    x = four_frames()
    frames = torch.arange(4).repeat_interleave(3)
    groups = holitom_groups(x, frames, 0.25)
    assert [m.tolist() for m, _ in groups] == [[0, 3, 6, 1, 4, 7], [2], [5], [8], [9, 11], [10]]
    static = (groups[0][1][:, None] * x[groups[0][0]]).sum(0)
    # place means (1, 0.2) and (0.1, 1); the centre (place 0) weighs 0.6
    torch.testing.assert_close(static, 0.6 * torch.tensor([1.0, 0.2]) + 0.4 * torch.tensor([0.1, 1.0]))
    # frame 3: equal densities, so token 9 is the densest, token 10 the next peak; token 11 (as near to both) joins 9
    torch.testing.assert_close((groups[4][1][:, None] * x[groups[4][0]]).sum(0), torch.tensor([0.4, 1.0]))
    # at retention 0.5 (share 0.75) both static places stay as their window means, every dynamic token stays
    wide = holitom_groups(x, frames, 0.5)
    assert [m.tolist() for m, _ in wide] == [[0, 3, 6], [1, 4, 7], [2], [5], [8], [9], [10], [11]]
    torch.testing.assert_close((wide[0][1][:, None] * x[wide[0][0]]).sum(0), torch.tensor([1.0, 0.2]))
    torch.testing.assert_close((wide[1][1][:, None] * x[wide[1][0]]).sum(0), torch.tensor([0.1, 1.0]))


def test_outer_select_merges_keeps_singletons_and_tokens_of_no_frame():
    x = four_frames()
    coords = torch.zeros(1, 13, 3, dtype=torch.long)
    coords[0, :12, 0], coords[0, 12, 0] = torch.arange(4).repeat_interleave(3), -1
    hidden = torch.cat([torch.zeros(1, 1, 2), x[None], torch.full((1, 1, 2), 9.0)], 1)
    state = prellm_state(hidden, 13, coords)
    scorer = HoliTomScorer()
    merge = scorer.select(state, scorer.score(state), [3])
    assert merge.keep[0].tolist() == [2, 5, 8, 10, 12]  # the singletons and the newline (frame −1)
    assert merge.anchors[0].tolist() == [0, 9] and merge.position == "anchor" and merge.place == "anchor"
    values = merged_values(merge, x)
    torch.testing.assert_close(values[0], torch.tensor([0.64, 0.52]))
    torch.testing.assert_close(values[9], torch.tensor([0.4, 1.0]))
    everything = scorer.select(state, scorer.score(state), [13])
    assert everything.keep[0].tolist() == list(range(13)) and everything.members[0].numel() == 0


def test_inner_merge_is_the_official_in_place_average():
    """Keep the 2 tokens of highest attention; each other token, in order, is averaged into its most similar stayer
    in place (the official loop, written out here): t ← (t + x) / 2."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 8, 4)
    attention = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3, 0.05]])
    state = prellm_state(hidden, 7)
    merge = HoliTomInner().select(state, attention, [2])
    x = hidden[0, 1:]
    stayers = [3, 1]  # attention order
    expected = x.clone()
    for i in range(7):
        if i in stayers:
            continue
        sims = torch.stack([torch.cosine_similarity(x[i], x[t], dim=0) for t in stayers])
        t = stayers[int(sims.argmax())]
        expected[t] = (expected[t] + x[i]) / 2
    values = merged_values(merge, x)
    kept = merge.keep[0].tolist()
    assert sorted(kept + list(values)) == [1, 3]
    for t in values:
        torch.testing.assert_close(values[t], expected[t])
    assert all(merge.groups[0].bincount().tolist())  # every group has members
    everything = HoliTomInner().select(state, attention, [7])
    assert everything.keep[0].tolist() == list(range(7)) and everything.anchors[0].numel() == 0


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="holitom tau must be a cosine similarity"):
        HoliTomScorer(tau=2.0)
    with pytest.raises(ValueError, match="holitom beta must be in"):
        HoliTomScorer(beta=-0.1)
    with pytest.raises(ValueError, match="holitom neighbours must be a positive int"):
        HoliTomScorer(neighbours=0)


def test_holitom_presets_on_the_proxy_digits_video():
    """On the proxy (8 frames of 256 tokens, 12 layers): the outer stage leaves about 25% (the share raised by the
    windows' savings, as the official code), the inner stage (layer 18 of 28 → 8) half of what is present."""
    assert [p.name for p in find_presets(label="holitom", model="onevision")] == [
        "holitom-onevision-10",
        "holitom-onevision-15",
        "holitom-onevision-25",
    ]
    lvlm = v2drop.load("proxy")
    sample = get_benchmark("digits-video").load("test", 1)[0]
    prompt = lvlm.format_prompt(sample.question, n_images=len(sample.images))
    out = lvlm.generate([prompt], [list(sample.images)], method="holitom-onevision-25", max_new_tokens=2)
    trace = out.traces[0]
    outer, inner = trace.stages
    present = len(outer["kept"]) + len(outer["merged"])
    assert trace.vision_tokens == 2048 and 0.2 * 2048 <= present <= 0.3 * 2048
    assert len(outer["merged"]) > 0
    assert trace.vision_tokens_per_layer == [present] * 8 + [present // 2] * 4
    assert len(inner["kept"]) + len(inner["merged"]) == present // 2


@pytest.mark.parametrize("share", [25, 10])
def test_holitom_presets_on_onevision_video(share):
    """OneVision (8 frames of 196 tokens + the newline): the newline stays; renumbered positions are contiguous."""
    lvlm = real_onevision()
    inputs = lvlm.prepare([video_prompt(lvlm)], videos=[video_frames(1, 8, 64, 64)])
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])
    last = int(vision[0].nonzero().flatten()[-1])
    out = lvlm.generate_from_inputs(inputs, f"holitom-onevision-{share}", max_new_tokens=2, stop_at_eos=False)
    outer = out.traces[0].stages[0]
    present = len(outer["kept"]) + len(outer["merged"])
    assert last in outer["kept"]
    assert math.floor(1569 * share / 100) <= present - 1 <= 1569
    assert lvlm.depth == 6  # the inner stage, before layer 18 of 28, runs before layer round(18 · 6 / 28) = 4
    assert out.traces[0].vision_tokens_per_layer == [present] * 4 + [present // 2] * 2


def test_holitom_on_qwen_video_merges_at_the_anchors_m_rope_ids(tiny):
    """Qwen2.5-VL video (4 temporal steps): outer and inner stages run; a merged token takes its anchor's M-RoPE ids
    (the official code has no Qwen path; ``preserve`` as the Qwen presets)."""
    lvlm = tiny("qwen2_5_vl")
    inputs = qwen_video_inputs(lvlm, frames=8)
    method = Method("holitom", schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.25], [2, 0.5]]})
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=2, stop_at_eos=False)
    trace = out.traces[0]
    n = int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())
    outer, inner = trace.stages
    present = len(outer["kept"]) + len(outer["merged"])
    assert trace.vision_tokens == n and 0 < present < n
    assert trace.vision_tokens_per_layer[2] == present // 2
    assert len(inner["kept"]) + len(inner["merged"]) == present // 2


def test_holitom_on_qwen_video_equals_the_language_model_on_the_merged_tokens(tiny):
    """The outer stage alone on a Qwen2.5-VL video (``preserve``): the engine's first logits equal the language model
    run on the text, kept and merged tokens (Σ weight · embedding at the anchor's place) with the prompt's M-RoPE ids
    of each kept token and of each merged token's anchor."""
    lvlm = tiny("qwen2_5_vl")
    inputs = qwen_video_inputs(lvlm, frames=8)
    method = Method("holitom", schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.25]]})
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    embeds, vision, positions_v, coords = video_embeddings(lvlm, inputs)
    with torch.no_grad():
        n = len(positions_v)
        groups = holitom_groups(embeds[0, positions_v].float(), coords[:, 0], math.floor(n * 0.25) / n)
        keep = ~vision.clone()
        values = embeds[0].float().clone()
        for members, weights in groups:
            anchor = int(positions_v[members[0]])
            keep[anchor] = True
            values[anchor] = (weights[:, None] * embeds[0, positions_v[members]].float()).sum(0)
        stage = out.traces[0].stages[0]
        assert sorted(stage["kept"] + stage["merged"]) == (keep & vision).nonzero().flatten().tolist()
        assert len(stage["merged"]) > 0
        logits = language_model_logits(lvlm, inputs, embeds, keep, values)
    torch.testing.assert_close(out.first_logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_outer_stage_in_a_batch_merges_what_each_sample_merges_alone(tiny, family):
    """Before the LLM, on images (one frame each; the tiny Qwen samples have different token counts)."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)

    def run(p, i):
        method = Method("holitom", schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.3]]})
        return [t.stages[0] for t in lvlm.generate(p, i, method=method, max_new_tokens=1).traces]

    batch = run(prompts, images)
    for i in range(3):
        alone = run(prompts[i : i + 1], images[i : i + 1])[0]
        assert (alone["kept"], alone["merged"]) == (batch[i]["kept"], batch[i]["merged"])
    assert any(stage["merged"] for stage in batch)


def test_attention_share_keeps_the_most_attended_dynamic_tokens():
    """The official ``D`` knob: of a frame's ceil(d · share) tokens, round(· (1 − D)) are its most attended tokens,
    kept alone; the rest of the frame is clustered into the remainder, or dropped when that is 0."""
    x = torch.tensor([[0.0], [0.125], [0.375], [5.0], [5.25]])
    frames = torch.zeros(5, dtype=torch.long)
    attention = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.2])
    everything = holitom_groups(x, frames, 0.4, neighbours=2, attention=attention, attention_share=1.0)
    assert [m.tolist() for m, _ in everything] == [[1], [2]]  # 2 most attended kept, the others dropped
    half = holitom_groups(x, frames, 0.6, neighbours=2, attention=attention, attention_share=0.5)
    # ceil(3) = 3 tokens: round(1.5) = 2 by attention (1, 2), then tokens 0, 3, 4 in 1 cluster. One cluster means
    # min(7, 1) = 1 neighbour, each token itself: all densities 1, so token 0 is the densest, its peak the largest
    # distance (5.25, above token 3's 5): centre 0 with both others, 0.6 · 0 + 0.2 · (5 + 5.25) = 2.05
    assert [m.tolist() for m, _ in half] == [[1], [2], [0, 3, 4]]
    assert float((half[2][1][:, None] * x[half[2][0]]).sum()) == pytest.approx(2.05)
    with pytest.raises(ValueError, match="holitom attention_share must be in"):
        HoliTomScorer(attention_share=1.5)


def test_attention_share_reads_the_tower_where_it_is_served(tiny):
    """On LLaVA-1.5 (CLIP) the tower's received attention is served; OneVision's SigLIP refuses with the reason."""
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 2, "llava")
    method = Method(HoliTomScorer(attention_share=1.0), schedule={"keep_mode": "absolute", "stages": [["pre_llm", 16]]})
    calls = []
    score = method.scorer.score
    method.scorer.score = lambda state: calls.append((state, score(state))) or calls[-1][1]
    traces = lvlm.generate(prompts, images, method=method, max_new_tokens=1).traces
    state, scores = calls[0]
    assert scores.shape == state.vision_idx.shape and bool((scores > 0).all())  # received attention, every patch
    for b, trace in enumerate(traces):  # one frame: the 16 most attended patches, alone
        top = select_keep(scores[b], 16)
        assert trace.stages[0]["kept"] == state.orig_idx[b, state.vision_idx[b, top]].tolist()
        assert not trace.stages[0].get("merged")
    onevision = real_onevision()
    inputs = onevision.prepare([video_prompt(onevision)], videos=[video_frames(1, 8, 64, 64)])
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        onevision.generate_from_inputs(inputs, method, max_new_tokens=1)
