"""VisPruner: important tokens by the vision tower's [CLS] attention, then diverse tokens by de-duplication.

Official code: ``Theia-4869/VisPruner``, ``llava/model/llava_arch.py`` (``encode_images``, lines 141-186)
and ``llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``, lines 35-52: the [CLS] row
of the selection layer's attention and that layer's patch outputs). Definition and differences:
``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Scorer, Selection, VisionRequest, register_scorer


def token_groups(state: LayerState, b: int, n: int) -> torch.Tensor:
    """(n,) the group each vision token of sample ``b`` is pruned in: its tower crop where the family has crops
    (LLaVA-NeXT; -1 for the image_newline tokens), else its image."""
    crops = state.vision.crops if state.vision is not None else None
    if crops is not None:
        return crops[b, :n]
    return state.vision_coords[b, :n, 0]


def share(k: int, groups: int) -> list[int]:
    """``k`` shared out equally over ``groups``, the first ones one more when it does not divide."""
    base, extra = divmod(k, max(1, groups))
    return [base + (1 if i < extra else 0) for i in range(groups)]


def select_per_group(
    state: LayerState,
    scores: torch.Tensor,
    counts: list[int],
    pick: Callable[[int, torch.Tensor, int], torch.Tensor],
) -> Selection:
    """Each sample's vision tokens pruned group by group (``token_groups``), each group keeping its ``share`` of k.

    A sample whose count ``k`` covers its ``n`` vision tokens keeps them all. Otherwise every group
    (tokens of group -1, LLaVA-NeXT's image_newline, go) keeps the tokens ``pick(b, members, k_group)``
    returns, indices into ``members`` (the group's ascending token indices); a sample keeps them in
    ascending order.
    """
    keep = []
    for b, (n, k) in enumerate(zip(state.vision_valid.sum(1).tolist(), counts)):
        if k >= n:
            keep.append(torch.arange(n, device=scores.device))
            continue
        groups = token_groups(state, b, n)
        ids = groups.unique()
        ids = ids[ids >= 0]
        kept = []
        for group, k_group in zip(ids.tolist(), share(k, len(ids))):
            members = (groups == group).nonzero().flatten()
            kept.append(members[pick(b, members, k_group)])
        keep.append(torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long))
    return Selection(keep=keep)


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, keep: int, step: int = 8) -> torch.Tensor:
    """VisPruner's iterative de-duplication: the ``keep`` of ``residual`` (indices into ``features`` (n, C)) left.

    Each round splits the current list into the entries at even and at odd places, scores every
    even-place entry by its largest cosine similarity to an odd-place one, and drops the
    ``min(step, len − keep)`` highest-scored even-place entries; the list becomes the remaining
    even-place entries in descending score order (ties to the earlier one) followed by the odd-place
    ones, which is the order the next round splits.
    """
    unit = F.normalize(features.float(), dim=-1)
    while keep > 0:
        r = min(step, len(residual) - keep)
        if r <= 0:
            break
        even, odd = residual[0::2], residual[1::2]
        sim = (unit[even] @ unit[odd].T).max(dim=-1).values
        order = torch.sort(sim, descending=True, stable=True).indices
        residual = torch.cat([even[order[min(r, len(even)) :]], odd])
    return residual


@register_scorer("vispruner")
@dataclass
class VisPrunerScorer(Scorer):
    """VisPruner (Zhang et al., ICCV 2025) at a stage keeping k vision tokens.

    Of the k, ``int(k · important_ratio)`` are important: the tokens the tower's [CLS] attends to
    most at its feature-selection layer. The rest, in descending [CLS]-attention order, are thinned
    by ``remove_duplicates`` on the tower's own features of that layer (before the projector) until
    ``k − important`` diverse tokens are left. Each image (on LLaVA-NeXT each crop: the base image and
    every anyres tile) is pruned on its own with an equal share of k; image_newline tokens go.

    Needs a vision tower with a [CLS] token (the CLIP of LLaVA-1.5 and LLaVA-NeXT): OneVision
    (SigLIP) and Qwen2-VL / 2.5-VL are refused.

    Parameters
    ----------
    important_ratio : float
        Share of the kept tokens chosen by [CLS] attention (the official default 0.5).
    """

    important_ratio: float = 0.5
    step: ClassVar[int] = 8  # even-place tokens dropped per de-duplication round (fixed in the official code)

    def __post_init__(self):
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner important_ratio must be in [0, 1], got {self.important_ratio}")

    def vision_request(self) -> VisionRequest:
        """[CLS] attention (important tokens) and the tower's features (de-duplication)."""
        return VisionRequest(cls_attention=True, features=True)

    def score(self, state: LayerState) -> torch.Tensor:
        """The [CLS] attention on each vision token (heads summed; the official mean orders them alike)."""
        return state.vision.cls_attention.float()

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per image (crop): important tokens, then the diverse ones left by de-duplication (class docstring)."""
        features = state.vision.features
        return select_per_group(
            state,
            scores,
            counts,
            lambda b, members, k: self.keep_in_group(features[b, members], scores[b, members], k),
        )

    def keep_in_group(self, features: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (into the group) of the ``k`` tokens VisPruner keeps of one image: important, then diverse."""
        if k >= len(scores):
            return torch.arange(len(scores), device=scores.device)
        important = int(k * self.important_ratio)
        order = torch.sort(scores, descending=True, stable=True).indices
        diverse = remove_duplicates(features, order[important:], k - important, self.step)
        return torch.cat([order[:important], diverse if k > important else diverse[:0]])

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """An estimate: the rounds' even-odd similarity products, at most n²·C/2 per round over n/8 rounds."""
        return n_vision**3 * hidden / 16.0
