"""V²Drop: drop the vision tokens the previous layer changed least ("lazy" tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Scorer, register_scorer

METRICS = ("l2", "l1", "cosine")


@register_scorer("v2drop")
@dataclass
class V2DropScorer(Scorer):
    """Token variation between consecutive layers (V²Drop, arXiv 2509.01552).

    The score of a vision token at drop layer ``l`` is the size of layer ``l-1``'s update to it:
    a distance between its input to layer ``l`` and its input to layer ``l-1``. Computed in
    float32 even for half-precision models (the official code does not; see ``docs/methods.md``).

    Parameters
    ----------
    metric : {"l2", "l1", "cosine"}
        ``l2`` = ‖x⁽ˡ⁾ − x⁽ˡ⁻¹⁾‖₂ (paper default), ``l1`` = ‖·‖₁, ``cosine`` = 1 − cos(x⁽ˡ⁾, x⁽ˡ⁻¹⁾).
    """

    metric: str = "l2"
    needs_prev_hidden = True

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"v2drop metric must be one of {METRICS}, got {self.metric!r}")

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """About 3·M·D: a difference, a square (or abs) and a sum per element (``docs/methods.md``)."""
        return 3.0 * n_vision * hidden

    def score(self, state: LayerState) -> torch.Tensor:
        """Distance between each vision token's input to this layer and to the layer before, (B, V) float32."""
        # Per-token distances over the whole sequence, then one cheap gather of B x V scalars:
        # faster on CPU than gathering (B, V, D) rows first.
        cur, prev = state.hidden.float(), state.prev_hidden.float()  # (B, L, D)
        if self.metric == "l2":
            dist = torch.linalg.vector_norm(cur - prev, ord=2, dim=-1)
        elif self.metric == "l1":
            dist = torch.linalg.vector_norm(cur - prev, ord=1, dim=-1)
        else:
            dist = 1.0 - F.cosine_similarity(cur, prev, dim=-1)
        return dist.gather(1, state.vision_idx)  # (B, V)
