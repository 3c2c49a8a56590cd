"""Benchmarks: a registry of question sets, each with its own loading and metric."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from v2drop.registry import Registry


@dataclass(frozen=True)
class Sample:
    """One question about one image (or the frames of one video).

    Attributes
    ----------
    id, question, answer, family : str
    images : tuple of PIL.Image
        One for image benchmarks, the frames for video.
    evidence : tuple of int
        Vision-token indices (0-based over all the sample's tokens, images in order, each image's
        tokens in raster order) covering the objects the answer depends on; empty when unknown.
    choices : tuple of str
        Multiple-choice options, if any.
    """

    id: str
    question: str
    answer: str
    family: str
    images: tuple
    evidence: tuple = ()
    choices: tuple = ()


class Benchmark:
    """Base class: ``load`` samples of a split, decide ``is_correct``, ``aggregate`` records."""

    name: str = ""
    modality: str = "image"  # "image" or "video"
    families: tuple[str, ...] = ()

    def load(self, split: str, limit: int | None = None) -> list[Sample]:
        """Samples of ``split`` (first ``limit``)."""
        raise NotImplementedError

    def is_correct(self, prediction: str, sample: Sample) -> bool:
        """Exact match after ``normalize_answer``."""
        return normalize_answer(prediction) == normalize_answer(sample.answer)

    def aggregate(self, records: list[dict]) -> dict:
        """Accuracy overall (mean over samples) and per family; ``records`` carry family and correct."""
        if not records:
            raise ValueError(f"No records to aggregate for {self.name!r}")
        per: dict[str, list[bool]] = {}
        for r in records:
            per.setdefault(r["family"], []).append(bool(r["correct"]))
        return {
            "accuracy": sum(bool(r["correct"]) for r in records) / len(records),
            "per_family": {f: sum(v) / len(v) for f, v in sorted(per.items())},
            "n": len(records),
        }


def normalize_answer(text: str) -> str:
    """Lower case, first word only, surrounding punctuation removed ("A." -> "a", "Yes, it is" -> "yes")."""
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark", base_cls=Benchmark)


def register_benchmark(name: str):
    """Class decorator registering a ``Benchmark`` subclass under ``name``."""

    def decorator(cls):
        cls.name = name
        return BENCHMARKS.register(name)(cls)

    return decorator


def get_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """An instance of benchmark ``name``; an unknown name lists the registered ones."""
    if name not in BENCHMARKS:
        import v2drop.realbench  # noqa: F401  (registers the real benchmarks on first use)
    cls = BENCHMARKS.get(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return cls(**kwargs)
    except TypeError as err:
        if kwargs and "unexpected keyword" in str(err):
            raise ValueError(f"Benchmark {name!r} does not take {sorted(kwargs)} ({err})") from None
        raise


def list_benchmarks(pattern: str = "*") -> list[str]:
    """Sorted registered benchmark names."""
    import v2drop.realbench  # noqa: F401
    return BENCHMARKS.names(pattern)


from v2drop.benchmarks import digits  # noqa: E402,F401  (registration on import)

__all__ = ["BENCHMARKS", "Benchmark", "Sample", "get_benchmark", "list_benchmarks", "normalize_answer", "register_benchmark"]
