"""Benchmarks: the synthetic ``digits`` worlds and the real image and video benchmarks, in one registry.

The first registry lookup (``list_benchmarks``, ``get_benchmark``, ...) imports every module of
this package, which registers every benchmark (``digits``, ``digits-video``, ``pope``, ``mme``,
``gqa``, ``mmbench``, ``scienceqa-img``, ``textvqa``, ``mvbench``, ``videomme``), so a module
added here registers without being listed anywhere and ``list_benchmarks()`` is the same
whatever ran before; no dataset is read at import. Layout:
``base`` (``Sample``, ``Benchmark`` and its splits, the registry), ``reading`` (the reference
scorers' answer readings, lmms-eval's and LLaVA-1.5's, chosen per benchmark by ``answer_reading``),
``vqa`` (EvalAI's answer normaliser), ``metrics`` (the shared scoring rules), ``prompts``,
``media`` (images, videos, frame sampling), ``hub`` (rows from the Hugging Face hub or a local
copy), and one module per benchmark. Each benchmark's splits, schema, prompt and metric are in
its class docstring and in ``docs/benchmarks.md``.
"""

from v2drop.benchmarks.base import (
    BENCHMARKS,
    Benchmark,
    DataError,
    Sample,
    check_limit,
    get_benchmark,
    list_benchmarks,
    register_benchmark,
)
from v2drop.benchmarks.hub import HFBenchmark, VideoBenchmark
from v2drop.benchmarks.metrics import normalize_answer

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DataError",
    "HFBenchmark",
    "Sample",
    "VideoBenchmark",
    "check_limit",
    "get_benchmark",
    "list_benchmarks",
    "normalize_answer",
    "register_benchmark",
]
