"""FastVID (official code: LunarShen/FastVID@a40a109cb8df20e8c2c17c6850f8269717369990): DySeg's cuts, the density
scores and DTM's merge on hand-worked tensors, the whole plan against transcriptions of the official LLaVA-OneVision
and Qwen2.5-VL code, exact kept counts, and runs on the proxy's ``digits-video``, a 32-frame digits clip on OneVision
(segments of several frames: anchor frames gather them) and the Qwen2.5-VL video path (its official rule)."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import v2drop
from tests.prellm_helpers import prellm_state
from tests.reference_helpers import language_model_logits, video_embeddings
from tests.test_video import qwen_video_inputs, real_onevision, video_prompt
from v2drop import Method
from v2drop.benchmarks import get_benchmark
from v2drop.presets import find_presets
from v2drop.scorers.fastvid import (
    FastVIDScorer,
    density_scores,
    dyseg,
    fastvid_plan,
    fastvid_qwen_plan,
    mean_similarity,
    merge_groups,
    qwen_segment_budgets,
)
from v2drop.testing import build_real, video_frames


def official_fastvid(video, global_features, attn, r, c=8, tau=0.9, d=0.4, p=4, beta=0.6):
    """(kept indices into the flattened video (F · n), their tokens) by the official FastVID pruning, transcribed by
    hand from LunarShen/FastVID@a40a109, fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/
    modeling_qwen2.py, ``Qwen2Model.forward`` lines 900-1072, for a video alone (``video_start_idx`` 0, no text).

    ``video`` (F, n, D), ``global_features`` (F, C) (official: SigLIP's pooling-head output), ``attn`` (F, n)
    (official: that head's attention). Left out: the density noise ``torch.rand · 1e-6`` (the inputs here have no
    ties). Kept as the official code: ``topk`` for the cuts and the peaks, ``argmax`` for the merge."""
    frame_num, n, dim = video.shape
    alltoken = torch.arange(frame_num * n).view(frame_num, n)
    batch = torch.arange(frame_num).unsqueeze(1)
    g = global_features / global_features.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cut = torch.unique(torch.cat([torch.topk(sim, c - 1, largest=False).indices, torch.nonzero(sim < tau).squeeze(1)]))
    padded = F.pad(cut.sort().values, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    sizes = padded.diff().tolist()
    frame_retain = int(n * r)
    salient_num = frame_retain - int(frame_retain * d)
    context_num = frame_retain - salient_num
    context_list = torch.zeros(frame_num, dtype=torch.int)
    offset = 0
    for length in sizes:
        per = context_num * length // ((length + p - 1) // p)
        mask = torch.arange(length - 1, -1, -1) % p == 0
        context_list[offset : offset + length][mask] = per
        offset += length
    salient = torch.topk(attn, salient_num, dim=1).indices
    tokens, keep = [video[batch.expand(-1, salient_num), salient].reshape(-1, dim)], [alltoken.gather(1, salient)]
    rest_mask = torch.ones(frame_num, n, dtype=torch.bool)
    rest_mask.scatter_(1, salient, False)
    rest = torch.arange(n).expand(frame_num, -1)[rest_mask].view(frame_num, n - salient_num)
    filtered = video[batch.expand(-1, n - salient_num), rest]
    filtered_idx = alltoken.gather(1, rest)
    dist = torch.cdist(filtered, filtered) / dim**0.5
    density = (-(torch.topk(dist, k=4, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = (density[:, None, :] > density[:, :, None]).float()
    dist_max = dist.flatten(1).max(-1)[0][:, None, None]
    score = (dist * denser + dist_max * (1 - denser)).min(-1)[0] * density

    def dtm(targets, pool):  # targets (T, k, D), pool (T, m, D): each pool token into its most similar target
        unit = pool / pool.norm(dim=-1, keepdim=True)
        similarity = torch.bmm(unit, (targets / targets.norm(dim=-1, keepdim=True)).transpose(1, 2))
        one_hot = torch.zeros(*similarity.shape).scatter_(2, similarity.argmax(2).unsqueeze(-1), 1)
        w = (1 / (one_hot.sum(1).unsqueeze(-1) + 1)).clamp(min=beta)
        mean = torch.bmm(one_hot.transpose(1, 2), pool) / one_hot.sum(1).clamp(min=1).unsqueeze(-1)
        return w * targets + (1 - w) * mean

    picked = torch.topk(score, k=context_num, dim=-1).indices
    lone = context_list == context_num
    merged = dtm(filtered[batch.expand(-1, context_num), picked], filtered)
    tokens.append(merged[lone].reshape(-1, dim))
    keep.append(filtered_idx.gather(1, picked)[lone])
    start = 0
    for length in sizes:
        if length > 1:
            counts = context_list[start : start + length]
            anchor = counts > context_num
            per = int(counts[-1])
            picked = torch.topk(score[start : start + length][anchor], k=per, dim=-1).indices
            targets = filtered[start : start + length][anchor].gather(1, picked[..., None].expand(-1, -1, dim))
            pool = filtered[start : start + length].reshape(1, -1, dim).expand(int(anchor.sum()), -1, -1)
            tokens.append(dtm(targets, pool).reshape(-1, dim))
            keep.append(filtered_idx[start : start + length][anchor].gather(1, picked))
        start += length
    keep = torch.cat([k.reshape(-1) for k in keep])
    order = torch.argsort(keep)
    return keep[order], torch.cat(tokens)[order]


def official_fastvid_qwen(video, attn, r, c=8, tau=0.84, ignore=0.95, d=0.4, p=4, beta=0.6):
    """(kept indices into the flattened video (F · n), their tokens) by the official FastVID pruning of Qwen2.5-VL,
    transcribed by hand from LunarShen/FastVID@a40a109, fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/
    modeling_qwen2_5_vl.py, ``Qwen2_5_VLForConditionalGeneration.forward`` (the global features line 1836, the pruning
    lines 1889-2094), for a video alone (``prompt_start_len`` 0, no text), with fastvid_qwen25vl/scripts/eval.sh's
    defaults.

    ``video`` (F, n, D) the temporal steps' merged tokens; a step's global feature is their mean (official
    ``video_embeds.view(T, H · W // 4, -1).mean(1)``); ``attn`` (F, n) the salient ranking (official: the last vision
    block's attention of each step's mean query on the merged tokens' mean keys). Left out: the density noise
    ``torch.rand · 1e-6`` (the inputs here have no ties). Kept as the official code: ``topk`` for the cuts, the salient
    and the context tokens, ``argmax`` for the merge."""
    frame_num, n, dim = video.shape
    g = video.mean(1)
    g = g / g.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cut = torch.unique(torch.cat([torch.topk(sim, c - 1, largest=False).indices, torch.nonzero(sim < tau).squeeze(1)]))
    cut = cut.sort().values.tolist()
    sizes = [cut[0] + 1] + [b - a for a, b in zip(cut[:-1], cut[1:])] + [frame_num - cut[-1] - 1]
    frame_retain = int(n * r)
    keep, tokens, start = [], [], 0
    for seg_len in sizes:
        hs, aw, gf = video[start : start + seg_len], attn[start : start + seg_len], g[start : start + seg_len]
        seg_retain = frame_retain * seg_len
        seg_ctx = max(int(seg_retain * d), 1)
        seg_sal = seg_retain - seg_ctx
        if seg_len == 1:
            sal, ctx = [seg_sal], [seg_ctx]
        else:
            inner = torch.nonzero((gf[:-1] * gf[1:]).sum(dim=1) < ignore).squeeze(1).sort().values.tolist()
            if inner:
                sub = [inner[0] + 1] + [b - a for a, b in zip(inner[:-1], inner[1:])] + [seg_len - inner[-1] - 1]
            else:
                sub = [seg_len]
            runs = len(sub)
            sal_v = [seg_sal // runs + (1 if i < seg_sal % runs else 0) for i in range(runs)]
            temp = (runs + p - 1) // p
            tmp = [seg_ctx // temp + (1 if i < seg_ctx % temp else 0) for i in range(temp)]
            ctx_v, at = [], 0
            for i in range(runs):
                if i % p == 0:
                    ctx_v.append(min(tmp[at], n // 2))
                    at += 1
                else:
                    ctx_v.append(0)
            ctx_v.reverse()
            sal, ctx = [], []
            for i in range(runs):
                sal += [0] * (sub[i] - 1)
                ctx += [0] * (sub[i] - 1)
                if ctx_v[i] == 0:
                    sal.append(min(sal_v[i], n))
                    ctx.append(0)
                else:
                    ctx.append(min(ctx_v[i], n // 2))
                    sal.append(min(sal_v[i], n - ctx[-1]))
        sal_idx, ctx_idx = [], []
        for f in range(seg_len):
            top = torch.topk(aw[f], sal[f]).indices if sal[f] > 0 else None
            if ctx[f] > 0:
                everything = torch.arange(n)
                remaining = everything[~torch.isin(everything, top)] if top is not None else everything
                h = hs[f][remaining].unsqueeze(0)
                dist = torch.cdist(h, h) / dim**0.5
                density = (-(torch.topk(dist, k=4, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
                mask = (density[:, None, :] > density[:, :, None]).float()
                dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
                score = (dist * mask + dist_max * (1 - mask)).min(dim=-1)[0] * density
                picked = torch.topk(score, k=ctx[f], dim=-1).indices[0].sort().values
                ctx_idx.append(remaining[picked] + f * n)
            if top is not None:
                sal_idx.append(top + f * n)
        flat = hs.reshape(seg_len * n, dim)
        unit = flat / flat.norm(dim=-1, keepdim=True)
        sal_all = torch.cat(sal_idx)
        everything = torch.arange(seg_len * n)
        merged = []
        for targets in ctx_idx:
            pool = everything[~torch.isin(everything, torch.cat([sal_all, targets]))]
            similarity = unit[pool] @ unit[targets].T
            one_hot = torch.zeros(len(pool), len(targets)).scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
            w = (1 / (one_hot.sum(dim=0).unsqueeze(-1) + 1)).clamp(min=beta)
            mean = one_hot.T @ flat[pool] / one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
            merged.append(w * flat[targets] + (1 - w) * mean)
        index = torch.cat([sal_all, *ctx_idx])
        values = torch.cat([flat[sal_all], *merged])
        order = torch.argsort(index)
        keep.append(index[order] + start * n)
        tokens.append(values[order])
        start += seg_len
    return torch.cat(keep), torch.cat(tokens)


def plan_tokens(features, kept, groups):
    """(indices, tokens) ascending of a plan: kept tokens as they are, each group Σ weight · token at its anchor."""
    index = kept.tolist() + [a for a, _, _ in groups]
    values = [features[i] for i in kept.tolist()] + [(w[:, None] * features[m]).sum(0) for _, m, w in groups]
    order = sorted(range(len(index)), key=index.__getitem__)
    return torch.tensor([index[i] for i in order]), torch.stack([values[i] for i in order])


def test_dyseg_cuts_the_lowest_transitions_and_those_below_tau():
    """Frame features with adjacent cosines 1, 0, 1, 0.8, 1 (exact)."""
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    assert dyseg(features, cuts=2, tau=0.5) == [2, 4]  # the lowest (after frame 1); 0.8 is not below 0.5
    assert dyseg(features, cuts=2, tau=0.9) == [2, 2, 2]  # and 0.8 < 0.9 (after frame 3)
    assert dyseg(features, cuts=3, tau=0.0) == [2, 2, 2]  # the two lowest, 0 and 0.8
    assert dyseg(features, cuts=4, tau=0.0) == [1, 1, 2, 2]  # then of the equal 1s the earliest (after frame 0)
    assert dyseg(features, cuts=1, tau=-1.0) == [6]  # no cut
    assert dyseg(features, cuts=100, tau=-1.0) == [1] * 6  # at most F − 1 cuts
    assert dyseg(features, cuts=1, tau=-1.0, sizes=[4, 4, 4, 2, 2, 2]) == [3, 3]  # frames of other sizes differ
    assert dyseg(features[:1], cuts=8) == [1]


def test_density_scores_are_density_times_peak_distance():
    """Points 0, 1/8, 3/8 | 5, 21/4 on a line, 2 nearest neighbours (itself included): densities exp(−d²/2), d the
    nearest distance (1/8, 1/8, 1/4, 1/4, 1/4); peaks: token 0 (the densest: of equal densities the lower index) the
    largest distance 21/4, token 1 1/8 (to 0), token 2 1/4 (to 1), token 3 37/8 (to 2), token 4 1/4 (to 3)."""
    x = torch.tensor([[0.0], [0.125], [0.375], [5.0], [5.25]])
    high, low = math.exp(-1 / 128), math.exp(-1 / 32)
    expected = [5.25 * high, 0.125 * high, 0.25 * low, 4.625 * low, 0.25 * low]
    assert density_scores(x, 2).tolist() == pytest.approx(expected)


def test_merge_groups_weigh_each_target_against_the_mean_of_what_joined_it():
    """Targets t0 = (1, 0), t1 = (0, 1); a = (2, 0.2) is nearer t0, b = (0.1, 1) nearer t1, c = (1, 1) as near to
    both (it joins the earlier target). Each target joins itself: t0 gets t0, a, c (w = max(0.6, 1/4) = 0.6), t1
    gets t1, b."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.2], [0.1, 1.0], [1.0, 1.0]])
    pool = torch.arange(5)
    (a0, m0, w0), (a1, m1, w1) = merge_groups(x, pool, torch.tensor([0, 1]), 0.6)
    assert (a0, m0.tolist(), a1, m1.tolist()) == (0, [0, 2, 4], 1, [1, 3])
    assert w0.tolist() == pytest.approx([0.6 + 0.4 / 3, 0.4 / 3, 0.4 / 3]) and w1.tolist() == pytest.approx([0.8, 0.2])
    torch.testing.assert_close((w0[:, None] * x[m0]).sum(0), 0.6 * x[0] + 0.4 * (x[0] + x[2] + x[4]) / 3)
    (b1, n1, _), (b0, n0, _) = merge_groups(x, pool, torch.tensor([1, 0]), 0.6)
    assert (b1, n1.tolist(), b0, n0.tolist()) == (1, [1, 3, 4], 0, [0, 2])  # c now joins t1, listed first
    (_, _, v0), _ = merge_groups(x, pool, torch.tensor([0, 1]), 0.2)  # 3 joined: w = max(0.2, 1/4)
    assert v0.tolist() == pytest.approx([0.25 + 0.75 / 3, 0.25, 0.25])
    # a target nothing joins (its own token is as near the earlier, equal target) stays itself: w = 1
    twin = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    (_, m, w), (_, lone, lone_w) = merge_groups(twin, torch.arange(2), torch.tensor([0, 1]), 0.6)
    assert (m.tolist(), w.tolist(), lone.tolist(), lone_w.tolist()) == ([0, 1], pytest.approx([0.8, 0.2]), [1], [1.0])


def test_a_lone_frame_keeps_salient_tokens_and_merges_into_density_peaks():
    """One frame of six tokens at retention 4/6: R = 4, C = int(1.6) = 1, S = 3. Salient by the given ranking: tokens
    5, 1, 2. Of the others (0.5, 5, 5.25; 4 neighbours: all three, densities exp(−(0 + 4.5² + 4.75²)/3) for 0.5,
    exp(−(4.5² + 0 + 0.25²)/3) for 5, exp(−(4.75² + 0.25² + 0)/3) for 5.25), 5 is the densest and its peak the
    largest distance 4.75, above 5.25's 0.25 · its lower density and 0.5's 4.5 · its much lower density: the one
    context token is 5, and the two others join it."""
    x = torch.tensor([[0.5], [0.125], [0.375], [5.0], [5.25], [10.0]])
    frames = torch.zeros(6, dtype=torch.long)
    salient = torch.tensor([0.0, 0.8, 0.7, 0.1, 0.2, 0.9])
    kept, groups = fastvid_plan(x, frames, 4 / 6, salient=salient)
    assert kept.tolist() == [1, 2, 5]
    assert [(a, m.tolist()) for a, m, _ in groups] == [(3, [0, 3, 4])]
    torch.testing.assert_close(
        (groups[0][2][:, None] * x[groups[0][1]]).sum(0), 0.6 * x[3] + 0.4 * x[[0, 3, 4]].mean(0)
    )


def test_an_anchor_frame_gathers_its_whole_segment():
    """Two frames of 4 tokens, not cut (c = 1, tau −1: one segment; anchor_interval 4: the last frame is the only
    anchor) at retention 1/2 and context_share 1/2: R = 2, C = 1, S = 1 a frame, and the anchor frame takes
    C · 2 // 1 = 2 context tokens of its own: the densest of its two (0, 1)-like tokens and its (1, 0)-like one (the
    largest peak distance). Every non-salient token of both frames joins one of them; frame 0 gives no context token.
    """
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [1.0, 0.05], [0.05, 1.0], [1.0, 0.2], [0.2, 1.0]])
    frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    salient = torch.tensor([9.0, 0, 0, 0, 9, 0, 0, 0])  # tokens 0 and 4
    kept, groups = fastvid_plan(x, frames, 0.5, cuts=1, tau=-1.0, context_share=0.5, salient=salient)
    assert kept.tolist() == [0, 4]
    assert len(groups) == 2 and all(4 < a < 8 for a, _, _ in groups)  # anchored in frame 1
    joined = sorted(i for _, m, _ in groups for i in m.tolist())
    assert joined == [1, 2, 3, 5, 6, 7]  # every non-salient token of the segment, once (one anchor frame)
    rows = {tuple(m.tolist()) for _, m, _ in groups}
    assert rows == {(1, 3, 5, 7), (2, 6)}  # by direction: the (0, 1)-like and the (1, 0)-like tokens


@pytest.mark.parametrize(
    "frames, retention, cuts, tau, p, d, segments",
    [
        (8, 0.25, 8, 0.9, 4, 0.4, [1] * 8),  # the official defaults with 8 frames: every frame alone
        (12, 0.5, 3, 0.7, 4, 0.4, [3, 5, 1, 3]),  # anchors every 4th frame from a segment's end
        (12, 0.5, 2, 0.5, 2, 0.4, [3, 5, 1, 3]),  # p = 2: several anchor frames a segment, a token in several groups
        (9, 0.375, 2, 0.5, 2, 0.2, [3, 5, 1]),  # C = 1 and p = 2: C · 3 // 2 = C · 5 // 3 = C, the lone-frame rule
    ],
)
def test_plan_equals_the_official_transcription(frames, retention, cuts, tau, p, d, segments):
    """Random frames in runs of near copies (cosines of frame means below and above tau): the kept indices and the
    final tokens (kept, and merged at their anchors) equal the official code's, given the same global features
    (frame means) and salient ranking (``mean_similarity``)."""
    torch.manual_seed(frames + cuts)
    n, dim = 16, 8
    base = torch.randn(frames, n, dim)
    runs = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3])[:frames]  # frames of a run: one base plus noise
    offsets = 3.0 * torch.eye(dim)[runs][:, None]  # frame means of different runs nearly orthogonal
    video = base[runs] + offsets + 0.15 * torch.randn(frames, n, dim)
    flat = video.reshape(-1, dim)
    frame_ids = torch.arange(frames).repeat_interleave(n)
    salient = torch.cat([mean_similarity(video[f]) for f in range(frames)])
    kept, groups = fastvid_plan(flat, frame_ids, retention, cuts, tau, d, p, salient=salient)
    ours = plan_tokens(flat, kept, groups)
    ref = official_fastvid(video, video.mean(1), salient.view(frames, n), retention, cuts, tau, d, p)
    assert dyseg(video.mean(1), cuts, tau) == segments
    assert ours[0].tolist() == ref[0].tolist()
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=0)
    if p == 2 and d == 0.4:
        members = torch.cat([m for _, m, _ in groups])
        assert int(torch.bincount(members).max()) >= 2  # some token merged into more than one anchor frame


