"""Attention-based baselines: FastV, PDrop and SparseVLM (v1.5, with v1's adaptive count as an option).

Each scorer only declares which attention rows it needs; the engine computes exactly those rows
from the layer's own projections (``v2drop.attention.attention_rows``), so every layer may run
with sdpa or FlashAttention. ``faithful=True`` (FastV, SparseVLM) instead runs the scoring layer
in eager mode and reads the rows from its full attention map, reproducing the original
implementations' memory cost. Definitions follow ``shared/spec/METHODS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.scorers.base import LayerState, Scorer, register_scorer


def vision_columns(state: LayerState) -> torch.Tensor:
    """(B, Q, V) the attention rows' entries at the current vision tokens."""
    return state.attention.gather(-1, state.vision_idx[:, None].expand(-1, state.attention.shape[1], -1))


@register_scorer("fastv")
@dataclass
class FastVScorer(Scorer):
    """FastV: attention of the last prompt token at layer K−1, averaged over heads; drop at layer K.

    Parameters
    ----------
    faithful : bool
        Run layer K−1 in eager mode and read the row from its full attention map (the official
        implementation's cost) instead of computing the one row beside sdpa/flash.
    """

    attention_query = "last_prompt"
    attention_layer_offset = -1
    faithful: bool = False

    def score(self, state: LayerState) -> torch.Tensor:
        """The last prompt token's head-averaged attention on each vision token."""
        return vision_columns(state)[:, 0]

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """One query row against every key: q/k projections of the row and keys, then the dot products."""
        return 2.0 * hidden * hidden * (n_tokens + 1) + 2.0 * n_tokens * hidden


@register_scorer("pdrop")
@dataclass
class PDropScorer(Scorer):
    """PyramidDrop: the last instruction token's attention through layer l's norm, q/k and RoPE, head-averaged.

    The row is computed on layer l's input before the layer runs, as the official code does; pair it
    with ``position_policy: renumber`` to reproduce the official position handling.
    """

    attention_query = "last_instruction"
    attention_layer_offset = 0

    def score(self, state: LayerState) -> torch.Tensor:
        """The last instruction token's head-averaged attention on each vision token."""
        return vision_columns(state)[:, 0]

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """One query row against every key (as FastV)."""
        return 2.0 * hidden * hidden * (n_tokens + 1) + 2.0 * n_tokens * hidden


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


def density_peak_clusters(x: torch.Tensor, n_clusters: int, knn: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
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
        Run the scoring layer in eager mode and read the rows from its full attention map.
    """

    attention_query = "raters"
    attention_layer_offset = -1
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

    def queries(self, embeds: torch.Tensor, vision: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
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
