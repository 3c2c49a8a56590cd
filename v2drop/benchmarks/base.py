"""What every benchmark is: ``Sample``, the ``Benchmark`` base class with its splits, and the registry.

Benchmark modules import from here (never from the package ``v2drop.benchmarks``), so the
package can import them all eagerly without an import cycle.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from v2drop.benchmarks.metrics import exact_match, mean, per_family_accuracy
from v2drop.registry import Registry


class DataError(ValueError):
    """A benchmark's data is missing, unreadable or not in its schema (a ``ValueError``, so the CLI reports it)."""


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
    """Base class: ``load`` samples of a split, decide ``is_correct``, ``aggregate`` records.

    A subclass declares the split names it accepts (``splits``) and which one ``load`` reads when
    given none (``default_split``), and implements ``load_split``, which receives a split already
    checked by ``resolve_split`` and a checked ``limit``.
    """

    name: str = ""
    modality: str = "image"  # "image" or "video"
    families: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("test",)  # every split name load accepts
    default_split: str = "test"  # the split load reads when given none
    paper_metric: str = "accuracy"  # the aggregate key papers' tables report (experiments.report's cells)

    def resolve_split(self, split: str | None) -> str:
        """``split``, or ``default_split`` for None; a split not in ``splits`` is a ValueError listing them."""
        if split is None:
            return self.default_split
        if split not in self.splits:
            raise ValueError(f"Benchmark {self.name!r} has no split {split!r}; valid splits: {', '.join(self.splits)} "
                             f"(default {self.default_split!r})")
        return split

    def load(self, split: str | None = None, limit: int | None = None) -> list[Sample]:
        """Samples of ``split`` (``default_split`` when None), the first ``limit`` of them when given."""
        return self.load_split(self.resolve_split(split), check_limit(limit))

    def load_split(self, split: str, limit: int | None) -> list[Sample]:
        """Samples of a split from ``splits`` (the first ``limit``, a positive int, when given)."""
        raise NotImplementedError

    def is_correct(self, prediction: str, sample: Sample) -> bool:
        """Exact match of the first words after ``normalize_answer``."""
        return exact_match(prediction, sample.answer)

    def aggregate(self, records: list[dict]) -> dict:
        """Accuracy overall (mean over samples) and per family; ``records`` carry family and correct."""
        if not records:
            raise ValueError(f"No records to aggregate for {self.name!r}")
        marked = [{"family": r["family"], "correct": bool(r["correct"])} for r in records]
        return {"accuracy": mean(m["correct"] for m in marked), "per_family": per_family_accuracy(marked), "n": len(marked)}


def check_limit(limit: Any) -> int | None:
    """``limit`` as an int when it is a positive whole number, None for None; anything else is a ValueError."""
    if limit is None:
        return None
    try:
        value = operator.index(limit)
    except TypeError:
        raise ValueError(f"limit must be a positive whole number of samples or None, got {limit!r}") from None
    if value < 1 or isinstance(limit, bool):
        raise ValueError(f"limit must be a positive whole number of samples or None, got {limit!r}")
    return value


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark", base_cls=Benchmark)


def register_benchmark(name: str):
    """Class decorator registering a ``Benchmark`` subclass under ``name`` (and setting its ``name``)."""

    def decorator(cls):
        if cls.default_split not in cls.splits:
            raise ValueError(f"Benchmark {name!r}: default_split {cls.default_split!r} is not one of its splits {cls.splits}")
        cls.name = name
        return BENCHMARKS.register(name)(cls)

    return decorator


def get_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """An instance of benchmark ``name`` built with ``kwargs`` (None values left out); unknown names and arguments are errors."""
    cls = BENCHMARKS.get(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return cls(**kwargs)
    except TypeError as err:
        if kwargs and "unexpected keyword" in str(err):
            raise ValueError(f"Benchmark {name!r} does not take {sorted(kwargs)} ({err})") from None
        raise


def list_benchmarks(pattern: str = "*") -> list[str]:
    """Sorted registered benchmark names matching an fnmatch ``pattern``."""
    return BENCHMARKS.names(pattern)
