"""FastVID: dynamic temporal segmentation (DySeg) and density-based spatio-temporal pruning (STPrune) before the LLM.

Official code: ``LunarShen/FastVID`` at commit a40a109cb8df20e8c2c17c6850f8269717369990,
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` (``Qwen2Model.forward``, the
"FastVID" block, lines 900-1084: DySeg, the anchor distribution, ATS, the density scores, DTM for single- and
multi-frame segments) with the LLaVA-OneVision settings of ``fastvid_llavaonevision/scripts/eval.sh``; the Qwen2.5-VL
rule (``rule="qwen2_5_vl"``) from ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``
(``Qwen2_5_VLForConditionalGeneration.forward``, lines 1889-2099) with ``fastvid_qwen25vl/scripts/eval.sh``. Definition
and every difference: ``docs/methods.md`` (FastVID).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Merge, Scorer, Selection, register_scorer

FRAME_FEATURES = ("mean",)  # a frame's global feature for DySeg (official: SigLIP's attention-pooling head)
SALIENT_SCORES = ("mean_similarity",)  # what ranks a frame's salient tokens (official: that head's attention)
RULES = ("onevision", "qwen2_5_vl")  # the official code's rule of either model
OFFICIAL_TAU = {"onevision": 0.9, "qwen2_5_vl": 0.84}  # DySeg_tau of each official eval.sh


def dyseg(features: torch.Tensor, cuts: int = 8, tau: float = 0.9, sizes: list[int] | None = None) -> list[int]:
    """Segment lengths (summing to F) of frames with global features ``features`` (F, C): FastVID's DySeg.

    ``s_i`` is the cosine similarity of frames i and i + 1; a segment ends after frame i for the ``cuts − 1`` lowest
    ``s_i`` (at most F − 1; ties to the lower i), for every ``s_i < tau``, and (here) wherever the frames' token
    counts ``sizes`` differ.
    """
    frames = features.shape[0]
    if frames < 2:
        return [frames] if frames else []
    unit = F.normalize(features.float(), dim=-1)
    sim = (unit[:-1] * unit[1:]).sum(-1)
    lowest = torch.sort(sim, stable=True).indices[: max(0, min(cuts - 1, frames - 1))]
    ends = set(lowest.tolist()) | set((sim < tau).nonzero().flatten().tolist())
    if sizes is not None:
        ends |= {i for i in range(frames - 1) if sizes[i] != sizes[i + 1]}
    bounds = [-1, *sorted(ends), frames - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def density_scores(x: torch.Tensor, neighbours: int = 4) -> torch.Tensor:
    """(m,) density · peak distance of tokens ``x`` (m, D), the DPC-KNN scores STPrune ranks context tokens by.

    Distances are Euclidean over √D; density ``exp(−mean of the squared distances to the ``neighbours`` nearest
    tokens, itself included)``; peak distance the distance to the nearest denser token (of equal densities the
    lower index counts as denser), the largest distance of all for the densest.
    """
    m = x.shape[0]
    if not m:
        return x.new_zeros(0, dtype=torch.float32)
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / math.sqrt(x.shape[-1])
    nearest = torch.topk(dist, min(neighbours, m), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    index = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )
    peak = torch.where(denser, dist, dist.max()).min(-1).values
    return peak * density


def top_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores``, highest first (ties to the lower index)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def merge_groups(
    features: torch.Tensor, pool: torch.Tensor, targets: torch.Tensor, beta: float
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """FastVID's DTM: per target (in ``targets`` order), (target, members ascending, weights): every token of ``pool``
    joins the target of highest cosine similarity (ties to the earlier target), and a target with ``c`` tokens joined
    becomes ``w · target + (1 − w) · mean(joined)``, ``w = max(beta, 1 / (c + 1))`` (``w`` = 1 when none joined)."""
    if not len(targets):
        return []
    unit = F.normalize(features[pool].float(), dim=-1)
    sim = unit @ F.normalize(features[targets].float(), dim=-1).T
    choice = sim.argmax(-1)
    out = []
    for j, t in enumerate(targets.tolist()):
        joined = pool[choice == j]
        c = len(joined)
        w = max(beta, 1.0 / (c + 1))
        weights = {t: w}
        for i in joined.tolist():
            weights[i] = weights.get(i, 0.0) + (1.0 - w) / c
        members = torch.tensor(sorted(weights), dtype=torch.long, device=pool.device)
        out.append((t, members, torch.tensor([weights[i] for i in members.tolist()], dtype=torch.float32)))
    return out


def mean_similarity(features: torch.Tensor) -> torch.Tensor:
    """(m,) each token's cosine similarity with the mean of the frame's tokens ``features`` (m, D)."""
    x = features.float()
    return F.cosine_similarity(x, x.mean(0, keepdim=True), dim=-1)


def frame_layout(features: torch.Tensor, frames: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(each frame's token indices in frame order, ``features`` in float32, each frame's mean feature (F, D)) of tokens
    ``features`` (n, D) in ``frames`` (n,; −1 = no frame): what both FastVID rules start from."""
    layout = [(frames == f).nonzero().flatten() for f in frames[frames >= 0].unique().tolist()]
    x = features.float()
    means = torch.stack([x[idx].mean(0) for idx in layout]) if layout else x.new_zeros(0, x.shape[-1])
    return layout, x, means