def test_exact_kept_counts():
    """Each frame retains int(n_f · r): S = R − int(0.4 · R) salient tokens, C context tokens; a segment of L frames
    adds C · L // ceil(L / 4) context tokens at each of its ceil(L / 4) anchors."""
    torch.manual_seed(0)

    def present(kept, groups):
        return len(kept) + len(groups)

    x = torch.randn(8 * 196, 16)
    frames = torch.arange(8).repeat_interleave(196)
    for r, per_frame in ((0.25, 49), (0.15, 29), (0.10, 19)):  # official int(196 · r)
        assert present(*fastvid_plan(x, frames, r)) == 8 * per_frame  # 8 frames, 8 segments: each alone
    # one segment of 8 frames (no cut): anchors at frames 7 and 3, each C · 8 // 2 = 4C context tokens
    kept, groups = fastvid_plan(x, frames, 0.25, cuts=1, tau=-1.0)
    assert len(kept) == 8 * (49 - 19) and len(groups) == 2 * (19 * 8 // 2)
    anchor_frames = {int(a) // 196 for a, _, _ in groups}
    assert anchor_frames == {3, 7}
    # 5 frames: anchors 4 and 0, C · 5 // 2 each: 5 · 30 + 2 · 47 = 244 (not 5 · 49 = 245)
    kept, groups = fastvid_plan(x[: 5 * 196], frames[: 5 * 196], 0.25, cuts=1, tau=-1.0)
    assert (len(kept), len(groups), {int(a) // 196 for a, _, _ in groups}) == (150, 94, {0, 4})
    with_newline = torch.cat([frames, torch.tensor([-1])])
    kept, _ = fastvid_plan(torch.cat([x, torch.zeros(1, 16)]), with_newline, 0.25)
    assert int(kept[-1]) == 8 * 196  # the token of no frame stays


def test_select_keeps_salient_and_lone_tokens_merges_the_rest():
    """The scorer on a hand-made state: salient tokens and the newline kept, context tokens as groups anchored at
    themselves, at their own positions (``anchor``); a count covering everything keeps everything."""
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.2], [0.8, 0.0], [0.2, 1.0], [0.0, 0.7]])
    coords = torch.zeros(1, 9, 3, dtype=torch.long)
    coords[0, :8, 0], coords[0, 8, 0] = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), -1
    hidden = torch.cat([torch.zeros(1, 1, 2), x[None], torch.full((1, 1, 2), 9.0)], 1)
    state = prellm_state(hidden, 9, coords)
    scorer = FastVIDScorer(context_share=0.5)
    scores = scorer.score(state)
    torch.testing.assert_close(scores[0, :4], mean_similarity(x[:4]))
    merge = scorer.select(state, scores, [4])  # r = 4/8: R = 2 a frame, 1 salient, 1 context
    kept, groups = fastvid_plan(x, coords[0, :8, 0], 0.5, context_share=0.5, salient=scores[0, :8])
    assert merge.keep[0].tolist() == kept.tolist() + [8]
    assert merge.anchors[0].tolist() == [a for a, _, _ in groups] and len(groups) == 2
    assert merge.position == "anchor" and merge.place == "anchor"
    everything = scorer.select(state, scores, [9])
    assert everything.keep[0].tolist() == list(range(9)) and everything.members[0].numel() == 0
    # at retention 1 a lone frame's context tokens are merged with themselves alone (weight 1): kept
    full = scorer.select(state, scores, [8])
    assert full.keep[0].tolist() == list(range(9)) and full.anchors[0].numel() == 0


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="fastvid cuts must be a positive int"):
        FastVIDScorer(cuts=0)
    with pytest.raises(ValueError, match="fastvid tau must be a cosine similarity"):
        FastVIDScorer(tau=1.5)
    with pytest.raises(ValueError, match=r"fastvid context_share must be in \[0, 1\]"):
        FastVIDScorer(context_share=1.2)
    with pytest.raises(ValueError, match="fastvid frame_feature must be one of .* SigLIP pooling head"):
        FastVIDScorer(frame_feature="siglip_head")
    with pytest.raises(ValueError, match="fastvid salient must be one of"):
        FastVIDScorer(salient="attention")
    with pytest.raises(ValueError, match=r"fastvid rule must be one of \('onevision', 'qwen2_5_vl'\)"):
        FastVIDScorer(rule="qwen2_vl")
    with pytest.raises(ValueError, match="fastvid ignore must be a cosine similarity"):
        FastVIDScorer(rule="qwen2_5_vl", ignore=2.0)


