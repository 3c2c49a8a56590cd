"""PyramidDrop: at each stage, drop the vision tokens the last instruction token attends to least.

Definition: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from v2drop.scorers.base import LastTokenAttentionScorer, register_scorer


@register_scorer("pdrop")
@dataclass
class PDropScorer(LastTokenAttentionScorer):
    """PyramidDrop: the last instruction token's attention through layer l's norm, q/k and RoPE, head-averaged.

    The row is computed on layer l's input before the layer runs, as the official code does; pair it
    with ``position_policy: renumber`` to reproduce the official position handling. The last
    instruction token is the last prompt token (the default attention query).
    """

    source_layer_offset = 0
