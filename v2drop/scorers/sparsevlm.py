"""SparseVLM v1.5: text raters score the vision tokens; part of the dropped ones is recycled.

v1's adaptive count is an option. The raters' attention rows are computed from the layer's own
projections (``v2drop.attention``); ``faithful=True`` reads them from the layer's full
probability map instead. Definition: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.scorers.base import AttentionRequest, LayerState, Scorer, Selection, register_scorer, vision_columns


def select_raters(embeds: torch.Tensor, vision: torch.Tensor, text_after: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters for one sample: text tokens whose mean relevance to the image is above average.

    Parameters
    ----------
    embeds : Tensor (L, D)
        Layer-0 input embeddings of the sample.
    vision : BoolTensor (L,)
        Vision tokens.
    text_after : BoolTensor (L,)
        Candidate text tokens (those after the last vision token).

    Returns
    -------
    LongTensor (R,) ascending positions of the raters (every candidate if all relevances tie).
    """
    candidates = text_after.nonzero().flatten()
    if candidates.numel() == 0:
        return candidates
    v = embeds[vision].float()
    t = embeds[candidates].float()
    relevance = (v @ t.T).softmax(dim=-1).mean(dim=0)  # (T,)
    chosen = relevance > relevance.mean()
    return candidates[chosen] if bool(chosen.any()) else candidates


