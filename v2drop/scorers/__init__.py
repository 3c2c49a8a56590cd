"""Token scorers, one module per method family.

Every module of this package is imported on the first registry lookup (``list_scorers``,
``build_scorer``, ...), so a module added here with a ``@register_scorer`` class is registered,
and checked by the contract suite, without being listed anywhere.
"""

from v2drop.scorers.base import (
    SCORERS,
    AttentionRequest,
    EncoderFeatures,
    EncoderRequest,
    LayerState,
    Merge,
    Scorer,
    Selection,
    VisionFeatures,
    VisionRequest,
    build_scorer,
    list_scorers,
    register_scorer,
    select_keep,
)

__all__ = [
    "SCORERS",
    "AttentionRequest",
    "EncoderFeatures",
    "EncoderRequest",
    "LayerState",
    "Merge",
    "Scorer",
    "Selection",
    "build_scorer",
    "list_scorers",
    "register_scorer",
    "select_keep",
    "VisionFeatures",
    "VisionRequest",
]