def test_fastvid_presets_on_the_proxy_digits_video():
    """On the proxy (8 frames of 256 tokens): 8 frames and c = 8 cut every frame alone, so each frame retains
    int(256 · k / 2048) tokens (k = floor(2048 · r)): 64, 38, 25; original positions (``preserve``)."""
    assert [p.name for p in find_presets(label="fastvid")] == [
        "fastvid-llava15-128",
        "fastvid-llava15-192",
        "fastvid-llava15-64",
        "fastvid-onevision-10",
        "fastvid-onevision-15",
        "fastvid-onevision-25",
        "fastvid-qwen25vl-27",
    ]
    lvlm = v2drop.load("proxy")
    sample = get_benchmark("digits-video").load("test", 1)[0]
    prompt = lvlm.format_prompt(sample.question, n_images=len(sample.images))
    for share, per_frame in ((25, 64), (15, 38), (10, 25)):
        method = Method.from_preset(f"fastvid-onevision-{share}")
        assert method.position_policy == "preserve"
        trace = lvlm.generate([prompt], [list(sample.images)], method=method, max_new_tokens=2).traces[0]
        stage = trace.stages[0]
        assert trace.vision_tokens == 2048 and len(stage["merged"]) > 0
        assert len(stage["kept"]) + len(stage["merged"]) == 8 * per_frame
        assert trace.vision_tokens_per_layer == [8 * per_frame] * lvlm.depth


