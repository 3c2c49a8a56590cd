"""Deprecated: V²Drop's scorer now lives in ``v2drop.scorers.v2drop``."""

import warnings

from v2drop.scorers.v2drop import METRICS, V2DropScorer

warnings.warn(
    "v2drop.scorers.variation is deprecated; import from v2drop.scorers.v2drop", DeprecationWarning, stacklevel=2
)

__all__ = ["METRICS", "V2DropScorer"]
