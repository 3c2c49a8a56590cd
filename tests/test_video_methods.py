"""Video methods: VidCom2 (per-frame budgets, exact count) and the frame-level controls ``frames`` and ``frame_pool``,
on hand-worked tensors, the proxy's ``digits-video`` and the OneVision and Qwen2.5-VL video paths."""

import math

import pytest
import torch

import v2drop
from tests.prellm_helpers import kept_by, prellm_state
from tests.reference_helpers import language_model_logits, video_embeddings
from tests.test_video import qwen_video_inputs, real_onevision, video_prompt
from v2drop import Method
from v2drop.benchmarks import get_benchmark
from v2drop.presets import find_presets
from v2drop.scorers.frame_controls import FramePoolScorer, FramesScorer, pool_frame, pooled_grid
from v2drop.scorers.vidcom2 import VidCom2Scorer, frame_budgets, vidcom2_keep, vidcom2_similarity
from v2drop.testing import video_frames


def direction(degrees: float) -> list[float]:
    """A unit vector in the plane at ``degrees``."""
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def three_frames() -> tuple[torch.Tensor, torch.Tensor]:
    """(features (18, 4), frames (18,)): three frames of six tokens.

    On the two low-variance channels (1 and 3): frame 0 all along e0 but token 3 (at −30°, away
    from everything else), frame 1 all along e0, frame 2 all along e1 but token 14 (at 135°).
    Channels 0 and 2 alternate ±10 (variance 100): VidCom2 drops them. Frame 2 is far from the
    video centre, so its uniqueness wins the softmax (temperature 0.01) outright.
    """
    e0, e1 = direction(0), direction(90)
    plane = torch.tensor([e0, e0, e0, direction(-30), e0, e0] + [e0] * 6 + [e1, e1, direction(135), e1, e1, e1])
    noise = torch.tensor([[10.0, -10.0] if i % 2 else [-10.0, 10.0] for i in range(18)])
    features = torch.stack([noise[:, 0], plane[:, 0], noise[:, 1], plane[:, 1]], 1)
    return features, torch.arange(3).repeat_interleave(6)


def test_vidcom2_budgets_follow_frame_uniqueness():
    """The unique frame gets base·(1 + 1 − 1/3) of its tokens, the others base·(1 − 1/3); equal frames get base."""
    features, frames = three_frames()
    video, _ = vidcom2_similarity(features, frames)
    ids, counts = frame_budgets(video, frames, 0.5)
    assert ids.tolist() == [0, 1, 2] and counts.tolist() == [2, 2, 5]  # round(0.5·2/3·6), round(0.5·5/3·6)
    # hand-set video similarities: frames 0 and 1 alike (mean 5), frame 2 less (mean 3): one-hot softmax
    hand = torch.tensor([5.0] * 12 + [3.0] * 6)
    assert frame_budgets(hand, frames, 0.25)[1].tolist() == [1, 1, 2]  # round(1.0), round(1.0), round(2.5) = 2
    # equal uniqueness: every frame keeps round(base · 6); a frame never keeps fewer than 1 nor more than it has
    assert frame_budgets(torch.ones(18), frames, 0.5)[1].tolist() == [3, 3, 3]
    assert frame_budgets(torch.ones(18), frames, 0.01)[1].tolist() == [1, 1, 1]
    assert frame_budgets(hand, frames, 0.9)[1].tolist() == [4, 4, 6]  # min(1, 0.9·5/3) = 1: all six


def test_vidcom2_keeps_the_most_unique_tokens_of_each_frame_and_reconciles_to_the_count():
    features, frames = three_frames()
    # budgets 2 / 2 / 5 sum to 9: frame 0 keeps its odd token 3 and then token 0 (ties to the lower index),
    # frame 1 (all alike) its first two, frame 2 all but its last e1 token (the odd token 14 first)
    assert vidcom2_keep(features, frames, 9).tolist() == [0, 3, 6, 7, 12, 13, 14, 15, 16]
    # target 7: budgets round(0.39·2/3·6) = 2, 2 and round(0.39·5/3·6) = 4 make 8; the one extra goes from the
    # most redundant kept tokens: frame 1's (on its own centre exactly), the later one first
    assert vidcom2_keep(features, frames, 7).tolist() == [0, 3, 6, 12, 13, 14, 15]
    # target 17: budgets 4 / 4 / 6 make 14; the 3 missing come from the least redundant dropped tokens: frame 0's
    # (its centre is pulled off e0 by token 3), then frame 1's first
    assert vidcom2_keep(features, frames, 17).tolist() == [i for i in range(18) if i != 11]
    assert vidcom2_keep(features, frames, 18).tolist() == list(range(18))