@pytest.mark.parametrize("share, per_frame", [(25, 49), (15, 29), (10, 19)])
def test_fastvid_presets_on_onevision_video(share, per_frame):
    """OneVision (8 frames of 196 tokens + the newline): each frame retains the official int(196 · r) (k / 1568 of
    its tokens, k = floor(1569 · r)); the newline stays."""
    lvlm = real_onevision()
    inputs = lvlm.prepare([video_prompt(lvlm)], videos=[video_frames(1, 8, 64, 64)])
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])
    last = int(vision[0].nonzero().flatten()[-1])
    out = lvlm.generate_from_inputs(inputs, f"fastvid-onevision-{share}", max_new_tokens=2, stop_at_eos=False)
    stage = out.traces[0].stages[0]
    assert last in stage["kept"]
    assert len(stage["kept"]) + len(stage["merged"]) == 8 * per_frame + 1
    assert out.traces[0].vision_tokens_per_layer == [8 * per_frame + 1] * lvlm.depth


def equals_language_model_on_merged_tokens(lvlm, inputs, method):
    """The engine's first logits equal the language model run on the text, kept and merged tokens (Σ weight ·
    embedding at the anchor's place, ``fastvid_plan`` recomputed here) with the prompt's M-RoPE ids (``preserve``);
    returns the plan's groups."""
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    scorer = method.scorer
    embeds, vision, positions_v, coords = video_embeddings(lvlm, inputs)
    with torch.no_grad():
        n = len(positions_v)
        features = embeds[0, positions_v].float()
        salient = torch.zeros(n)
        for f in coords[:, 0].unique().tolist():
            salient[coords[:, 0] == f] = mean_similarity(features[coords[:, 0] == f])
        kept, groups = fastvid_plan(
            features,
            coords[:, 0],
            Fraction(math.floor(n * 0.25), n),
            scorer.cuts,
            scorer.cut_tau,
            scorer.context_share,
            scorer.anchor_interval,
            salient=salient,
        )
        keep = ~vision.clone()
        keep[positions_v[kept]] = True
        values = embeds[0].float().clone()
        for anchor, members, weights in groups:
            keep[positions_v[anchor]] = True
            values[positions_v[anchor]] = (weights[:, None] * embeds[0, positions_v[members]].float()).sum(0)
        stage = out.traces[0].stages[0]
        assert sorted(stage["kept"] + stage["merged"]) == (keep & vision).nonzero().flatten().tolist()
        logits = language_model_logits(lvlm, inputs, embeds, keep, values)
    torch.testing.assert_close(out.first_logits, logits, atol=1e-5, rtol=0)
    return groups


