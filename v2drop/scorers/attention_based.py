"""Deprecated: FastV, PDrop and SparseVLM now live in ``v2drop.scorers.fastv``, ``.pdrop`` and ``.sparsevlm``."""

import warnings

from v2drop.scorers.base import vision_columns
from v2drop.scorers.fastv import FastVScorer
from v2drop.scorers.pdrop import PDropScorer
from v2drop.scorers.sparsevlm import SparseVLMScorer, density_peak_clusters, select_raters

warnings.warn(
    "v2drop.scorers.attention_based is deprecated; import from v2drop.scorers.fastv, .pdrop or .sparsevlm",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["FastVScorer", "PDropScorer", "SparseVLMScorer", "density_peak_clusters", "select_raters", "vision_columns"]
