"""HoloV: the budget spread over an image's crops by their score, then each crop's tokens by [CLS] attention.

Official code: ``obananas/HoloV``, ``llava/model/utils.py`` (``HoloV``, lines 22-151), called on the projected
vision tokens with the head-averaged [CLS] attention of the tower's selection layer
(``llava/model/llava_arch.py`` lines 140-145 and 239, ``clip_encoder.py`` ``feature_select`` lines 35-45). Read at
commit 1d2e65e961e698ff0e7d5bb4625489177dd9deba. Definition and differences: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.scorers.base import LayerState, Scorer, Selection, VisionRequest, register_scorer, select_keep
from v2drop.scorers.vispruner import share

EPS = 1e-6  # the official ``esp``


def crop_sizes(n: int, crops: int) -> list[int]:
    """Sizes of the ``crops`` consecutive runs an image's ``n`` tokens (in prompt order) are cut into: ``n // crops``
    each, the first ``n % crops`` one more; empty runs are left out."""
    base, extra = divmod(n, crops)
    return [s for s in (base + (1 if i < extra else 0) for i in range(crops)) if s > 0]


def crop_score(features: torch.Tensor, attention: torch.Tensor, alpha: float) -> torch.Tensor:
    """HoloV's score of one crop: the mean over its tokens of ``1e3·a + alpha · v · s``, a 0-d float32 tensor.

    ``a`` is a token's [CLS] attention and ``v`` the variance of its cosine similarities (features (m, D)) to the
    crop's tokens, the diagonal counted as 0, both sums divided by ``m − 1``; ``s = mean|1e3·a| / (mean|v| + 1e-6)``
    puts the variance on the attention's scale. A crop of one token scores its attention, unscaled.
    """
    attention = attention.float()
    m = len(attention)
    if m <= 1:
        return attention.mean() if m else attention.new_zeros(())
    unit = features.float() / (features.float().norm(dim=1, keepdim=True) + EPS)
    sim = (unit @ unit.T) * (1 - torch.eye(m, device=unit.device))
    mean = sim.sum(1) / (m - 1)
    var = ((sim - mean[:, None]) ** 2).sum(1) / (m - 1)
    scaled = attention * 1e3
    var = var * (scaled.abs().mean() / (var.abs().mean() + EPS))
    return (scaled + alpha * var).mean()


def top_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``weights``, ties to the lower index."""
    return torch.sort(weights, descending=True, stable=True).indices[:k]


def allocate(scores: torch.Tensor, sizes: list[int], k: int) -> list[int]:
    """How many of ``k`` tokens each crop keeps, from the crops' ``scores`` (P,) and ``sizes``.

    As the official code: weights ``w = s / (Σ s + 1e-6)``, each crop ``floor(w · k)``, the tokens left one each to
    the largest weights. A crop allotted more than it holds keeps all; the overflow (which the official code pads
    with zero vectors) is allotted again by the same rule over the crops with room, until ``min(k, Σ sizes)`` are
    allotted.
    """
    sizes_t = torch.tensor(sizes, device=scores.device)
    alloc = torch.zeros(len(sizes), dtype=torch.long, device=scores.device)
    target = min(k, sum(sizes))
    while int(alloc.sum()) < target:
        room = alloc < sizes_t
        left = target - int(alloc.sum())
        w = torch.where(room, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
        w = w / (w.sum() + EPS)
        extra = (w * left).floor().long()
        remaining = left - int(extra.sum())
        if remaining > 0:
            order = top_weights(w.masked_fill(~room, float("-inf")), min(remaining, int(room.sum())))
            extra[order] += 1
        alloc = torch.minimum(alloc + extra, sizes_t)
    return alloc.tolist()


@register_scorer("holov")
@dataclass
class HoloVScorer(Scorer):
    """HoloV (Zou et al., NeurIPS 2025) at a stage keeping k vision tokens.

    Each image (on LLaVA-NeXT its base image and tiles together, without the image_newline tokens, which go) keeps
    an equal share of k. Its tokens, in prompt order, are cut into ``crops`` consecutive runs (``crop_sizes``); each
    run gets a score (``crop_score``: its mean [CLS] attention and similarity variance), the image's share is spread
    over the runs in proportion to their scores (``allocate``), and every run keeps its allotment of tokens with the
    highest [CLS] attention (ties to the lower index). The similarities are those of the current hidden states (at
    the pre-LLM stage the projected vision features, as the official code).

    Needs a vision tower with a [CLS] token (the CLIP of LLaVA-1.5 and LLaVA-NeXT): OneVision (SigLIP) and
    Qwen2-VL / 2.5-VL are refused.

    Parameters
    ----------
    crops : int
        Runs per image (the official 16 on LLaVA-1.5).
    alpha : float
        Weight of the similarity variance in a crop's score (the official 0.09).
    """

    crops: int = 16
    alpha: float = 0.09

    def __post_init__(self):
        if isinstance(self.crops, bool) or not isinstance(self.crops, int) or self.crops < 1:
            raise ValueError(f"holov crops must be a positive int, got {self.crops!r}")

    def vision_request(self) -> VisionRequest:
        """The [CLS] attention (crop scores and the choice inside a crop)."""
        return VisionRequest(cls_attention=True)

    def score(self, state: LayerState) -> torch.Tensor:
        """The head-summed [CLS] attention on each vision token (the official head mean orders and allots alike)."""
        return state.vision.cls_attention.float()

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per image: the share of k spread over its crops by score, each crop's top [CLS] attention kept."""
        crops = state.vision.crops if state.vision is not None else None
        keep = []
        for b, (n, k) in enumerate(zip(state.vision_valid.sum(1).tolist(), counts)):
            if k >= n:
                keep.append(torch.arange(n, device=scores.device))
                continue
            images = state.vision_coords[b, :n, 0]
            present = torch.ones(n, dtype=torch.bool, device=scores.device) if crops is None else crops[b, :n] >= 0
            ids = images[present].unique()
            kept = []
            for image, k_image in zip(ids.tolist(), share(k, len(ids))):
                members = ((images == image) & present).nonzero().flatten()
                features = state.hidden[b, state.vision_idx[b, members]]
                kept.append(members[self.keep_in_image(features, scores[b, members], k_image)])
            keep.append(torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long))
        return Selection(keep=keep)

    def keep_in_image(self, features: torch.Tensor, attention: torch.Tensor, k: int) -> torch.Tensor:
        """Ascending indices (into the image's tokens) of the ``k`` HoloV keeps of one image (class docstring)."""
        sizes = crop_sizes(len(attention), self.crops)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        spans = [slice(s, s + m) for s, m in zip(starts, sizes)]
        scores = torch.stack([crop_score(features[span], attention[span], self.alpha) for span in spans])
        kept = [span.start + select_keep(attention[span], a) for span, a in zip(spans, allocate(scores, sizes, k)) if a]
        return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=attention.device)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The crops' similarity matrices: 2·n²·D / crops."""
        return 2.0 * n_vision * n_vision * hidden / self.crops
