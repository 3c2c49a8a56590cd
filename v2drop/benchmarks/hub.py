"""Reading a real benchmark's rows: from its Hugging Face dataset, or from a local copy in the same schema.

Every real benchmark reads either its community's Hugging Face dataset (lmms-eval's copies,
through ``datasets.load_dataset``, imported only when rows are read) or, given ``data_dir``, a
local copy: ``<data_dir>/<split>.jsonl`` (one JSON object per line, the dataset's own column
names) or ``<split>.parquet``. Image columns hold a path relative to ``data_dir`` (or base64, as
MMBench's TSV files do); video columns a list of frame paths, a folder of frames or a video file.
Each benchmark's schema is in its class docstring and in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from v2drop.benchmarks.base import Benchmark, DataError, Sample
from v2drop.benchmarks.media import MediaRef, existing_path, image_ref, open_image, sample_frames, shrink
from v2drop.benchmarks.metrics import mean, per_family_accuracy
from v2drop.benchmarks.reading import READINGS, check_reading

_TRUE = ("1", "true", "yes", "on")

# -- rows ---------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` forbids reaching the Hugging Face hub."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_dataset(bench: str, repo: str, config: str | None, split: str):
    """``datasets.load_dataset(repo, config, split=split)``, or a DataError saying how to work without it."""
    what = f"{repo}" + (f" (configuration {config})" if config else "") + f", split {split}"
    local = (
        f"pass data_dir (--data-dir) with a local copy, {split}.jsonl in the dataset's schema "
        f"(see the {bench} class docstring)"
    )
    if hub_offline():
        raise DataError(
            f"{bench} reads the Hugging Face dataset {what}, but the hub is offline (HF_HUB_OFFLINE); {local}"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{bench} reads the Hugging Face dataset {what} with the `datasets` package, which is not installed: "
            f"pip install datasets, or {local}"
        ) from None
    return lazy_images(datasets.load_dataset(repo, config, split=split))


def lazy_images(dataset):
    """``dataset`` with its image columns left encoded (``{"bytes", "path"}``): samples then decode on demand."""
    import datasets

    image_type = getattr(datasets, "Image", None)
    for name, feature in dict(getattr(dataset, "features", None) or {}).items():
        if image_type is not None and isinstance(feature, image_type) and getattr(feature, "decode", False):
            dataset = dataset.cast_column(name, image_type(decode=False))
    return dataset


def read_table(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSONL or parquet file; ``where`` names the file and line for errors."""
    if path.suffix == ".parquet":
        try:
            import pandas

            frame = pandas.read_parquet(path)
        except ImportError:
            raise DataError(
                f"Reading {path} needs pyarrow (pip install pyarrow); or convert it to {path.stem}.jsonl"
            ) from None
        for i, row in enumerate(frame.to_dict("records")):
            yield f"{path} row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno} is not JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {lineno} is a JSON {type(row).__name__}, not an object of columns")
            yield f"{path} line {lineno}", row


def present(value: Any) -> bool:
    """Whether a cell holds something (not None, NaN, "" or "nan", as pandas-written copies of MMBench have)."""
    if value is None or (isinstance(value, float) and value != value):
        return False
    return str(value).strip().lower() not in ("", "nan", "none")


