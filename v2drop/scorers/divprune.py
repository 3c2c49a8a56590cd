"""DivPrune: keep the most diverse subset of the vision tokens (max–min cosine distance, greedy).

Official code: ``vbdi/divprune``, ``LLaVA/llava/model/llava_arch.py`` (``DivPrune``, lines
147-171), run on the projected vision tokens before the LLM. Definition and differences:
``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Scorer, register_scorer


def greedy_diverse_order(features: torch.Tensor) -> torch.Tensor:
    """The order in which DivPrune's greedy max–min selection picks the rows of ``features`` (n, D).

    Distances are cosine distances 1 − cos. The first pick is the token whose nearest other token
    is farthest; each later pick is the token whose distance to the already picked set (its
    minimum over them) is largest. Ties go to the lower index (``torch.argmax``). The first k
    entries are DivPrune's kept set for a budget of k, for every k.
    """
    n = features.shape[0]
    unit = F.normalize(features.float(), dim=-1)
    dist = 1.0 - unit @ unit.T
    others = dist.clone()
    others.fill_diagonal_(float("inf"))
    to_set = others.min(dim=0).values  # first pick: distance to the nearest other token
    picked = torch.zeros(n, dtype=torch.bool, device=features.device)
    order = torch.empty(n, dtype=torch.long, device=features.device)
    for i in range(n):
        j = int(torch.argmax(to_set.masked_fill(picked, float("-inf"))))
        order[i], picked[j] = j, True
        to_set = dist[j].clone() if i == 0 else torch.minimum(to_set, dist[j])
    return order


@register_scorer("divprune")
@dataclass
class DivPruneScorer(Scorer):
    """DivPrune (Alvar et al., CVPR 2025): the max–min diverse subset of the vision tokens' features.

    Reads the current hidden states of the vision tokens, so it runs at any stage: at the pre-LLM
    stage (layer -1, as the official code does) they are the projected vision features. The score
    of a token is ``n − its position in the greedy order``, so the top-k scores are the first k
    greedy picks. Each sample is one set (all of its images together).
    """

    def score(self, state: LayerState) -> torch.Tensor:
        """n − greedy pick order per sample (padded entries −inf), float32."""
        B, V = state.vision_idx.shape
        D = state.hidden.shape[-1]
        feats = state.hidden.gather(1, state.vision_idx[..., None].expand(-1, -1, D))
        out = torch.full((B, V), float("-inf"), device=state.hidden.device)
        for b, n in enumerate(state.vision_valid.sum(1).tolist()):
            if n:
                order = greedy_diverse_order(feats[b, :n])
                out[b, order] = torch.arange(n, 0, -1, device=out.device, dtype=out.dtype)
        return out

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The cosine-distance matrix (2·n²·D plus 3·n·D to normalise) and the greedy passes (~2·n²)."""
        return 2.0 * n_vision * n_vision * hidden + 3.0 * n_vision * hidden + 2.0 * n_vision * n_vision
