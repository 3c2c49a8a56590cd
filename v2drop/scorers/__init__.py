"""Token scorers, one module per method family; importing this package registers the built-in ones."""

from v2drop.scorers import baselines, composite, dart, divprune, fastv, pdrop, sparsevlm, v2drop, visionzip  # noqa: F401,E402  (registration on import)
from v2drop.scorers.base import (
    SCORERS,
    AttentionRequest,
    LayerState,
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
    "LayerState",
    "Scorer",
    "Selection",
    "build_scorer",
    "list_scorers",
    "register_scorer",
    "select_keep",
    "VisionFeatures",
    "VisionRequest",
]