class HFBenchmark(Benchmark):
    """A benchmark read from a Hugging Face dataset or from ``data_dir`` in the same schema.

    Subclasses set ``hf_name``, ``hf_config``, ``splits`` and ``default_split`` (the names
    ``load`` accepts), ``split_aliases`` (an accepted name -> the dataset's name for that split,
    where they differ), ``columns`` (required in every row) and implement ``to_samples``. Loaded
    samples are remembered by id, so ``aggregate`` can use what a record does not carry.
    ``answer_reading`` picks the reference scorer (one of ``readings``: "lmms-eval" for lmms-eval
    0.6.1's task functions, "llava" for LLaVA-1.5's eval scripts; ``default_reading`` when None);
    ``aggregate`` records it.
    """

    hf_name: str = ""  # Hugging Face dataset id
    hf_config: str | None = None  # dataset configuration
    split_aliases: dict[str, str] = {}  # accepted split name -> the dataset's split, where they differ
    columns: tuple[str, ...] = ()  # required in every row
    whole_rows: bool = False  # ``limit`` never splits the samples of one row
    readings: tuple[str, ...] = READINGS  # the answer_reading values this benchmark implements
    default_reading: str = "lmms-eval"  # answer_reading when none is given (docs/benchmarks.md says why)

    def __init__(self, data_dir: str | os.PathLike | None = None, answer_reading: str | None = None):
        self.answer_reading = check_reading(answer_reading or self.default_reading, self.readings, self.name)
        self.data_dir = Path(data_dir) if data_dir else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise DataError(f"data_dir {str(data_dir)!r} (--data-dir) is not a directory")
        self.samples_by_id: dict[str, Sample] = {}
        self.by_id: dict[str, dict] = {}  # sample id -> what aggregate needs beyond the records
        self._decoded: dict[
            str, Image.Image
        ] = {}  # images datasets gave decoded, shared by the questions about one image

    # -- rows ---------------------------------------------------------------------------------------------
    def dataset_split(self, split: str | None) -> str:
        """The dataset's name for ``split`` (checked by ``resolve_split``; None is ``default_split``)."""
        split = self.resolve_split(split)
        return self.split_aliases.get(split, split)

    def local_file(self, split: str) -> Path:
        """The table of ``split`` in ``data_dir``: ``<name>.jsonl`` or ``.parquet``; a clear error if none exists.

        ``name`` is tried as the dataset's name for the split, then ``split``, then every other
        accepted name of the same questions (MVBench's ``test``/``train``).
        """
        assert self.data_dir is not None
        target = self.dataset_split(split)
        names = dict.fromkeys([target, split, *(s for s in self.splits if self.dataset_split(s) == target)])
        candidates = [self.data_dir / f"{n}{ext}" for n in names for ext in (".jsonl", ".parquet")]
        for path in candidates:
            if path.is_file():
                return path
        found = sorted(p.name for p in self.data_dir.iterdir() if p.suffix in (".jsonl", ".parquet"))
        raise DataError(
            f"{self.name}: none of {[p.name for p in candidates]} in {self.data_dir} (found {found or 'no tables'})"
        )

    def rows(self, split: str) -> Iterator[tuple[str, dict]]:
        """(where, row) for every row of ``split``, from ``data_dir`` when given, else from the hub."""
        if self.data_dir is not None:
            yield from read_table(self.local_file(split))
        else:
            yield from self.hub_rows(self.dataset_split(split))

    def hub_rows(self, split: str) -> Iterator[tuple[str, dict]]:
        """(where, row) for every row of the dataset's ``split`` on the hub."""
        for i, row in enumerate(hub_dataset(self.name, self.hf_name, self.hf_config, split)):
            yield f"{self.hf_name} {split} row {i}", dict(row)

    # -- samples ------------------------------------------------------------------------------------------
    def load_split(self, split: str, limit: int | None) -> list[Sample]:
        """Samples of ``split`` (the first ``limit``); a row that cannot be read is an error naming it."""
        samples: list[Sample] = []
        seen: set[str] = set()
        for index, (where, row) in enumerate(self.rows(split)):
            missing = [c for c in self.columns if c not in row]
            if missing:
                raise DataError(f"{self.name}: {where} lacks column(s) {missing} (it has {sorted(row)})")
            try:
                new = self.to_samples(row, index)
            except DataError as err:
                raise DataError(f"{self.name}: {where}: {err}") from None
            except (KeyError, ValueError, TypeError, IndexError, OSError) as err:
                raise DataError(f"{self.name}: {where} cannot be read ({type(err).__name__}: {err})") from None
            for s in new:
                if s.id in seen:  # ids key resumed runs and aggregation: they must be unique
                    raise DataError(f"{self.name}: {where} repeats sample id {s.id!r}")
                seen.add(s.id)
                self.samples_by_id[s.id] = s
            samples.extend(new)
            if limit is not None and len(samples) >= limit:
                return samples if self.whole_rows else samples[:limit]
        return samples

    def to_samples(self, row: dict, index: int) -> list[Sample]:
        """The sample(s) of one row (``index``: its position in the split)."""
        raise NotImplementedError

    def sample_of(self, record: dict) -> Sample:
        """The loaded sample a record belongs to (aggregate needs the samples loaded by this instance)."""
        try:
            return self.samples_by_id[record["id"]]
        except KeyError:
            raise DataError(
                f"{self.name}: record {record.get('id')!r} is not a sample this benchmark loaded; "
                "call load(split) on the same instance before aggregate"
            ) from None

    def with_samples(self, records: list[dict]) -> list[tuple[dict, Sample]]:
        """(record, its loaded sample) for every record; no records is an error (there is nothing to aggregate)."""
        if not records:
            raise DataError(f"No records to aggregate for {self.name!r}")
        return [(r, self.sample_of(r)) for r in records]

    def aggregate(self, records: list[dict]) -> dict:
        """Accuracy (``is_correct`` on each record's prediction) overall and per family."""
        marked = [
            {"family": s.family, "correct": self.is_correct(r["prediction"], s)} for r, s in self.with_samples(records)
        ]
        return {
            "accuracy": mean(m["correct"] for m in marked),
            "per_family": per_family_accuracy(marked),
            "n": len(records),
            "answer_reading": self.answer_reading,
        }

    # -- images -------------------------------------------------------------------------------------------
    def media_root(self) -> Path | None:
        """Where relative image and video paths start."""
        return self.data_dir

    def find_media(self, value: str) -> Path | None:
        """The existing file or folder ``value`` names under ``media_root``, if any."""
        return existing_path(self.media_root(), value)

    def image(self, value: Any, cache: bool = True, key: Any = None) -> MediaRef | Image.Image:
        """A lazy reference to an image given as a ``datasets`` image dict, bytes, a path under ``data_dir`` or base64.

        Nothing is decoded here: ``Sample.images`` decodes on demand through the bounded
        ``MEDIA_CACHE``, keyed by the image's identity (its file, or a digest of its bytes), so
        POPE's 18 questions per image share one decode without every image being held at once.
        A PIL image (already decoded, as ``datasets`` gives images unless ``hub_dataset`` could turn
        decoding off) is returned as it is, kept once per ``key`` (its file name in the dataset)
        when ``cache``.
        """
        if isinstance(value, Image.Image) and cache and key is not None:
            return self._decoded.setdefault(f"key:{key}", value.convert("RGB"))
        return image_ref(value, self.media_root())


