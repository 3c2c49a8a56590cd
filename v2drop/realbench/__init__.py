"""Deprecated: the real benchmarks now live in ``v2drop.benchmarks`` beside ``digits``.

``import v2drop.realbench`` still works and gives the same objects (it emits a
DeprecationWarning): ``DataError``, ``HFBenchmark`` and ``VideoBenchmark`` here, the benchmark
modules as ``v2drop.realbench.<name>`` and the old helpers as ``v2drop.realbench.common``.
"""

import sys
import warnings

from v2drop import benchmarks as _benchmarks
from v2drop.benchmarks import DataError, HFBenchmark, VideoBenchmark

warnings.warn(
    "v2drop.realbench is deprecated; import from v2drop.benchmarks (and v2drop.benchmarks.metrics, "
    ".media, .hub, .prompts for the helpers of v2drop.realbench.common)",
    DeprecationWarning,
    stacklevel=2,
)

# The old module paths name the moved modules themselves, so classes stay identical objects.
for _name in ("gqa", "mmbench", "mme", "mvbench", "pope", "scienceqa", "textvqa", "videomme"):
    sys.modules[f"{__name__}.{_name}"] = getattr(_benchmarks, _name)
    globals()[_name] = getattr(_benchmarks, _name)

__all__ = ["DataError", "HFBenchmark", "VideoBenchmark"]
