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


@dataclass(frozen=True, init=False)
class Sample:
    """One question about one image (or the frames of one video).

    Attributes
    ----------
    id, question, answer, family : str
    media : tuple of PIL.Image and ``MediaRef``, or one ``MediaRef``
        The pixels in memory (small or generated benchmarks), or light references to where they
        are (real benchmarks: a file, bytes, a video), decoded only when ``images`` is read. Given to the constructor as
        ``images`` (positionally or by name) or as ``media``.
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
    media: Any
    evidence: tuple = ()
    choices: tuple = ()

    def __init__(
        self,
        id: str,
        question: str,
        answer: str,
        family: str,
        images: Any = (),
        evidence: tuple = (),
        choices: tuple = (),
        *,
        media: Any = None,
    ):
        for name, value in (
            ("id", id),
            ("question", question),
            ("answer", answer),
            ("family", family),
            ("media", images if media is None else media),
            ("evidence", evidence),
            ("choices", choices),
        ):
            object.__setattr__(self, name, value)

    def refs(self) -> tuple:
        """The lazy references (``MediaRef``) among the sample's media; empty when its pixels are in memory."""
        from v2drop.benchmarks.media import MediaRef

        parts = (self.media,) if isinstance(self.media, MediaRef) else tuple(self.media or ())
        return tuple(m for m in parts if isinstance(m, MediaRef))

    @property
    def lazy(self) -> bool:
        """Whether any of the pixels are a reference decoded on demand rather than images in memory."""
        return bool(self.refs())

    @property
    def images(self) -> tuple:
        """The sample's PIL images: one for image benchmarks, the frames for video (decoded on demand, bounded cache).

        A video file's frames come as the ``Clip`` ``decode_video`` gives (a sequence of the frames that
        also carries the video's frame rate and frame indices, for ``LVLM.prepare(videos=[clip])``).

        A medium that cannot be decoded is a ``DataError`` (a ValueError) naming the sample.
        """
        from v2drop.benchmarks.media import MEDIA_CACHE, MediaRef

        try:
            if isinstance(self.media, MediaRef):
                return MEDIA_CACHE.get(self.media)  # the cached tuple itself: a video's questions share it
            out: list = []
            for m in self.media or ():
                if isinstance(m, MediaRef):
                    out.extend(MEDIA_CACHE.get(m))
                else:
                    out.append(m)
            return tuple(out)
        except DataError as err:
            raise DataError(f"Sample {self.id!r}: {err}") from None
        except Exception as err:  # PIL and PyAV raise many types for truncated or corrupt files
            raise DataError(f"Sample {self.id!r}: its media cannot be decoded ({type(err).__name__}: {err})") from None


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
            raise ValueError(
                f"Benchmark {self.name!r} has no split {split!r}; valid splits: {', '.join(self.splits)} "
                f"(default {self.default_split!r})"
            )
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
        return {
            "accuracy": mean(m["correct"] for m in marked),
            "per_family": per_family_accuracy(marked),
            "n": len(marked),
        }


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


# Every module of v2drop.benchmarks is imported on the first lookup, so a benchmark registers by being in that package.
BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark", base_cls=Benchmark, package="v2drop.benchmarks")


def register_benchmark(name: str):
    """Class decorator registering a ``Benchmark`` subclass under ``name`` (and setting its ``name``)."""

    def decorator(cls):
        if cls.default_split not in cls.splits:
            raise ValueError(
                f"Benchmark {name!r}: default_split {cls.default_split!r} is not one of its splits {cls.splits}"
            )
        cls.name = name
        return BENCHMARKS.register(name)(cls)

    return decorator


def get_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """Benchmark ``name`` built with ``kwargs`` (None values dropped); unknown names or arguments fail."""
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