def density_peak_clusters(
    x: torch.Tensor, n_clusters: int, knn: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN), deterministic.

    Density of a point: exp(−mean squared distance to its ``knn`` nearest neighbours, itself
    included; distances scaled by 1/√D). Its "delta": the distance to the nearest point of higher
    density (the largest distance for the densest point); ties in density go to the lower index.
    The ``n_clusters`` points with the largest density × delta are the centres; every point joins
    its nearest centre.

    Parameters
    ----------
    x : Tensor (N, D)
    n_clusters : int
        Number of centres (at most N).
    knn : int, optional
        Neighbours for the density; defaults to ``n_clusters`` (as the official SparseVLM code).

    Returns
    -------
    centres : LongTensor (C,) indices of the centres, in order of selection
    assign : LongTensor (N,) cluster of each point, in 0..C−1 (each centre is in its own cluster)
    """
    n = x.shape[0]
    c = max(1, min(n_clusters, n))
    k = max(1, min(knn or c, n))
    dist = torch.cdist(x.float(), x.float()) / x.shape[1] ** 0.5
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    index = torch.arange(n, device=x.device)
    # j is "denser" than i if it has higher density, or equal density and a lower index.
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )
    delta = dist.masked_fill(~denser, float("inf")).amin(dim=-1)
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = torch.sort(density * delta, descending=True, stable=True).indices[:c]
    assign = dist[:, centres].argmin(dim=-1)
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


@register_scorer("sparsevlm")
@dataclass
class SparseVLMScorer(Scorer):
    """SparseVLM v1.5: raters' attention on the vision tokens, with recycling of the dropped ones.

    Raters are chosen once from the layer-0 embeddings (``select_raters``). At a stage before
    layer l, layer l−1's head-averaged attention rows of the raters, averaged over raters, score
    the vision tokens; the drop applies to layer l−1's output (the paper's "prune at layer l−1").

    Parameters
    ----------
    recycle : bool
        Merge part of the dropped tokens back (default, v1.5).
    recycle_share : float
        Share of the dropped tokens, by score, that are recycled (top ``share·n + 1``).
    cluster_divisor : int
        The recycled tokens form ``⌊m / cluster_divisor⌋ + 1`` clusters.
    knn : int, optional
        Neighbours for the clustering density (default: the number of clusters).
    adaptive : bool
        v1's adaptive count: keep ``min(⌊scale·rank(P) + bias⌋, n − 1)`` tokens, P the raters ×
        vision attention, instead of the schedule's count (nothing dropped when rank(P) = n).
    scale, bias : float
        Of the adaptive count (the spec gives no values; 1 and 0 keep rank(P) tokens).
    faithful : bool
        Read the raters' rows from the scoring layer's full (B, H, L, L) attention map (the
        original implementation's memory cost) instead of computing those rows alone.
    """

    recycle: bool = True
    recycle_share: float = 0.3
    cluster_divisor: int = 10
    knn: int | None = None
    adaptive: bool = False
    scale: float = 1.0
    bias: float = 0.0
    faithful: bool = False

    def __post_init__(self):
        if not 0.0 <= self.recycle_share <= 1.0:
            raise ValueError(f"recycle_share must be in [0, 1], got {self.recycle_share}")
        if self.cluster_divisor < 1:
            raise ValueError(f"cluster_divisor must be >= 1, got {self.cluster_divisor}")

    def attention_request(self) -> AttentionRequest:
        """The raters' rows of layer l−1, from the full map when ``faithful``."""
        return AttentionRequest(layer_offset=-1, full_map=self.faithful)

    def attention_queries(
        self, embeds: torch.Tensor, vision: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per sample, the positions of its raters (text after the last vision token, chosen at layer 0)."""
        out = []
        for b in range(embeds.shape[0]):
            positions = torch.arange(embeds.shape[1], device=embeds.device)
            last_vision = positions[vision[b]].max() if bool(vision[b].any()) else torch.tensor(-1)
            text_after = attention_mask[b].bool() & ~vision[b] & (positions > last_vision)
            out.append(select_raters(embeds[b], vision[b], text_after))
        return out

    def score(self, state: LayerState) -> torch.Tensor:
        """Mean over the sample's raters of their head-averaged attention on each vision token."""
        cols = vision_columns(state)  # (B, R, V)
        valid = state.query_valid[..., None].to(cols.dtype)
        return (cols * valid).sum(1) / valid.sum(1).clamp(min=1)

    def count(self, state: LayerState, sample: int, n: int, scheduled: int) -> int:
        """Tokens to keep for one sample: the schedule's, or v1's rank-adaptive count."""
        if not self.adaptive:
            return scheduled
        p = vision_columns(state)[sample][state.query_valid[sample]][:, :n]
        rank = int(torch.linalg.matrix_rank(p.float()))
        return n if rank >= n else max(0, min(int(rank * self.scale + self.bias), n - 1))

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Keep the top scores (v1's adaptive count when ``adaptive``), then recycle part of the dropped tokens."""
        n_valid = state.vision_valid.sum(1).tolist()
        counts = [self.count(state, b, n, k) for b, (n, k) in enumerate(zip(n_valid, counts))]
        selection = super().select(state, scores, counts)
        selection.added_hidden, selection.added_source = [], []
        for b, (n, kept) in enumerate(zip(n_valid, selection.keep)):
            dropped = torch.ones(n, dtype=torch.bool, device=scores.device)
            dropped[kept] = False
            dropped_idx = dropped.nonzero().flatten()
            merged, centres = self.merge(state.hidden[b, state.vision_idx[b, dropped_idx]], scores[b, :n][dropped])
            selection.added_hidden.append(merged)
            selection.added_source.append(dropped_idx[centres])
        return selection

    def merge(self, hidden: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Recycle one sample's dropped tokens: cluster the top-scored share and average each cluster.

        Parameters
        ----------
        hidden : Tensor (N, D) the dropped tokens' hidden states
        scores : Tensor (N,) their scores

        Returns
        -------
        merged : Tensor (C, D) one mean per cluster, in the dtype of ``hidden``
        centres : LongTensor (C,) index (into the dropped tokens) of each cluster's centre
        """
        if not self.recycle or hidden.shape[0] == 0:
            return hidden[:0], torch.zeros(0, dtype=torch.long, device=hidden.device)
        m = min(hidden.shape[0], int(self.recycle_share * hidden.shape[0]) + 1)
        top = torch.sort(scores.float(), descending=True, stable=True).indices[:m]
        centres, assign = density_peak_clusters(hidden[top], m // self.cluster_divisor + 1, self.knn)
        sums = torch.zeros(len(centres), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, assign, hidden[top].float())
        counts = torch.bincount(assign, minlength=len(centres)).clamp(min=1)[:, None]
        return (sums / counts).to(hidden.dtype), top[centres]
