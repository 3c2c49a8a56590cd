"""The pruning engine: ``generate`` runs a batch through the model with a method's drop stages.

``loop`` holds the prefill/decoding loop, ``stages`` the drop stage (serving a scorer's
declarations), ``sequence`` the bookkeeping of the shrinking prefill sequence.
"""

from v2drop.engine.loop import EngineOutput, SampleTrace, generate, sample_keys
from v2drop.scorers.base import select_keep

__all__ = ["EngineOutput", "SampleTrace", "generate", "sample_keys", "select_keep"]