def test_fastvid_on_qwen_video_equals_the_language_model_on_the_merged_tokens(tiny):
    """Qwen2.5-VL video (4 temporal steps) as one segment (no cut; anchor_interval 2: anchor steps 3 and 1), so every
    non-salient token joins one group of each anchor step: the engine's merge equals the plan's."""
    lvlm = tiny("qwen2_5_vl")
    inputs = qwen_video_inputs(lvlm, frames=8)
    scorer = FastVIDScorer(cuts=1, tau=-1.0, anchor_interval=2)
    method = Method(scorer, schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.25]]})
    groups = equals_language_model_on_merged_tokens(lvlm, inputs, method)
    assert int(torch.bincount(torch.cat([m for _, m, _ in groups])).max()) == 2  # in both anchor steps' groups


def test_fastvid_on_real_geometry_qwen2_5_vl_video():
    """Qwen2.5-VL-7B's geometry: an 8-frame 448x336 clip is 4 steps of 16x12 = 192 tokens; the default FastVID (every
    step alone: 4 ≤ c) retains int(192 · 0.25) = 48 a step, and the engine equals the language model on them."""
    lvlm = build_real("qwen2_5_vl")
    inputs = lvlm.prepare([video_prompt(lvlm)], videos=[video_frames(1, 8, 448, 336)])
    assert int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum()) == 768
    method = Method("fastvid", schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.25]]})
    groups = equals_language_model_on_merged_tokens(lvlm, inputs, method)
    assert len(groups) == 4 * int(48 * 0.4)


