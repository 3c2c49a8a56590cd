"""VisionZip: dominant tokens by the vision tower's [CLS] attention, the rest merged into contextual tokens.

Official code: ``dvlab-research/VisionZip``, ``visionzip/clip_encoder.py`` (lines 43-85) and
``visionzip/utils.py`` (the head-averaged keys, line 89); ``visionzip/main.py`` line 7 (the
dominant count includes the [CLS] token). Definition and differences: ``docs/methods.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from v2drop.scorers.base import LayerState, Scorer, Selection, VisionRequest, register_scorer, select_keep


@register_scorer("visionzip")
@dataclass
class VisionZipScorer(Scorer):
    """VisionZip (Yang et al., CVPR 2025) at a stage keeping k vision tokens.

    Of the k, ``c = round(k · contextual_ratio)`` are contextual and ``k − c`` dominant. At the
    pre-LLM stage the dominant ones are each image's [CLS] token (projected) plus the patches the
    [CLS] attends to most (heads summed) at the tower's feature-selection layer; at a later stage
    only patches. The remaining patches, in order, give ``c`` evenly spaced targets; every other
    remaining patch joins the target whose head-averaged key is most cosine-similar, and a
    contextual token is the target's hidden state plus the mean of the hidden states that joined it.

    Needs a vision tower with a [CLS] token (LLaVA-1.5's CLIP): other families are refused.

    Parameters
    ----------
    contextual_ratio : float
        Share of the kept tokens that are contextual: 10/64 gives the official 54+10, 108+20 and
        162+30 for 64, 128 and 192 tokens.
    """

    contextual_ratio: float = 10 / 64

    def __post_init__(self):
        if not 0.0 <= self.contextual_ratio <= 1.0:
            raise ValueError(f"visionzip contextual_ratio must be in [0, 1], got {self.contextual_ratio}")

    def vision_request(self) -> VisionRequest:
        """[CLS] attention (dominant), keys (contextual assignment) and projected [CLS] tokens."""
        return VisionRequest(cls_attention=True, keys=True, cls_embeds=True)

    def score(self, state: LayerState) -> torch.Tensor:
        """The head-summed [CLS] attention on each vision token, (B, V) float32."""
        return state.vision.cls_attention.float()

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Dominant tokens kept, [CLS] and contextual tokens added (see the class docstring)."""
        keep, added_hidden, added_source = [], [], []
        D = state.hidden.shape[-1]
        for b, (n, k) in enumerate(zip(state.vision_valid.sum(1).tolist(), counts)):
            hidden = state.hidden.new_zeros(0, D, dtype=torch.float32)
            source = torch.zeros(0, dtype=torch.long, device=scores.device)
            if k >= n:  # nothing to drop: keep every token as it is
                keep.append(torch.arange(n, device=scores.device))
                added_hidden.append(hidden)
                added_source.append(source)
                continue
            contextual = min(math.floor(k * self.contextual_ratio + 0.5), k)
            cls = state.vision.cls_embeds[b] if state.layer_idx < 0 and state.vision.cls_embeds is not None else None
            n_cls = min(len(cls), k - contextual) if cls is not None else 0
            dominant = select_keep(scores[b, :n], k - contextual - n_cls)
            rest = torch.ones(n, dtype=torch.bool, device=scores.device)
            rest[dominant] = False
            rest = rest.nonzero().flatten()
            contextual = min(contextual, len(rest))
            if n_cls:
                images = state.vision_coords[b, :n, 0]
                firsts = torch.stack([(images == i).nonzero()[0, 0] for i in images.unique()[:n_cls]])
                hidden = torch.cat([hidden, cls[:n_cls].float()])
                source = torch.cat([source, firsts])
            if contextual:
                step = max(1, len(rest) // contextual)
                is_target = torch.zeros(len(rest), dtype=torch.bool, device=scores.device)
                is_target[torch.arange(0, len(rest), step, device=scores.device)[:contextual]] = True
                keys = state.vision.keys[b, rest].float()
                keys = keys / keys.norm(dim=-1, keepdim=True)
                assign = (keys[~is_target] @ keys[is_target].T).argmax(dim=1)
                h = state.hidden[b, state.vision_idx[b, rest]].float()
                sums = torch.zeros(contextual, D, device=h.device).index_add_(0, assign, h[~is_target])
                sizes = torch.bincount(assign, minlength=contextual).clamp(min=1)[:, None]
                hidden = torch.cat([hidden, h[is_target] + sums / sizes])
                source = torch.cat([source, rest[is_target]])
            keep.append(dominant)
            added_hidden.append(hidden)
            added_source.append(source)
        return Selection(keep=keep, added_hidden=added_hidden, added_source=added_source)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """An estimate: the [CLS] row against every patch key and the merge (about 4·n·D)."""
        return 4.0 * n_vision * hidden
