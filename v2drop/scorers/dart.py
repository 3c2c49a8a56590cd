"""DART: keep the vision tokens least duplicated by a few pivot tokens (arXiv 2502.11494).

Pivots are the tokens with the largest key norm (some vision tokens, some text tokens after the
image); each pivot then claims the vision tokens least cosine-similar to it, and the claimed
tokens plus the vision pivots stay. As in the official code, the keys are the ones the layer
before the drop layer cached (after RoPE) and the similarity is measured on the drop layer's
input passed through the model's final norm. Definition: ``docs/methods.md``.

Official code (LLaVA): ``get_retained_image_token`` in
``llava/model/language_model/modeling_llama_self.py`` of ``ZichenWen1/DART`` (read in the fork
``xqy1111111/DART`` at commit 0247657060a42dd329d6f273455bfad05d5b2c74). ``pivot_order="official"``
reproduces its pivot visiting order and per-pivot count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Scorer, Selection, register_scorer, select_keep


def claim_least_similar(
    features: torch.Tensor, pivots: list[int], candidates: list[int], quotas: list[int]
) -> list[int]:
    """DART's greedy step: pivot after pivot, claim the candidates least cosine-similar to it.

    Parameters
    ----------
    features : Tensor (N, D)
        Token features the similarity is measured on.
    pivots : list of int
        Rows of ``features`` that are pivots, in processing order.
    candidates : list of int
        Rows that may be claimed (never a pivot), ascending.
    quotas : list of int
        How many candidates each pivot claims; a claimed row is gone for the following pivots.

    Returns
    -------
    list of int: the claimed rows (unordered).
    """
    feats = features.float()
    remaining = torch.tensor(candidates, dtype=torch.long, device=features.device)
    claimed: list[int] = []
    for pivot, quota in zip(pivots, quotas):
        if quota <= 0 or remaining.numel() == 0:
            continue
        similarity = F.cosine_similarity(feats[pivot][None], feats[remaining], dim=-1)
        # Least similar first; ties go to the lower row (the official topk leaves ties unspecified).
        order = torch.sort(similarity, stable=True).indices[:quota]
        claimed += remaining[order].tolist()
        taken = torch.zeros(remaining.numel(), dtype=torch.bool, device=remaining.device)
        taken[order] = True
        remaining = remaining[~taken]
    return claimed


def official_pivot_order(image_positions: list[int], text_positions: list[int]) -> list[int]:
    """The order the official DART loop visits its pivots: that of a CPython ``set`` of their positions.

    The official code builds ``set(image_positions + text_positions)`` (each list in descending
    key-norm order, as ``topk`` returns it), copies it and iterates the copy. CPython's set of small
    ints is a hash table with hash = value, so the order is by ``position mod table size`` (8 for up
    to 4 pivots, 16 for 5 to 7, 32 for 8), collisions resolved by probing: deterministic for given
    positions. Building the same set the same way gives exactly that order.
    """
    return list(set(image_positions + text_positions).copy())


@register_scorer("dart")
@dataclass
class DARTScorer(Scorer):
    """DART (duplication-aware reduction of tokens), one drop stage at layer K (official K = 2).

    ``score``: the L1 norm of each vision token's key as layer K − 1 cached it (after RoPE; the
    pivot criterion). ``select``: the ``pivot_image`` vision tokens and the ``pivot_text`` text
    tokens after the last vision token with the largest key norms are the pivots; with ``k``
    tokens to keep, the ``k − pivot_image`` others are shared out over the pivots (in position
    order, the first pivots one more when it does not divide) and each pivot claims its share of
    the remaining vision tokens least cosine-similar to it (features = the model's final norm of
    layer K's input, i.e. of layer K − 1's output). Kept: the vision pivots and every claimed token.

    Parameters
    ----------
    pivot_image : int
        Vision pivots (official default 4).
    pivot_text : int
        Text pivots, among the tokens after the last vision token (official default 4).
    pivot_order : {"position", "official"}
        ``position``: pivots visited in position order (vision, then text), the ``k − pivot_image``
        places shared out with shares differing by at most one, so any ``k`` is reached.
        ``official``: the official code's rule, pivots visited in the iteration order of a Python
        ``set`` of their positions in the sample's unpadded sequence (``official_pivot_order``) and
        every pivot claiming ``⌊(k − pivot_image) / pivots⌋`` tokens (the official ``TOKEN_TOPK``;
        ``k = pivot_image + pivots·t`` keeps exactly ``k``, any other ``k`` keeps fewer).
    """

    needs_prev_keys: ClassVar[bool] = True

    pivot_image: int = 4
    pivot_text: int = 4
    pivot_order: Literal["position", "official"] = "position"

    def __post_init__(self):
        for name in ("pivot_image", "pivot_text"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"dart {name} must be an integer >= 0, got {value!r}")
        if self.pivot_image + self.pivot_text < 1:
            raise ValueError(
                f"dart needs at least one pivot, got pivot_image={self.pivot_image}, pivot_text={self.pivot_text}"
            )
        if self.pivot_order not in ("position", "official"):
            raise ValueError(f"dart pivot_order must be 'position' or 'official', got {self.pivot_order!r}")

    def score(self, state: LayerState) -> torch.Tensor:
        """L1 norm of each vision token's cached layer K − 1 key, (B, V) float32."""
        keys = state.prev_keys.gather(1, state.vision_idx[..., None].expand(-1, -1, state.prev_keys.shape[-1]))
        return keys.float().abs().sum(-1)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample: the vision pivots (top key norms) plus the tokens the pivots claim (see the class docstring)."""
        n_valid = state.vision_valid.sum(1).tolist()
        return Selection(
            keep=[self.keep_sample(state, b, scores[b, :n], k) for b, (n, k) in enumerate(zip(n_valid, counts))]
        )

    def keep_sample(self, state: LayerState, b: int, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Ascending indices (into ``state.vision_idx[b]``) of the ``k`` vision tokens sample ``b`` keeps."""
        n = scores.shape[0]
        if k >= n:
            return torch.arange(n, device=scores.device)
        image_pivots = select_keep(scores, min(self.pivot_image, k))
        if k <= self.pivot_image:
            return image_pivots
        vision_pos = state.vision_idx[b, :n]
        positions = torch.arange(state.hidden.shape[1], device=vision_pos.device)
        text_after = (positions > vision_pos.max()) & state.attention_mask[b].bool()
        text_pos = positions[text_after]
        text_pivots = []
        if self.pivot_text and text_pos.numel():
            text_norms = state.prev_keys[b, text_pos].float().abs().sum(-1)
            text_pivots = select_keep(text_norms, min(self.pivot_text, text_pos.numel())).tolist()
        # One feature table: the n vision tokens, then the text tokens after them.
        features = state.final_norm(torch.cat([state.hidden[b, vision_pos], state.hidden[b, text_pos]]))
        pivots = image_pivots.tolist() + [n + t for t in text_pivots]  # position order: vision before the text after it
        if not pivots:  # no vision pivot asked for and no text after the image: the key norms alone decide
            return select_keep(scores, k)
        is_pivot = torch.zeros(n, dtype=torch.bool)
        is_pivot[image_pivots.cpu()] = True
        candidates = [i for i in range(n) if not is_pivot[i]]
        if self.pivot_order == "official":
            pivots = self.official_pivots(state, b, scores, text_pos, text_pivots)
            quotas = [(k - len(image_pivots)) // len(pivots)] * len(pivots)
        else:
            share, extra = divmod(k - len(image_pivots), len(pivots))
            quotas = [share + (1 if i < extra else 0) for i in range(len(pivots))]
        claimed = claim_least_similar(features, pivots, candidates, quotas)
        keep = torch.tensor(image_pivots.tolist() + claimed, dtype=torch.long, device=scores.device)
        return keep.sort().values

    def official_pivots(
        self, state: LayerState, b: int, scores: torch.Tensor, text_pos: torch.Tensor, text_pivots: list[int]
    ) -> list[int]:
        """The pivots as rows of the feature table (vision tokens, then the text after them), in the official order.

        Positions are counted in sample ``b``'s unpadded sequence (the official code runs one
        unpadded sample); each pivot group is listed in descending key norm, as ``topk`` gives it.
        """
        n = scores.shape[0]
        start = int(state.attention_mask[b].long().argmax())  # left padding before the sample's first token
        vision_pos = state.vision_idx[b, :n].tolist()
        image_rows = torch.sort(scores, descending=True, stable=True).indices[: self.pivot_image].tolist()
        text_norms = state.prev_keys[b, text_pos].float().abs().sum(-1) if text_pivots else None
        text_rows = (
            torch.sort(text_norms, descending=True, stable=True).indices[: len(text_pivots)].tolist()
            if text_pivots
            else []
        )
        row_of = {vision_pos[i] - start: i for i in image_rows}
        row_of.update({int(text_pos[t]) - start: n + t for t in text_rows})
        order = official_pivot_order(
            [vision_pos[i] - start for i in image_rows], [int(text_pos[t]) - start for t in text_rows]
        )
        return [row_of[p] for p in order]

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The keys come from the cache: their L1 norms and the final norm of the tokens (bounded by 4·n·D),
        then each pivot's cosine to every vision token."""
        pivots = self.pivot_image + self.pivot_text
        return 4.0 * n_tokens * hidden + 3.0 * pivots * n_vision * hidden
