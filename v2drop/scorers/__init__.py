"""Token scorers; importing this package registers the built-in ones."""

from v2drop.scorers.base import SCORERS, LayerState, Scorer, build_scorer, list_scorers, register_scorer
from v2drop.scorers import attention_based, baselines, variation  # noqa: F401  (registration on import)

__all__ = ["SCORERS", "LayerState", "Scorer", "build_scorer", "list_scorers", "register_scorer"]