def lm_logits(lvlm, inputs, keep, values) -> torch.Tensor:
    """First-token logits of the language model on the prompt's tokens ``keep`` (L,) with input embeddings ``values``
    (L, D) and the prompt's own position ids of those tokens (M-RoPE rows or 1-D). The attention mask is given, so
    that transformers does not read the gaps in 1-D position ids as packed sequences."""
    ids = lvlm.adapter.position_ids(inputs)
    ids = ids[:, :, keep] if ids.dim() == 3 else ids[:, keep]
    with torch.no_grad():
        hidden = lvlm.model.model.language_model(
            inputs_embeds=values[None, keep].to(lvlm.model.dtype),
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
            position_ids=ids,
            use_cache=False,
        ).last_hidden_state
        return lvlm.model.lm_head(hidden[:, -1]).float()


def test_qwen_segment_budgets_by_hand():
    """The official Qwen2.5-VL per-segment budgets, worked by hand."""
    # 7 frames of 100 tokens retaining 27 each: 189, C = int(75.6) = 75, S = 114. Similarities below 0.95 after
    # frames 1 and 3: runs 0-1, 2-3, 4-6, whose last frames (1, 3, 6) get 38 salient tokens each; one anchor run
    # (ceil(3 / 4)), the last, with min(75, 100 // 2) = 50 context tokens. The other frames get none.
    similarity = [0.99, 0.9, 0.99, 0.5, 0.97, 0.99]
    assert qwen_segment_budgets(similarity, 100, 27, 0.4, 4, 0.95) == [
        (0, 0),
        (38, 0),
        (0, 0),
        (38, 0),
        (0, 0),
        (0, 0),
        (38, 50),
    ]
    # every frame its own run (all below 0.95), 5 runs, p = 2: 50 retained, C = 20, S = 30 (6 a run); anchor runs
    # 4, 2, 0 (counted back from the last) share 20 as 7, 7, 6, the larger shares from the end
    assert qwen_segment_budgets([0.0] * 4, 100, 10, 0.4, 2, 0.95) == [(6, 6), (6, 0), (6, 7), (6, 0), (6, 7)]
    # salient remainders go to the first runs: retaining 4 a frame, 12, C = int(4.8) = 4, S = 8 over 3 runs is 3, 3, 2
    assert qwen_segment_budgets([0.0, 0.0], 10, 4, 0.4, 4, 0.95) == [(3, 0), (3, 0), (2, 4)]
    # a lone frame: C = max(int(R · d), 1), S = R − C; a frame of 4 tokens takes at most 2 context tokens, and its
    # salient tokens at most the rest
    assert qwen_segment_budgets([], 10, 2, 0.4, 4, 0.95) == [(1, 1)]
    assert qwen_segment_budgets([0.99], 4, 4, 0.75, 4, 0.95) == [(0, 0), (2, 2)]
    assert qwen_segment_budgets([], 10, 0, 0.4, 4, 0.95) == [(0, 0)]  # nothing retained (the official code fails)


def test_qwen_rule_merges_what_neither_rule_keeps_nor_targets():
    """The lone frame of the OneVision test (R = 4: S = 3 salient tokens 5, 1, 2; C = 1 context token, 3): the
    Qwen2.5-VL rule merges the tokens neither salient nor a target (0 and 4) into it, w = max(0.6, 1/3) = 0.6, where the
    OneVision rule merges the frame's non-salient tokens, the target itself included (0, 3 and 4)."""
    x = torch.tensor([[0.5], [0.125], [0.375], [5.0], [5.25], [10.0]])
    frames = torch.zeros(6, dtype=torch.long)
    salient = torch.tensor([0.0, 0.8, 0.7, 0.1, 0.2, 0.9])
    kept, groups = fastvid_qwen_plan(x, frames, 4 / 6, salient=salient)
    assert kept.tolist() == [1, 2, 5] and [(a, m.tolist()) for a, m, _ in groups] == [(3, [0, 3, 4])]
    assert groups[0][2].tolist() == pytest.approx([0.2, 0.6, 0.2])
    _, onevision = fastvid_plan(x, frames, 4 / 6, salient=salient)
    assert onevision[0][2].tolist() == pytest.approx([0.4 / 3, 0.6 + 0.4 / 3, 0.4 / 3])


