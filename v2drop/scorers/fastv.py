"""FastV: drop the vision tokens the last prompt token attends to least at the layer before the drop.

The engine computes the one attention row from the layer's own projections
(``v2drop.attention``), so every layer may run with sdpa or FlashAttention; ``faithful=True``
reads it from the layer's full probability map instead, reproducing the original implementation's
memory cost. Definition: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from v2drop.scorers.base import AttentionRequest, LastTokenAttentionScorer, register_scorer


@register_scorer("fastv")
@dataclass
class FastVScorer(LastTokenAttentionScorer):
    """FastV: attention of the last prompt token at layer K−1, averaged over heads; drop at layer K.

    Parameters
    ----------
    faithful : bool
        Read the row from layer K−1's full (B, H, L, L) attention map (the official
        implementation's cost) instead of computing the one row.
    """

    source_layer_offset = -1
    faithful: bool = False

    def attention_request(self) -> AttentionRequest:
        """The last prompt token's row of layer K−1, from the full map when ``faithful``."""
        return AttentionRequest(layer_offset=self.source_layer_offset, full_map=self.faithful)