def test_vidcom2_scorer_selects_per_frame_and_keeps_tokens_of_no_frame():
    """Through ``select``: the same kept set; a token of no frame (frame −1, OneVision's newline) stays on top."""
    features, frames = three_frames()
    features = torch.cat([features, torch.zeros(1, 4)])
    coords = torch.zeros(1, 19, 3, dtype=torch.long)
    coords[0, :18, 0], coords[0, 18, 0] = frames, -1
    hidden = torch.cat([torch.zeros(1, 1, 4), features[None]], 1)
    state = prellm_state(hidden, 19, coords)
    assert kept_by(VidCom2Scorer(), state, 9) == [0, 3, 6, 7, 12, 13, 14, 15, 16, 18]
    scores = VidCom2Scorer().score(state)[0]
    assert scores[3] > scores[0] and scores[14] > scores[12] and scores[18] == scores[:18].max()
    with pytest.raises(ValueError, match=r"vidcom2 channel_share must be in \(0, 1\], got 0"):
        VidCom2Scorer(channel_share=0)


def grid_state(frames: int, rows: int, cols: int, extra: int = 0):
    """A pre-LLM state of ``frames`` frames on a rows x cols grid (hidden = the token's index on every channel), then
    ``extra`` tokens of no frame."""
    per = rows * cols
    n = frames * per + extra
    coords = torch.full((1, n, 3), -1, dtype=torch.long)
    k = torch.arange(frames * per)
    coords[0, : frames * per] = torch.stack([k // per, (k % per) // cols, k % cols], -1)
    coords[0, frames * per :, 1:] = 0
    hidden = torch.arange(n + 1, dtype=torch.float32)[None, :, None].expand(1, n + 1, 2) - 1  # prompt index 0 is text
    return prellm_state(hidden.contiguous(), n, coords)


def test_frames_keeps_whole_uniformly_spaced_frames():
    state = grid_state(4, 2, 2, extra=1)  # 16 frame tokens in 4 frames, one newline
    assert kept_by(FramesScorer(), state, 8) == [0, 1, 2, 3, 12, 13, 14, 15, 16]  # 2 frames: linspace(0, 3, 2)
    assert kept_by(FramesScorer(), state, 5) == [0, 1, 2, 3, 16]  # round(5·4/16) = 1 frame
    assert kept_by(FramesScorer(), state, 1) == [0, 1, 2, 3, 16]  # at least one
    # 3 frames: linspace(0, 3, 3) = 0, 1.5, 3, rounded half to even: frames 0, 2, 3
    assert kept_by(FramesScorer(), state, 11) == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert kept_by(FramesScorer(), state, 17) == list(range(17))


def test_pooled_grid_has_the_most_cells_then_the_grid_aspect():
    assert pooled_grid(49, 14, 14) == (7, 7)
    assert pooled_grid(38, 16, 16) == (6, 6)  # 36: 37 is prime, 38 = 2·19 does not fit
    assert pooled_grid(30, 14, 14) == (5, 6)  # 5·6 and 6·5: 5/6 is nearer 1 than 6/5
    assert pooled_grid(3, 1, 8) == (1, 3) and pooled_grid(1, 4, 4) == (1, 1)


def test_frame_pool_averages_each_frame_on_its_grid():
    state = grid_state(2, 4, 4, extra=1)  # tokens 0-15, 16-31; newline 32
    sel = FramePoolScorer().select(state, FramePoolScorer().score(state), [8])
    assert sel.keep[0].tolist() == []
    # each frame pooled 2x2 → 4 cells; cell (0, 0) of frame 0 is the mean of tokens 0, 1, 4, 5 = 2.5
    assert sel.added_hidden[0][:, 0].tolist() == [2.5, 4.5, 10.5, 12.5, 18.5, 20.5, 26.5, 28.5, 32.0]
    assert sel.added_source[0].tolist() == [0, 2, 8, 10, 16, 18, 24, 26, 32]
    grid = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])  # 2 x 3, values 0-2 over 3-5
    hidden, source = pool_frame(torch.arange(6.0)[:, None], grid, 3)
    assert hidden[:, 0].tolist() == [1.5, 2.5, 3.5] and source.tolist() == [0, 1, 2]  # 1 x 3: column means
    # not a full grid: raster order, adaptive bins [floor(i·5/2), ceil((i+1)·5/2)) = tokens 0-2 and 2-4
    hidden, source = pool_frame(torch.arange(5.0)[:, None], grid[[0, 1, 2, 4, 5]], 2)
    assert hidden[:, 0].tolist() == [1.0, 3.0] and source.tolist() == [0, 2]