def test_qwen_rule_gives_a_run_of_near_duplicate_frames_to_its_last_frame():
    """Two frames of 4 tokens whose means are parallel (similarity 1 ≥ ignore 0.95), one segment (c = 1, tau −1), at
    retention 1/2 and context_share 1/2: the segment retains 4, C = 2, S = 2, all given to frame 1 (frame 0 keeps
    nothing of its own): salient tokens 4 and 6, context tokens 5 = (0.05, 1) and 7 = (0.2, 1), into which the other
    tokens of the segment, all frame 0's, merge by cosine: (1, 0) and (1, 0.1) into 7, (0, 1) and (0.1, 1) into 5,
    w = max(0.6, 1/3). The OneVision rule keeps a salient token of frame 0 (token 0) and merges frame 1's own tokens
    too."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [1.0, 0.05], [0.05, 1.0], [1.0, 0.2], [0.2, 1.0]])
    frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    salient = torch.tensor([9.0, 0, 0, 0, 9, 0, 8, 0])
    kept, groups = fastvid_qwen_plan(x, frames, 0.5, cuts=1, tau=-1.0, context_share=0.5, salient=salient)
    assert kept.tolist() == [4, 6]
    assert [(a, m.tolist(), w.tolist()) for a, m, w in groups] == [
        (5, [1, 3, 5], pytest.approx([0.2, 0.2, 0.6])),
        (7, [0, 2, 7], pytest.approx([0.2, 0.2, 0.6])),
    ]
    kept, _ = fastvid_plan(x, frames, 0.5, cuts=1, tau=-1.0, context_share=0.5, salient=salient)
    assert kept.tolist() == [0, 4]


def test_qwen_rule_cuts_at_its_own_tau():
    """Frame means with adjacent cosines 0.87 and 1: the OneVision τ 0.9 cuts after frame 0, the Qwen2.5-VL τ 0.84 does
    not (c = 1: no cut by rank), so there the three frames are one segment and frame 0 gets tokens as a run's last."""
    assert (FastVIDScorer().cut_tau, FastVIDScorer(rule="qwen2_5_vl").cut_tau) == (0.9, 0.84)
    assert FastVIDScorer(rule="qwen2_5_vl", tau=0.5).cut_tau == 0.5
    means = torch.tensor([[1.0, 0.0], [0.87, math.sqrt(1 - 0.87**2)], [0.87, math.sqrt(1 - 0.87**2)]])
    assert dyseg(means, 1, 0.9) == [1, 2] and dyseg(means, 1, 0.84) == [3]
    torch.manual_seed(0)
    x = (means[:, None] * 4 + 0.01 * torch.randn(3, 6, 2)).reshape(18, 2)
    frames = torch.arange(3).repeat_interleave(6)
    kept, groups = fastvid_qwen_plan(x, frames, 0.5, cuts=1)
    # one segment of 3 frames: 9 retained, C = 3, S = 6; runs {0} and {1, 2} (0.87 < 0.95, 1 ≥ 0.95): salient 3 + 3 in
    # frames 0 and 2, frame 2 the anchor with min(3, 6 // 2) = 3 context tokens; frame 1 gives nothing of its own
    assert [int(i) // 6 for i in kept] == [0, 0, 0, 2, 2, 2] and [int(a) // 6 for a, _, _ in groups] == [2, 2, 2]


@pytest.mark.parametrize(
    "r, c, tau, ignore, p, d, segments",
    [
        (0.5, 2, 0.84, 0.95, 4, 0.4, [4, 3, 1, 4, 1, 4, 2, 1]),  # runs of near copies give their tokens to their last
        (0.5, 2, 0.84, 0.95, 2, 0.4, [4, 3, 1, 4, 1, 4, 2, 1]),  # p = 2: two anchor runs, a token in both their groups
        (0.25, 8, 0.84, 0.95, 4, 0.4, [4, 3, 1, 4, 1, 4, 2, 1]),  # the official c, retention 0.25
        (0.3, 3, 0.7, 0.9, 2, 0.5, None),  # other thresholds
    ],
)
def test_qwen_plan_equals_the_official_transcription(r, c, tau, ignore, p, d, segments):
    """20 random frames in 4 runs along nearly orthogonal directions, tilted within a run so that adjacent cosines fall
    below tau, between tau and ignore, and above ignore: the kept indices and final tokens of ``fastvid_qwen_plan``
    equal the official Qwen2.5-VL code's (transcribed), given the same salient ranking (``mean_similarity``)."""
    torch.manual_seed(20)
    frames, n, dim = 20, 16, 8
    runs = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3])
    tilt = torch.tensor([0, 0.5, 0.5, 1.2, 0.2, 0.9, 0.9, 0, 0, 0.6, 0.6, 1.5, 0, 0, 0.5, 1.2, 1.2, 0.3, 0.9, 0])
    offsets = 3.0 * (torch.eye(dim)[runs] + tilt[:, None] * torch.eye(dim)[-1])
    video = 0.5 * torch.randn(4, n, dim)[runs] + offsets[:, None] + 0.1 * torch.randn(frames, n, dim)
    flat = video.reshape(-1, dim)
    frame_ids = torch.arange(frames).repeat_interleave(n)
    salient = torch.cat([mean_similarity(video[f]) for f in range(frames)])
    kept, groups = fastvid_qwen_plan(flat, frame_ids, r, c, tau, ignore, d, p, salient=salient)
    ours = plan_tokens(flat, kept, groups)
    ref = official_fastvid_qwen(video, salient.view(frames, n), r, c, tau, ignore, d, p)
    if segments is not None:
        assert dyseg(video.mean(1), c, tau) == segments
    assert ours[0].tolist() == ref[0].tolist()
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=0)
    unit = F.normalize(video.mean(1), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1)
    assert bool((similarity >= ignore).any()) and bool(((similarity >= tau) & (similarity < ignore)).any())
    silent = {f for f in range(frames) if not ((kept // n == f).any() or any(a // n == f for a, _, _ in groups))}
    assert silent  # frames of a run of near copies, but its last, keep nothing of their own
    if p == 2 and c == 2:
        assert int(torch.bincount(torch.cat([m for _, m, _ in groups])).max()) == 2  # in two anchor runs' groups


def qwen_official_reference(lvlm, inputs, scorer):
    """The engine's first logits and trace against the official Qwen2.5-VL construction (``official_fastvid_qwen``
    on the video's merged tokens, the scorer's thresholds): the kept and merged tokens at their prompt places with
    their own M-RoPE ids (official: ``position_ids[:, :, keep_indexs]``). Returns the official kept count."""
    method = Method(scorer, schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.27]]})
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    embeds, vision, positions_v, coords = video_embeddings(lvlm, inputs)
    steps = int(inputs["video_grid_thw"][0, 0])
    video = embeds[0, positions_v].float().view(steps, -1, embeds.shape[-1])
    attn = torch.stack([mean_similarity(frame) for frame in video])
    assert coords[:, 0].tolist() == torch.arange(steps).repeat_interleave(video.shape[1]).tolist()
    index, tokens = official_fastvid_qwen(
        video, attn, 0.27, scorer.cuts, scorer.cut_tau, scorer.ignore, scorer.context_share, scorer.anchor_interval
    )
    stage = out.traces[0].stages[0]
    assert sorted(stage["kept"] + stage["merged"]) == positions_v[index].tolist()
    keep = ~vision.clone()
    keep[positions_v[index]] = True
    values = embeds[0].float().clone()
    values[positions_v[index]] = tokens
    torch.testing.assert_close(out.first_logits, lm_logits(lvlm, inputs, keep, values), atol=1e-5, rtol=0)
    return len(index)


