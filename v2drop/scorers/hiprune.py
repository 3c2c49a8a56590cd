"""HiPrune: anchors by a middle encoder layer's attention, their grid neighbours as buffers, registers by a deep one.

Official code: ``Danielement321/HiPrune``, ``LLaVA/llava/model/llava_arch.py`` (``encode_images``, lines
140-180) and ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``, every layer's
attention); settings in its ``README.md`` (``HIPRUNE_ALPHA`` 0.1, ``HIPRUNE_OBJECT_LAYER`` 9 for LLaVA).
Definition and differences: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.scorers.base import LayerState, Scorer, Selection, VisionRequest, is_tower_layer, register_scorer
from v2drop.scorers.vispruner import select_per_group


def hiprune_keep(shallow: torch.Tensor, deep: torch.Tensor, k: int, alpha: float, width: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` tokens HiPrune keeps of one image laid out row by row, ``width`` per row.

    ``shallow`` and ``deep`` (n,) are the attention each token receives in the object layer and the
    deep layer. Anchors: the ``round(k · alpha / 5)`` tokens the object layer attends to most;
    buffers: each anchor's flat neighbours ``±1`` and ``±width``, clamped to ``[0, n − 1]``;
    registers: the tokens of the rest with the largest deep attention, up to ``k``. Ties go to the
    lower index. Where anchors and buffers alone exceed ``k`` they are cut to ``k`` in the official
    concatenation order: the anchors, then their ``−1``, ``+1``, ``−width`` and ``+width`` neighbours.
    """
    n = len(shallow)
    anchors = torch.sort(shallow, descending=True, stable=True).indices[: round(k * alpha / 5)]
    offsets = torch.tensor([0, -1, 1, -width, width], device=shallow.device)
    near = (anchors[None, :] + offsets[:, None]).clamp(0, n - 1)  # (5, a): all anchors, then their -1, +1, ...
    seen = torch.zeros(n, dtype=torch.bool, device=shallow.device)
    chosen = []
    for j in near.flatten().tolist():
        if not seen[j] and len(chosen) < k:
            seen[j] = True
            chosen.append(j)
    rest = deep.float().masked_fill(seen, float("-inf"))
    registers = torch.sort(rest, descending=True, stable=True).indices[: k - len(chosen)]
    chosen = torch.tensor(chosen, dtype=torch.long, device=shallow.device)
    return torch.cat([chosen, registers]).sort().values


@register_scorer("hiprune")
@dataclass
class HiPruneScorer(Scorer):
    """HiPrune (training-free, hierarchical encoder attention) at a stage keeping k vision tokens.

    Each image (on LLaVA-NeXT each crop) keeps an equal share of k by ``hiprune_keep``: anchors by
    the received attention of the tower's ``object_layer``, their four grid neighbours as buffers,
    the rest by the received attention of the feature-selection layer. Received attention is the
    attention each patch gets from all of the layer's tokens, averaged over heads and queries.

    Needs a vision tower with a [CLS] token (the CLIP of LLaVA-1.5 and LLaVA-NeXT): OneVision
    (SigLIP) and Qwen2-VL / 2.5-VL are refused.

    Parameters
    ----------
    alpha : float
        Anchors and buffers are about this share of the kept tokens: ``round(k · alpha / 5)`` anchors.
    object_layer : int or float
        The tower layer whose attention picks the anchors, numbered as ``vision_feature_layer``, or a
        float in (0, 1): that share of the tower's depth, rounded. The default 0.375 is layer 9 of
        LLaVA's 24-layer CLIP (``attentions[8]``, the official setting) and a middle layer of any tower.
    """

    alpha: float = 0.1
    object_layer: int | float = 0.375

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"hiprune alpha must be in [0, 1], got {self.alpha}")
        if self.object_layer is None or not is_tower_layer(self.object_layer):
            raise ValueError(
                "hiprune object_layer must be a nonzero int (a tower layer) or a float in (0, 1) (a share of the "
                f"tower's depth), got {self.object_layer!r}"
            )

    def vision_request(self) -> VisionRequest:
        """The received attention of the object layer and of the feature-selection layer (None)."""
        return VisionRequest(cls_attention=True, received_layers=(self.object_layer, None))

    def score(self, state: LayerState) -> torch.Tensor:
        """The received attention of the feature-selection layer on each vision token, (B, V) float32."""
        return state.vision.received[None].float()

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per image (crop): anchors, buffers and registers (class docstring)."""
        shallow = state.vision.received[self.object_layer]

        def pick(b: int, members: torch.Tensor, k: int) -> torch.Tensor:
            if k >= len(members):
                return torch.arange(len(members), device=members.device)
            width = int(state.vision_coords[b, members, 2].max()) + 1
            return hiprune_keep(shallow[b, members], scores[b, members], k, self.alpha, width)

        return select_per_group(state, scores, counts, pick)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """Nothing beyond sorting two attention vectors (the tower's attention maps are outside the LLM FLOPs)."""
        return 0.0
