"""HoliTom: temporal segmentation and spatio-temporal merging before the LLM, similarity merging inside it.

Official code: ``cokeshao/HoliTom`` at commit e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0, ``holitom/llava_arch.py``
(the outer stage: ``select_static_windows`` lines 53-98, ``get_static_dynamic_features`` 278-311,
``cluster_dpc_knn`` 29-51, ``merge_tokens_by_clustering`` 100-150, ``merge_tokens_by_attention_density`` 152-197,
``merge_tokens_by_density`` 199-213, the driver 364-407) and ``holitom/modeling_qwen2.py`` lines 144-208 (the inner
stage). Definition and every difference: ``docs/methods.md`` (HoliTom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2drop.scorers.base import (
    AttentionRequest,
    LayerState,
    Merge,
    Scorer,
    Selection,
    VisionRequest,
    register_scorer,
    select_keep,
    vision_columns,
)


def adjacent_similarity(frames: torch.Tensor) -> torch.Tensor:
    """(F − 1, n) cosine similarity of each token of frames (F, n, D) with the token at its place in the next frame."""
    unit = F.normalize(frames.float(), dim=-1)
    return F.cosine_similarity(unit[:-1], unit[1:], dim=-1)


def static_windows(similarity: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """(segments ``[(start, end), ...]`` covering frames 0..F−1 in order, tokens saved): HoliTom's segmentation.

    ``similarity`` (F − 1, n) is ``adjacent_similarity``. A window ``[s, e]`` (s < e) saves ``(e − s) · m`` tokens,
    ``m`` the places whose token stays above ``tau`` from frame s to frame e (each of them kept once, not e − s + 1
    times). A dynamic programme over the frames picks the windows of at most ``max_window`` frames saving the most;
    a frame in no window is a segment of its own. Among equal savings the earlier choice wins: a single frame over
    a window, a shorter window over a longer one.
    """
    frames = similarity.shape[0] + 1
    above = similarity > tau

    def saved(s: int, e: int) -> float:
        return float((e - s) * int(above[s:e].all(0).sum()))

    best = [0.0] * frames
    start = [0] * frames
    for i in range(frames):
        value, first = (best[i - 1] if i > 0 else 0.0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            candidate = (best[j] if j >= 0 else 0.0) + saved(j + 1, i)
            if candidate > value:
                value, first = candidate, j + 1
        best[i], start[i] = value, first
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1], best[-1]


def dpc_knn(x: torch.Tensor, clusters: int, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres ascending, distances (m, m)): the density-peak (DPC-KNN) cluster centres of tokens x (m, D).

    Distances are Euclidean over √D; a token's density is ``exp(−mean of its squared distances to its
    ``neighbours`` nearest tokens, itself included)``; its peak distance the distance to the nearest denser token
    (of equal densities the lower index counts as denser; the largest distance of all for the densest); the
    ``clusters`` tokens of highest density · peak distance are the centres (ties to the lower index).
    """
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / math.sqrt(x.shape[-1])
    nearest = torch.topk(dist, min(neighbours, len(x)), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    lower = torch.arange(len(x), device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (lower[None, :] < lower[:, None])
    )
    peak = torch.where(denser, dist, dist.max()).min(-1).values
    order = torch.sort(peak * density, descending=True, stable=True).indices
    return order[:clusters].sort().values, dist


def cluster_weights(dist: torch.Tensor, centres: torch.Tensor, beta: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per centre, (members, weights): every other token joins its nearest centre (ties to the first centre); a
    centre with members becomes ``beta · centre + (1 − beta) · mean(members)``, one without stays itself."""
    m = dist.shape[0]
    others = torch.ones(m, dtype=torch.bool, device=dist.device)
    others[centres] = False
    rest = others.nonzero().flatten()
    nearest = dist[rest][:, centres].argmin(-1) if len(rest) else rest
    out = []
    for c in range(len(centres)):
        joined = rest[nearest == c]
        if not len(joined):
            out.append((centres[c : c + 1], torch.ones(1)))
            continue
        weights = torch.cat([torch.tensor([beta]), torch.full((len(joined),), (1.0 - beta) / len(joined))])
        out.append((torch.cat([centres[c : c + 1], joined]), weights))
    return out


def frame_layout(frames: torch.Tensor) -> list[torch.Tensor]:
    """Per frame id ascending, the ascending indices of its tokens (frames (n,), −1 = no frame, left out)."""
    return [(frames == f).nonzero().flatten() for f in frames[frames >= 0].unique().tolist()]


def segment_runs(features: torch.Tensor, layout: list[torch.Tensor], tau: float, max_window: int):
    """(segments, tokens saved) of frames laid out as ``layout`` (indices into ``features``); frames of different
    token counts are never alike (each run of equal-sized frames is segmented on its own)."""
    segments, saved, i = [], 0.0, 0
    while i < len(layout):
        j = i
        while j + 1 < len(layout) and len(layout[j + 1]) == len(layout[i]):
            j += 1
        if j > i:
            run = torch.stack([features[idx] for idx in layout[i : j + 1]])
            found, reduced = static_windows(adjacent_similarity(run), tau, max_window)
            segments += [(s + i, e + i) for s, e in found]
            saved += reduced
        else:
            segments.append((i, i))
        i = j + 1
    return segments, saved


def holitom_groups(
    features: torch.Tensor,
    frames: torch.Tensor,
    retain: float,
    tau: float = 0.8,
    beta: float = 0.6,
    neighbours: int = 7,
    max_window: int = 1024,
    attention: torch.Tensor | None = None,
    attention_share: float = 0.0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """HoliTom's outer merge of tokens ``features`` (n, D) in ``frames`` (n,; −1 = no frame, untouched) at share
    ``retain``: the new tokens, each (members, weights summing to 1) with the anchor first: a cluster's centre (for
    static places, the centre's token in the window's first frame).

    Frames are segmented (``segment_runs``); the share becomes ``min(1, retain · N / (N − saved))`` over the N frame
    tokens. In a window, a place whose token stays above ``tau`` throughout is static: its tokens are averaged over
    the window's frames and the static places clustered (``dpc_knn``, ``round(m · share)`` centres, anchored in the
    window's first frame); every frame's other (dynamic) tokens, and a lone frame's tokens, are clustered per frame
    (``ceil(d · share)`` centres). Each cluster is merged as ``cluster_weights``. With ``attention_share`` a > 0
    (official ``1 − D``), ``round(ceil(d · share) · a)`` of those are instead the tokens of highest ``attention``
    (n,; ties to the lower index), kept alone, and the rest of the frame's tokens are clustered into the remainder
    (dropped when it is 0).
    """
    layout = frame_layout(frames)
    total = sum(len(idx) for idx in layout)
    if not total:
        return []
    segments, saved = segment_runs(features, layout, tau, max_window)
    share = min(retain / ((total - saved) / total), 1.0)
    out = []

    def cluster(tokens: torch.Tensor, values: torch.Tensor, count: int, static: torch.Tensor | None = None):
        if count <= 0:
            return
        centres, dist = dpc_knn(values, count, min(neighbours, count))
        for members, weights in cluster_weights(dist, centres, beta):
            if static is None:
                out.append((tokens[members], weights))
            else:  # each static place stands for its tokens in every frame of the window, weighted equally
                places = static[members]
                out.append(
                    (
                        tokens[:, places].T.flatten(),
                        (weights[:, None] / tokens.shape[0]).expand(-1, tokens.shape[0]).flatten(),
                    )
                )

    def frame_tokens(tokens: torch.Tensor, count: int):
        dominant = round(count * attention_share) if attention_share > 0 else 0
        if dominant > 0:
            top = select_keep(attention[tokens].float(), dominant)
            out.extend((tokens[t : t + 1], torch.ones(1)) for t in top.tolist())
            rest = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
            rest[top] = False
            tokens = tokens[rest]
        cluster(tokens, features[tokens].float(), count - dominant)

    for s, e in segments:
        if s == e:
            idx = layout[s]
            frame_tokens(idx, math.ceil(len(idx) * share))
            continue
        window = torch.stack(layout[s : e + 1])  # (W, n) token indices
        values = features[window].float()  # (W, n, D)
        static = (adjacent_similarity(values) > tau).all(0)
        places = static.nonzero().flatten()
        cluster(window, values[:, places].mean(0), round(len(places) * share), places)
        dynamic = (~static).nonzero().flatten()
        for f in range(window.shape[0]):
            frame_tokens(window[f, dynamic], math.ceil(len(dynamic) * share))
    return out


class HoliTomOuter(Scorer):
    """The pre-LLM stage of ``holitom`` (the ``HoliTomScorer`` fields; ``holitom_groups`` is the rule)."""

    def __init__(self, parent: HoliTomScorer):
        self.parent = parent

    def vision_request(self) -> VisionRequest | None:
        """The attention the tower's selection layer gives each patch, when ``attention_share`` > 0."""
        if self.parent.attention_share > 0:
            return VisionRequest(cls_attention=False, received_layers=(None,))
        return None

    def score(self, state: LayerState) -> torch.Tensor:
        """The tower's received attention when ``attention_share`` > 0, else 0 for every vision token (the stage's
        choice is its ``select``: clusters, not a ranking)."""
        if self.parent.attention_share > 0:
            return state.vision.received[None].float()
        return torch.zeros(state.vision_idx.shape, dtype=torch.float32, device=state.hidden.device)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, ``holitom_groups`` at the share ``k / (frame tokens)``; singleton groups are kept tokens,
        the others merged tokens anchored at their first member; tokens of no frame are kept."""
        p = self.parent
        keep, members, groups, weights, anchors = [], [], [], [], []
        device = scores.device
        for b, k in enumerate(counts):
            n = int(state.vision_valid[b].sum())
            frames = state.vision_coords[b, :n, 0]
            n_frame = int((frames >= 0).sum())
            found = []
            if k < n and n_frame:
                features = state.hidden[b, state.vision_idx[b, :n]]
                found = holitom_groups(
                    features,
                    frames,
                    min(k / n_frame, 1.0),
                    p.tau,
                    p.beta,
                    p.neighbours,
                    p.window,
                    scores[b, :n],
                    p.attention_share,
                )
            kept = (frames < 0).nonzero().flatten() if found else torch.arange(n, device=device)
            singles = [m for m, _ in found if len(m) == 1]
            merged = [(m, w) for m, w in found if len(m) > 1]
            keep.append(torch.cat([kept, *singles]).sort().values if singles else kept)
            members.append(torch.cat([m for m, _ in merged]) if merged else torch.zeros(0, dtype=torch.long))
            groups.append(
                torch.cat([torch.full((len(m),), g) for g, (m, _) in enumerate(merged)])
                if merged
                else torch.zeros(0, dtype=torch.long)
            )
            weights.append(torch.cat([w.float() for _, w in merged]) if merged else torch.zeros(0))
            anchors.append(torch.stack([m[0] for m, _ in merged]) if merged else torch.zeros(0, dtype=torch.long))
        return Merge(keep=keep, members=members, groups=groups, weights=weights, anchors=anchors)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """Adjacent-frame similarities and the per-frame distance matrices: about 2·n·D·(1 + tokens a frame); bounded
        by the whole set's 2·n²·D here (frames are not known to ``flops``)."""
        return 2.0 * n_vision * n_vision * hidden


def inner_groups(hidden: torch.Tensor, attention: torch.Tensor, k: int) -> tuple[torch.Tensor, list]:
    """(kept ascending, [(kept token, members ascending), ...]): HoliTom's inner merge of tokens hidden (n, D).

    The ``k`` tokens of highest ``attention`` (ties to the lower index) stay; every other token, in ascending
    order, is averaged into the stayer of highest cosine similarity (ties to the lower index), as the official
    in-place ``t ← (t + x) / 2``: a stayer with members x_1..x_m becomes ``t / 2^m + Σ_j x_j / 2^(m − j + 1)``.
    """
    kept = select_keep(attention, k)
    rest = torch.ones(len(hidden), dtype=torch.bool, device=hidden.device)
    rest[kept] = False
    rest = rest.nonzero().flatten()
    if not len(rest):
        return kept, []
    sim = F.cosine_similarity(hidden[rest].float()[:, None], hidden[kept].float()[None], dim=-1)
    nearest = sim.argmax(-1)
    return kept, [(kept[j], rest[nearest == j]) for j in range(len(kept)) if bool((nearest == j).any())]


class HoliTomInner(Scorer):
    """The decoder stage of ``holitom`` (``inner_groups`` is the rule)."""

    def attention_request(self) -> AttentionRequest:
        """The last prompt token's row of the layer before the stage (the official ``layer_outputs[1]`` of k − 1)."""
        return AttentionRequest(layer_offset=-1)

    def score(self, state: LayerState) -> torch.Tensor:
        """The last prompt token's head-averaged attention on each vision token."""
        return vision_columns(state)[:, 0]

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, ``inner_groups``: stayers without members kept, the others merged at their own place."""
        keep, members, groups, weights, anchors = [], [], [], [], []
        for b, k in enumerate(counts):
            n = int(state.vision_valid[b].sum())
            hidden = state.hidden[b, state.vision_idx[b, :n]]
            kept, found = inner_groups(hidden, scores[b, :n], min(k, n))
            merged_stayers = torch.stack([t for t, _ in found]) if found else torch.zeros(0, dtype=torch.long)
            keep.append(kept[~torch.isin(kept, merged_stayers)])
            members.append(torch.cat([torch.cat([t[None], m]) for t, m in found]) if found else merged_stayers)
            groups.append(
                torch.cat([torch.full((len(m) + 1,), g) for g, (_, m) in enumerate(found)])
                if found
                else torch.zeros(0, dtype=torch.long)
            )
            weights.append(
                torch.cat(
                    [2.0 ** -torch.cat([torch.tensor([len(m)]), torch.arange(len(m), 0, -1)]).float() for _, m in found]
                )
                if found
                else torch.zeros(0)
            )
            anchors.append(merged_stayers)
        return Merge(keep=keep, members=members, groups=groups, weights=weights, anchors=anchors)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The attention row (q/k projections and dot products) and the cosine similarities of dropped to kept."""
        return 2.0 * hidden * hidden * (n_tokens + 1) + 2.0 * n_tokens * hidden + 2.0 * n_vision * n_vision * hidden


@register_scorer("holitom")
@dataclass
class HoliTomScorer(Scorer):
    """HoliTom (Shao et al., NeurIPS 2025): outer merging at the pre-LLM stage, inner merging at decoder stages.

    Pre-LLM (``holitom_groups``): the frames (a OneVision clip's pooled frames, a Qwen video's temporal steps, each
    image of a multi-image prompt; one image is one frame) are cut into windows of alike frames; a window's static
    tokens are averaged over time; static places and every frame's other tokens are clustered by density peaks
    and each cluster merged into one token. The share is the schedule's count over the frame tokens, raised by the
    tokens the windows save; the total is close to, not exactly, the count (as the official code). Tokens of no
    frame stay. At a decoder stage (``inner_groups``): the count of tokens with the last prompt token's highest
    attention (of the layer before) stay, and every other token is averaged into its most similar stayer.

    Parameters
    ----------
    tau : float
        Similarity above which a token counts as unchanged from one frame to the next (official ``T``: 0.8, 0.65 at
        10% retention on LLaVA-OneVision).
    beta : float
        Weight of a cluster's centre against its members' mean (official ``BETA`` 0.6).
    neighbours : int
        Nearest tokens of the density estimate (official ``K`` 7; at most the cluster count).
    window : int
        Most frames a window spans (official ``MAX_WINDOW_SIZE`` 1024).
    attention_share : float
        Share of each frame's dynamic count kept as the tokens the vision tower's selection layer attends to most
        (received attention, heads and queries averaged) instead of clustered: official ``1 − D``. The official
        default is 1 (``D`` = 0); 0 here (the official ``D`` = 1), since towers without the attention served
        (OneVision's SigLIP, Qwen's) refuse a share above 0.
    """

    tau: float = 0.8
    beta: float = 0.6
    neighbours: int = 7
    window: int = 1024
    attention_share: float = 0.0

    def __post_init__(self):
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"holitom tau must be a cosine similarity in [-1, 1], got {self.tau}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"holitom beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.attention_share <= 1.0:
            raise ValueError(f"holitom attention_share must be in [0, 1], got {self.attention_share}")
        for name in ("neighbours", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"holitom {name} must be a positive int, got {value!r}")
        self._outer, self._inner = HoliTomOuter(self), HoliTomInner()

    def at(self, layer_idx: int) -> Scorer:
        """The outer stage at the pre-LLM stage (-1), the inner stage at decoder stages."""
        return self._outer if layer_idx < 0 else self._inner

    def check_layer(self, layer_idx: int) -> None:
        """The stage running at ``layer_idx`` must be able to run there (the inner one needs a layer before it)."""
        self.at(layer_idx).check_layer(layer_idx)

    def attention_request(self) -> AttentionRequest | None:
        """The inner stage's request (the engine asks ``at(layer)`` for each stage's own)."""
        return self._inner.attention_request()

    def score(self, state: LayerState) -> torch.Tensor:
        """The scores of the stage running at ``state.layer_idx``."""
        return self.at(state.layer_idx).score(state)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """The merge of the stage running at ``state.layer_idx``."""
        return self.at(state.layer_idx).select(state, scores, counts)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The inner stage's FLOPs (``cost`` asks ``at(layer)`` for each stage's own)."""
        return self._inner.flops(n_vision, n_tokens, hidden)
