"""FlowCut: pruning inside the vision encoder by information flow, layer by layer, to a budget at its end.

Official code: ``TungChintao/FlowCut`` @ a2ecd247cb3c605773ec317a0c246425b47abdbe,
``flowcut/modeling_clip_flowcut.py`` (``CLIPAttention_forward``: the [CLS] value row against every value;
``CLIPEncoderLayer_forward``: the score, its running average and the pruning at every other layer) and
``flowcut/utils_flowcut.py`` (``compute_score``, ``adaptive_prune_ratio``). Definition and differences:
``docs/methods.md`` ("FlowCut").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.schedule import is_vision_layer, layer_name
from v2drop.scorers.base import EncoderRequest, LayerState, Scorer, Selection, register_scorer, select_keep


def flowcut_scores(attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(n, P) FlowCut's information-flow score of every patch from one encoder layer's (n, H, T, T) attention
    probabilities and (n, H, T, hd) values ([CLS] at position 0, P = T - 1 patches).

    ``(relation / Σ relation + semantic / Σ semantic) · ‖v̄‖₁``: relation is the [CLS] query's
    attention on the patch (heads averaged); semantic is the softmax over all tokens of the [CLS]
    value's dot product with each value (per head, unscaled, then heads averaged); ``v̄`` is the
    patch's head-averaged value vector.
    """
    relation = attention[:, :, 0, 1:].mean(1)
    cls_value = values[:, :, :1]
    semantic = torch.softmax(cls_value @ values.transpose(-1, -2), dim=-1)[:, :, 0].mean(1)[:, 1:]
    magnitude = values.mean(1)[:, 1:].abs().sum(-1)
    return (relation / relation.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * magnitude


def adaptive_prune(relation: torch.Tensor, remaining: int, target: int) -> int:
    """FlowCut's count of patches to drop ``remaining`` encoder layers before the stage reaching ``target``.

    ``round((n − target) / √remaining · (1 − (H / log n)²))`` for the n present patches' [CLS]
    attention ``relation`` (n,), normalised to a distribution of entropy H: a flat [CLS] attention
    (H near log n) drops little, a peaked one much. Rounds half to even, as ``torch.round``.
    """
    n = relation.shape[-1]
    prob = relation / relation.sum()
    ratio = -(prob * torch.log(prob)).sum() / torch.log(torch.tensor(float(n)))
    r = (n - target) / remaining**0.5 * (1 - ratio**2)
    return int(torch.round(r))


@register_scorer("flowcut")
@dataclass
class FlowCutScorer(Scorer):
    """FlowCut (Tong et al., NeurIPS 2025) inside the vision encoder, before every encoder layer up to a stage.

    Before each encoder layer ``l`` from 1 up to the stage ``vision:<s>`` (from the previous stage
    on, if any), every tower image's patches get ``flowcut_scores`` of encoder layer ``l − 1`` (the
    layer that produced them), averaged with those of the layer before (``0.5 · previous + 0.5 ·
    current``; the first layer's are its own). With ``r = s − l`` layers left and k the stage's
    count: where r is odd nothing is dropped; where r is even and positive, the highest averages
    ``max(k, n − adaptive_prune(...))`` of the n present patches stay; at the stage (r = 0), k.
    Ties go to the lower index. The official schedule (presets ``flowcut-llava15-*``) is one stage
    before the layer that produces the feature-selection layer's output (``vision:22`` of LLaVA-1.5's CLIP).

    Runs only at vision-encoder stages of a tower with a [CLS] token (LLaVA-1.5's CLIP).
    """

    def encoder_request(self) -> EncoderRequest:
        """The previous encoder layer's attention probabilities and values, before every encoder layer."""
        return EncoderRequest(attention=True, values=True, every_layer=True)

    def check_layer(self, layer_idx: int) -> None:
        """Vision-encoder stages after the first encoder layer only."""
        if not is_vision_layer(layer_idx):
            where = "the pre-LLM stage" if layer_idx < 0 else f"decoder layer {layer_idx}"
            raise ValueError(
                f"flowcut prunes inside the vision encoder: its stages are 'vision:<l>' (l >= 1), got {where}"
            )
        if layer_name(layer_idx) == "vision:0":
            raise ValueError(
                "flowcut reads the attention of the encoder layer before its stage: use 'vision:<l>', l >= 1"
            )

    def score(self, state: LayerState) -> torch.Tensor:
        """The running average of ``flowcut_scores`` over the encoder layers so far, (1, P) float32."""
        enc = state.encoder
        scores = flowcut_scores(enc.attention, enc.values)
        return scores if enc.prev_scores is None else 0.5 * enc.prev_scores + 0.5 * scores

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Nothing dropped an odd number of layers before the stage; else ``max(k, n − adaptive_prune)``, k at it."""
        enc = state.encoder
        remaining = enc.next_stage - enc.layer
        keep = []
        for b, k in enumerate(counts):
            n = scores.shape[1]
            if remaining % 2:
                k = n
            elif k < n and remaining > 0:
                relation = enc.attention[b, :, 0, 1:].mean(0)
                k = max(k, n - adaptive_prune(relation, remaining, k))
            keep.append(select_keep(scores[b], min(k, n)))
        return Selection(keep=keep)