def fastvid_plan(
    features: torch.Tensor,
    frames: torch.Tensor,
    retention: float | Fraction,
    cuts: int = 8,
    tau: float = 0.9,
    context_share: float = 0.4,
    anchor_interval: int = 4,
    beta: float = 0.6,
    salient: torch.Tensor | None = None,
    neighbours: int = 4,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """(kept ascending, groups ``[(anchor, members, weights), ...]``): FastVID's pruning of tokens ``features``
    (n, D) in ``frames`` (n,; −1 = no frame, kept) at ``retention``.

    Frames are cut by ``dyseg`` on their tokens' mean. A frame of ``n_f`` tokens retains ``R = int(n_f ·
    retention)``: ``S = R − int(R · context_share)`` salient tokens (highest ``salient``, default
    ``mean_similarity``; kept) and ``C = R − S`` context tokens. In a segment of L frames the anchor frames are
    its last and every ``anchor_interval``-th before it, each given ``C · L // ceil(L / anchor_interval)`` context
    tokens. A frame given exactly C (a lone frame) takes its C tokens of highest ``density_scores`` among its
    non-salient ones and merges those into them (``merge_groups``); an anchor frame given more takes as many of
    its own and merges every non-salient token of the whole segment into them (a token joins one group per anchor
    frame). Each context token is a group anchored at itself.
    """
    layout, x, global_features = frame_layout(features, frames)
    kept = [(frames < 0).nonzero().flatten()]
    groups: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    if not layout:
        return torch.arange(features.shape[0], device=features.device), groups
    sizes = [len(idx) for idx in layout]
    start = 0
    for length in dyseg(global_features, cuts, tau, sizes):
        segment = layout[start : start + length]
        start += length
        retain = int(sizes[start - 1] * retention)
        context = int(retain * context_share)
        salient_count = retain - context
        steps = -(-length // anchor_interval)
        anchor_count = context * length // steps
        counts = [anchor_count if (length - 1 - j) % anchor_interval == 0 else 0 for j in range(length)]
        pools = []
        for idx in segment:
            rank = mean_similarity(x[idx]) if salient is None else salient[idx].float()
            top = top_order(rank, salient_count)
            kept.append(idx[top])
            rest = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
            rest[top] = False
            pools.append(idx[rest])
        density = [density_scores(x[pool], neighbours) for pool in pools]
        everything = torch.cat(pools)
        for j, count in enumerate(counts):
            if count == context:  # one frame's own context tokens, its own tokens merged in
                groups += merge_groups(x, pools[j], pools[j][top_order(density[j], count)], beta)
            elif count > context:  # an anchor frame: the whole segment merged in
                groups += merge_groups(x, everything, pools[j][top_order(density[j], count)], beta)
    return torch.cat(kept).sort().values, groups


def qwen_segment_budgets(
    similarity: list[float], tokens: int, retain: int, context_share: float, anchor_interval: int, ignore: float
) -> list[tuple[int, int]]:
    """(salient, context) counts of each frame of a segment by the official Qwen2.5-VL rule.

    The segment (``len(similarity) + 1`` = L frames of ``tokens`` tokens, ``similarity`` its adjacent frames' cosine
    similarities) retains ``retain · L``: ``C = max(int(retain · L · context_share), 1)`` context and the rest
    salient tokens. A lone frame takes both. Otherwise the frames are cut again after every similarity below
    ``ignore``; only the last frame of each of those V runs gets tokens (the others none): the salient tokens
    split evenly over the runs (the first runs one more), and the context tokens evenly over ``ceil(V /
    anchor_interval)`` anchor runs, the last run and every ``anchor_interval``-th before it (the last runs one
    more), at most ``tokens // 2`` each; a frame's salient count is at most its tokens less its context count.
    """
    frames = len(similarity) + 1
    total = retain * frames
    context = min(max(int(total * context_share), 1), total)
    salient = total - context
    if frames == 1:
        return [(salient, context)]
    lasts = [i for i, s in enumerate(similarity) if s < ignore] + [frames - 1]
    runs = len(lasts)
    salient_per = [salient // runs + (j < salient % runs) for j in range(runs)]
    anchors = -(-runs // anchor_interval)
    context_per = [context // anchors + (j < context % anchors) for j in range(anchors)]
    out = [(0, 0)] * frames
    for j, last in enumerate(lasts):
        back = runs - 1 - j
        c = min(context_per[back // anchor_interval], tokens // 2) if back % anchor_interval == 0 else 0
        out[last] = (min(salient_per[j], tokens - c), c)
    return out


def fastvid_qwen_plan(
    features: torch.Tensor,
    frames: torch.Tensor,
    retention: float | Fraction,
    cuts: int = 8,
    tau: float = 0.84,
    ignore: float = 0.95,
    context_share: float = 0.4,
    anchor_interval: int = 4,
    beta: float = 0.6,
    salient: torch.Tensor | None = None,
    neighbours: int = 4,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """(kept ascending, groups ``[(anchor, members, weights), ...]``): the official Qwen2.5-VL FastVID pruning of
    tokens ``features`` (n, D) in ``frames`` (n,; −1 = no frame, kept) at ``retention``.

    Frames are cut by ``dyseg`` (official ``tau`` 0.84) on their tokens' mean; a frame of ``n_f`` tokens retains
    ``int(n_f · retention)``, pooled per segment and shared out by ``qwen_segment_budgets``. Each frame keeps its
    salient tokens (highest ``salient``, default ``mean_similarity``) and takes its context tokens, the highest
    ``density_scores`` among its other tokens (ascending); the tokens of the segment that are neither salient nor
    that frame's context tokens (other frames' context tokens included) are merged into them (``merge_groups``),
    frame by frame, so a token joins one group per frame with context tokens. Each context token is a group anchored
    at itself.
    """
    layout, x, global_features = frame_layout(features, frames)
    kept = [(frames < 0).nonzero().flatten()]
    groups: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    if not layout:
        return torch.arange(features.shape[0], device=features.device), groups
    unit = F.normalize(global_features, dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1).tolist()
    sizes = [len(idx) for idx in layout]
    start = 0
    for length in dyseg(unit, cuts, tau, sizes):
        segment = layout[start : start + length]
        tokens = sizes[start]
        budgets = qwen_segment_budgets(
            similarity[start : start + length - 1],
            tokens,
            int(tokens * retention),
            context_share,
            anchor_interval,
            ignore,
        )
        start += length
        tops, contexts = [], []
        for idx, (salient_count, context_count) in zip(segment, budgets):
            rank = mean_similarity(x[idx]) if salient is None else salient[idx].float()
            top = top_order(rank, salient_count)
            tops.append(idx[top])
            if context_count:
                rest = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
                rest[top] = False
                pool = idx[rest]
                contexts.append(pool[top_order(density_scores(x[pool], neighbours), context_count)].sort().values)
        kept += tops
        everything = torch.cat(segment)
        taken = torch.cat(tops)
        for targets in contexts:
            pool = everything[~torch.isin(everything, torch.cat([taken, targets]))]
            groups += merge_groups(x, pool, targets, beta)
    return torch.cat(kept).sort().values, groups


@register_scorer("fastvid")
@dataclass
class FastVIDScorer(Scorer):
    """FastVID (Shen et al., 2025): frames cut into segments of alike frames (DySeg); per frame, salient tokens kept
    and density-peak context tokens merged with what resembles them, a segment's anchor frames gathering the whole
    segment (STPrune), before the LLM.

    Runs on the current hidden states (before the LLM, as the official code, the projected features) of each
    sample, its frames given by the vision-token layout (a OneVision clip's pooled frames, a Qwen video's temporal
    steps, each image of a multi-image prompt; one image is one frame). ``fastvid_plan`` is the rule at the
    retention ``k / (frame tokens)`` (k the schedule's count); the total is close to, not exactly, k (as the
    official code). Tokens of no frame (OneVision's newline) stay. Context tokens are ``Merge`` groups anchored
    at themselves (``position: anchor``, ``place: anchor``): every token stays at its own place.

    With ``rule="qwen2_5_vl"`` the plan is ``fastvid_qwen_plan``, the official Qwen2.5-VL code's rule: per-segment
    budgets (``qwen_segment_budgets``: near-duplicate frames, adjacent similarity at least ``ignore``, give their
    tokens to the last of their run), and a frame's context tokens merge the segment's tokens that are neither
    salient nor its own context tokens.

    Parameters
    ----------
    rule : str
        Whose official rule: ``onevision`` (the LLaVA-OneVision code, ``fastvid_plan``; default) or ``qwen2_5_vl``
        (the Qwen2.5-VL code, ``fastvid_qwen_plan``).
    cuts : int
        DySeg's ``c``: the ``c − 1`` lowest adjacent-frame similarities always end a segment (official
        ``DySeg_c`` 8).
    tau : float or None
        DySeg's ``τ``: every adjacent-frame similarity below it ends a segment; None (the default) is the rule's
        official ``DySeg_tau``, 0.9 for ``onevision`` and 0.84 for ``qwen2_5_vl``.
    ignore : float
        ``qwen2_5_vl`` only, the official ``DySeg_ignore`` (0.95): in a segment, frames whose similarity with the next
        is at least it give their tokens to the last frame of their run.
    context_share : float
        STPrune's ``d``: the share of a frame's retained tokens that are density-peak context tokens; the rest are
        salient (official ``STPrune_d`` 0.4).
    anchor_interval : int
        DTM's ``p``: in a segment, every p-th frame counted back from its last is an anchor frame (official
        ``DTM_p`` 4).
    beta : float
        DTM's ``β``: the least weight of a context token against the mean of the tokens merged into it (official
        ``DTM_beta`` 0.6).
    frame_feature : str
        A frame's global feature for DySeg: ``mean`` of its tokens' features (the official LLaVA-OneVision code
        uses SigLIP's attention-pooling head, which transformers' LLaVA-OneVision does not load; the official
        Qwen2.5-VL code uses this mean).
    salient : str
        What ranks a frame's salient tokens: ``mean_similarity``, each token's cosine similarity with the frame's
        mean (the official code uses the attention of SigLIP's pooling head on each token, not served here).
    """

    rule: str = "onevision"
    cuts: int = 8
    tau: float | None = None
    ignore: float = 0.95
    context_share: float = 0.4
    anchor_interval: int = 4
    beta: float = 0.6
    frame_feature: str = "mean"
    salient: str = "mean_similarity"
    neighbours: ClassVar[int] = 4  # nearest tokens of the density estimate (fixed in the official code)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"fastvid rule must be one of {RULES}, got {self.rule!r}")
        for name in ("cuts", "anchor_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fastvid {name} must be a positive int, got {value!r}")
        for name in ("tau", "ignore"):
            value = getattr(self, name)
            if name == "tau" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise ValueError(f"fastvid {name} must be a cosine similarity in [-1, 1], got {value!r}")
        for name in ("context_share", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fastvid {name} must be in [0, 1], got {getattr(self, name)}")
        if self.frame_feature not in FRAME_FEATURES:
            raise ValueError(
                f"fastvid frame_feature must be one of {FRAME_FEATURES}, got {self.frame_feature!r} (the official "
                "SigLIP pooling head is not loaded by transformers' LLaVA-OneVision)"
            )
        if self.salient not in SALIENT_SCORES:
            raise ValueError(
                f"fastvid salient must be one of {SALIENT_SCORES}, got {self.salient!r} (the official pooling-head "
                "attention is not served here)"
            )

    @property
    def cut_tau(self) -> float:
        """DySeg's ``τ`` in use: ``tau``, or the rule's official ``DySeg_tau`` when it is None."""
        return OFFICIAL_TAU[self.rule] if self.tau is None else self.tau

    def score(self, state: LayerState) -> torch.Tensor:
        """Each frame token's ``mean_similarity`` in its frame (its salient rank); tokens of no frame score 1."""
        out = torch.full(state.vision_idx.shape, float("-inf"), device=state.hidden.device)
        for b in range(out.shape[0]):
            n = int(state.vision_valid[b].sum())
            frames = state.vision_coords[b, :n, 0]
            out[b, :n] = 1.0
            for f in frames[frames >= 0].unique().tolist():
                idx = (frames == f).nonzero().flatten()
                out[b, idx] = mean_similarity(state.hidden[b, state.vision_idx[b, idx]])
        return out

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, ``fastvid_plan`` (``fastvid_qwen_plan`` under ``rule="qwen2_5_vl"``) at retention ``k / (frame
        tokens)``: salient tokens and tokens of no frame kept, each context token a group of itself and the tokens
        merged into it (a lone context token with nothing else merged in, and in no other group, is kept)."""
        keep, members, groups, weights, anchors = [], [], [], [], []
        device = scores.device
        for b, k in enumerate(counts):
            n = int(state.vision_valid[b].sum())
            frames = state.vision_coords[b, :n, 0]
            n_frame = int((frames >= 0).sum())
            if k >= n or not n_frame:
                kept, found = torch.arange(n, device=device), []
            elif self.rule == "qwen2_5_vl":
                kept, found = fastvid_qwen_plan(
                    state.hidden[b, state.vision_idx[b, :n]],
                    frames,
                    Fraction(min(k, n_frame), n_frame),
                    self.cuts,
                    self.cut_tau,
                    self.ignore,
                    self.context_share,
                    self.anchor_interval,
                    self.beta,
                    scores[b, :n],
                    self.neighbours,
                )
            else:
                kept, found = fastvid_plan(
                    state.hidden[b, state.vision_idx[b, :n]],
                    frames,
                    Fraction(min(k, n_frame), n_frame),
                    self.cuts,
                    self.cut_tau,
                    self.context_share,
                    self.anchor_interval,
                    self.beta,
                    scores[b, :n],
                    self.neighbours,
                )
            joined = torch.bincount(torch.cat([m for _, m, _ in found]), minlength=n) if found else None
            # a group of one token (its weight is 1: a group's weights sum to 1) in no other group is that token, kept
            alone = [a for a, m, _ in found if len(m) == 1 and int(joined[a]) == 1]
            merged = [(a, m, w) for a, m, w in found if a not in alone]
            single = torch.tensor(alone, dtype=torch.long, device=device)
            keep.append(torch.cat([kept.to(device), single]).sort().values)
            members.append(torch.cat([m for _, m, _ in merged]) if merged else torch.zeros(0, dtype=torch.long))
            groups.append(
                torch.cat([torch.full((len(m),), g) for g, (_, m, _) in enumerate(merged)])
                if merged
                else torch.zeros(0, dtype=torch.long)
            )
            weights.append(torch.cat([w for _, _, w in merged]) if merged else torch.zeros(0))
            anchors.append(torch.tensor([a for a, _, _ in merged], dtype=torch.long))
        return Merge(keep=keep, members=members, groups=groups, weights=weights, anchors=anchors)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The frame means and similarities, the per-frame distance matrices and the segments' merge similarities:
        bounded by 2·n²·D (frames are not known to ``flops``)."""
        return 2.0 * n_vision * n_vision * hidden