def test_video_presets_keep_their_share_on_the_proxy_digits_video():
    """On the proxy (8 frames of 256 tokens): VidCom2 keeps exactly 25%, frames 2 whole frames, frame_pool 8x8 a
    frame."""
    assert [p.name for p in find_presets(model="onevision", retention=0.25)] == [
        "fastvid-onevision-25",
        "frame_pool-onevision-25",
        "frames-onevision-25",
        "holitom-onevision-25",
        "random-onevision-25",
        "vidcom2-onevision-25",
    ]
    lvlm = v2drop.load("proxy")
    sample = get_benchmark("digits-video").load("test", 1)[0]
    prompt = lvlm.format_prompt(sample.question, n_images=len(sample.images))
    runs = {
        name: lvlm.generate([prompt], [list(sample.images)], method=name, max_new_tokens=2).traces[0]
        for name in ("vidcom2-onevision-25", "frames-onevision-25", "frame_pool-onevision-25", "vidcom2-onevision-10")
    }
    inputs = lvlm.prepare([prompt], [list(sample.images)])
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])
    coords = lvlm.adapter.vision_coords(inputs, vision)[0]
    frame_of = {int(i): int(coords[i, 0]) for i in vision[0].nonzero().flatten()}  # prompt index -> frame (image)
    assert all(trace.vision_tokens == 2048 for trace in runs.values())
    kept = runs["vidcom2-onevision-25"].stages[0]["kept"]
    assert len(kept) == 512 and runs["vidcom2-onevision-25"].vision_tokens_per_layer == [512] * lvlm.depth
    assert len(runs["vidcom2-onevision-10"].stages[0]["kept"]) == 204  # floor(2048 · 0.1)
    per_frame = torch.bincount(torch.tensor([frame_of[i] for i in kept]), minlength=8)
    assert per_frame.sum() == 512 and per_frame.min() >= 1
    assert sorted({frame_of[i] for i in runs["frames-onevision-25"].stages[0]["kept"]}) == [0, 7]
    pooled = runs["frame_pool-onevision-25"].stages[0]
    assert pooled["kept"] == [] and len(pooled["merged"]) == 512
    assert torch.bincount(torch.tensor([frame_of[i] for i in pooled["merged"]])).tolist() == [64] * 8


@pytest.mark.parametrize("share", [25, 15, 10])
def test_onevision_video_presets_keep_the_share_and_the_newline(share):
    """OneVision (8 frames of 196 tokens + one newline): VidCom2 keeps floor(1569·r) frame tokens plus the newline."""
    lvlm = real_onevision()
    inputs = lvlm.prepare([video_prompt(lvlm)], videos=[video_frames(1, 8, 64, 64)])
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])
    coords = lvlm.adapter.vision_coords(inputs, vision)[0]
    positions = vision[0].nonzero().flatten()
    assert torch.bincount(coords[positions, 0] + 1).tolist() == [1] + [196] * 8 and coords[positions[-1], 0] == -1
    out = lvlm.generate_from_inputs(inputs, f"vidcom2-onevision-{share}", max_new_tokens=2, stop_at_eos=False)
    kept = out.traces[0].stages[0]["kept"]
    assert len(kept) == math.floor(1569 * share / 100) + 1 and kept[-1] == int(positions[-1])
    frames = lvlm.generate_from_inputs(inputs, f"frames-onevision-{share}", max_new_tokens=2, stop_at_eos=False)
    expected = {25: [0, 7], 15: [0], 10: [0]}[share]  # round(0.25·8) = 2, round(1.2) = round(0.8) = 1 frames
    first = int(positions[0])
    assert frames.traces[0].stages[0]["kept"] == [first + f * 196 + i for f in expected for i in range(196)] + [
        int(positions[-1])
    ]


def test_vidcom2_on_qwen_video_keeps_the_kept_tokens_m_rope_positions(tiny):
    """As the official Qwen2-VL code: the full prompt's M-RoPE ids, the pruned tokens' columns removed (``preserve``).

    The engine's first logits equal the language model run on the kept tokens' embeddings with those columns.
    """
    lvlm = tiny("qwen2_5_vl")
    inputs = qwen_video_inputs(lvlm, frames=8)
    method = Method("vidcom2", schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.25]]})
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])[0]
    kept = torch.tensor(out.traces[0].stages[0]["kept"])
    assert len(kept) == int(vision.sum()) // 4
    keep = (~vision).clone()
    keep[kept] = True
    embeds = video_embeddings(lvlm, inputs)[0]
    logits = language_model_logits(lvlm, inputs, embeds, keep, embeds[0])
    torch.testing.assert_close(out.first_logits, logits, atol=1e-5, rtol=0)