def test_fastvid_qwen25vl_preset_on_real_geometry_qwen2_5_vl_video():
    """Qwen2.5-VL-7B's geometry, a 32-frame 448x336 clip: 16 temporal steps of 12x16 = 192 tokens. The preset
    (official rule and settings, retention 0.27: 51 a step) keeps exactly the official construction's tokens, merged
    tokens at their anchors' M-RoPE ids, and the engine's first logits equal the language model's on them; with a
    lower ``ignore`` the steps' runs split and segments get several anchor runs (p = 2), which also match."""
    lvlm = build_real("qwen2_5_vl")
    inputs = lvlm.prepare([video_prompt(lvlm)], videos=[video_frames(1, 32, 448, 336)])
    assert inputs["video_grid_thw"].tolist() == [[16, 24, 32]]
    preset = Method.from_preset("fastvid-qwen25vl-27").scorer
    assert (preset.rule, preset.cut_tau, preset.ignore) == ("qwen2_5_vl", 0.84, 0.95)
    count = qwen_official_reference(lvlm, inputs, preset)
    assert count < int(192 * 0.27) * 16  # near-copy steps give tokens to their run's last, capped at half a step
    qwen_official_reference(lvlm, inputs, FastVIDScorer(rule="qwen2_5_vl", ignore=0.985, anchor_interval=2))
    # the OneVision rule on the same video keeps another set
    out = lvlm.generate_from_inputs(inputs, Method.from_preset("fastvid-qwen25vl-27"), max_new_tokens=1)
    other = Method("fastvid", schedule={"keep_mode": "relative", "stages": [["pre_llm", 0.27]]})
    assert lvlm.generate_from_inputs(inputs, other, max_new_tokens=1).traces[0].stages[0] != out.traces[0].stages[0]


def test_anchor_frames_gather_their_segments_on_a_32_frame_digits_clip():
    """LLaVA-OneVision's geometry on a 32-frame ``digits-video`` clip (the official evaluation's 32 frames; 196 tokens
    a frame and the newline): the official c = 8, τ = 0.9 give segments of several frames, whose anchor frames (every
    4th from a segment's end) take C · L // ceil(L / 4) context tokens (C = 19 at 25%) and merge the segment's
    non-salient tokens into them. The engine's kept and merged tokens equal the official code's (transcribed), and its
    first logits the language model's on them at their own positions."""
    lvlm = real_onevision()
    frames, _, _ = get_benchmark("digits-video").clip("test", 0, frames=32)
    inputs = lvlm.prepare([video_prompt(lvlm)], videos=[frames])
    out = lvlm.generate_from_inputs(inputs, "fastvid-onevision-25", max_new_tokens=1, stop_at_eos=False)
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])[0]
    positions_v = vision.nonzero().flatten()
    coords = lvlm.adapter.vision_coords(inputs, lvlm.adapter.vision_mask(inputs["input_ids"]))[0, positions_v]
    with torch.no_grad():
        embeds = lvlm.adapter.embed(inputs)
    frame_pos = positions_v[coords[:, 0] >= 0]
    assert len(frame_pos) == 32 * 196 and int(positions_v[-1]) not in frame_pos.tolist()  # the newline last
    video = embeds[0, frame_pos].float().view(32, 196, -1)
    attn = torch.stack([mean_similarity(frame) for frame in video])
    segments = dyseg(video.mean(1), 8, 0.9)
    assert segments == [4, 1, 6, 6, 6, 2, 6, 1]
    anchors = [
        sum(segments[:i]) + j for i, length in enumerate(segments) for j in range(length) if (length - 1 - j) % 4 == 0
    ]
    index, tokens = official_fastvid(video, video.mean(1), attn, Fraction(math.floor(6273 * 0.25), 6272))
    stage = out.traces[0].stages[0]
    assert sorted(stage["kept"] + stage["merged"]) == sorted(frame_pos[index].tolist() + [int(positions_v[-1])])
    per_anchor = {1: 19, 2: 38, 4: 76, 6: 57}  # C · L // ceil(L / 4)
    context = sum(per_anchor[length] * -(-length // 4) for length in segments)
    assert len(index) == 32 * 30 + context == 960 + 608
    merged_frames = torch.tensor(stage["merged"]).sub(int(frame_pos[0])).div(196, rounding_mode="floor")
    assert set(merged_frames.tolist()) == set(anchors) and len(anchors) == 12  # merged tokens in the anchor frames only
    keep = ~vision.clone()
    keep[frame_pos[index]] = True
    keep[positions_v[-1]] = True
    values = embeds[0].float().clone()
    values[frame_pos[index]] = tokens
    torch.testing.assert_close(out.first_logits, lm_logits(lvlm, inputs, keep, values), atol=1e-5, rtol=0)
    assert out.traces[0].vision_tokens_per_layer == [960 + 608 + 1] * lvlm.depth
