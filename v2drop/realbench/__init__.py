"""Real benchmarks in their community formats (lmms-eval's Hugging Face copies or a local directory).

Importing this package registers ``pope``, ``mme``, ``gqa``, ``mmbench``, ``scienceqa-img``,
``textvqa``, ``mvbench`` and ``videomme``.
"""

from v2drop.realbench import image, video  # noqa: F401  (registration on import)
