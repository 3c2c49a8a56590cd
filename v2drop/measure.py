"""Deprecated: measurement and the FLOPs model moved to ``v2drop.cost``."""

import warnings

from v2drop.cost import PeakMemory, environment, layer_flops, prefill_flops

warnings.warn("v2drop.measure is deprecated; import from v2drop.cost", DeprecationWarning, stacklevel=2)

__all__ = ["PeakMemory", "environment", "layer_flops", "prefill_flops"]
