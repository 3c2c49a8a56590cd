"""Real benchmarks in their community formats (lmms-eval's Hugging Face copies, or a local copy in ``data_dir``).

Importing this package registers ``pope``, ``mme``, ``gqa``, ``mmbench``, ``scienceqa-img``,
``textvqa``, ``mvbench`` and ``videomme`` beside the synthetic ``digits`` benchmarks. Each class
docstring gives its dataset, local schema, prompt and metric; ``common`` holds the shared loading,
frame sampling, answer normalisation and option parsing.
"""

from v2drop.realbench import gqa, mmbench, mme, mvbench, pope, scienceqa, textvqa, videomme  # noqa: F401  (registration)
from v2drop.realbench.common import DataError, HFBenchmark, VideoBenchmark

__all__ = ["DataError", "HFBenchmark", "VideoBenchmark"]