class VideoBenchmark(HFBenchmark):
    """A benchmark over videos: ``num_frames`` frames sampled uniformly from each (``frame_indices``).

    A row's video may be a list of frame images (paths, PIL images), a folder of frame images
    (natural order) or a video file (PyAV), relative to ``video_root`` (default ``data_dir``).
    Samples hold a ``MediaRef``: frames are decoded when the sample is evaluated, and the decoded
    frames of recent videos are shared through the bounded ``MEDIA_CACHE``. ``max_side``
    optionally shrinks frames so their longer side is at most that many pixels (less memory per
    cached video); processors resize frames anyway, though not always to the same size.
    """

    modality = "video"
    default_frames = 8  # num_frames when none is given

    def __init__(
        self,
        data_dir: str | None = None,
        num_frames: int | None = None,
        video_root: str | None = None,
        max_side: int | None = None,
        answer_reading: str | None = None,
    ):
        super().__init__(data_dir, answer_reading)
        self.num_frames = self.default_frames if num_frames is None else int(num_frames)
        if self.num_frames < 1:
            raise DataError(f"num_frames must be at least 1, got {num_frames}")
        if max_side is not None and int(max_side) < 1:
            raise DataError(f"max_side must be a positive number of pixels, got {max_side}")
        self.max_side = int(max_side) if max_side is not None else None
        self.video_root = Path(video_root) if video_root else None
        if self.video_root is not None and not self.video_root.is_dir():
            raise DataError(f"video_root {str(video_root)!r} is not a directory")

    def media_root(self) -> Path | None:
        """Videos and frames are found under ``video_root``, else ``data_dir``."""
        return self.video_root or self.data_dir

    def require_video_root(self) -> None:
        """Hub rows name video files that are not in the dataset's rows: fail early without a folder holding them."""
        if self.video_root is None:
            raise DataError(
                f"{self.name}: the {self.hf_name} rows name videos that must be downloaded and unpacked separately; "
                "pass video_root with them (or data_dir with a local copy)"
            )

    def frames(
        self, value: Any, bounds: tuple[float, float] | None = None, subdirs: Sequence[str] = ()
    ) -> MediaRef | tuple:
        """A lazy reference to the sampled frames of one video given as a frame list, a frame folder or a video file
        (tried under ``subdirs`` too); decoded frames (PIL images in a list) are sampled and kept as they are."""
        if isinstance(value, (list, tuple)):
            picks = sample_frames(list(value), self.num_frames)
            if not all(isinstance(v, str) for v in value):  # decoded frames: nothing to defer
                return tuple(shrink(open_image(v, self.media_root()), self.max_side) for v in picks)
            paths = []
            for v in picks:
                path = self.find_media(v)
                if path is None:
                    raise DataError(f"frame {v!r} not found under {self.media_root()}")
                paths.append(str(path.absolute()))
            return MediaRef("frames", tuple(paths), max_side=self.max_side)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"no video in {str(value)[:60]!r}")
        path = next((p for p in (self.find_media(str(Path(d) / value)) for d in ("", *subdirs)) if p is not None), None)
        if path is None:
            where = [str(Path(d) / value) for d in ("", *subdirs)]
            raise DataError(f"video {value!r} not found under {self.media_root()} (tried {where})")
        kind = "folder" if path.is_dir() else "video"
        return MediaRef(kind, str(path.absolute()), self.num_frames, bounds if kind == "video" else None, self.max_side)
