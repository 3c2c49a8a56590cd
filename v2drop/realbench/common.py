"""What the real benchmarks share: reading rows (Hugging Face or a local copy), images and frames, answer parsing.

Every benchmark reads either its community's Hugging Face dataset (lmms-eval's copies, through
``datasets.load_dataset``) or, given ``data_dir``, a local copy in the same schema:
``<data_dir>/<split>.jsonl`` (one JSON object per line, the dataset's own column names) or
``<split>.parquet``. Image columns hold a path relative to ``data_dir`` (or base64, as MMBench's
TSV files do); video columns a list of frame paths, a folder of frames or a video file.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from v2drop.benchmarks import Benchmark, Sample

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's GQA/TextVQA/POPE suffix
OPTION_ANSWER = "\nAnswer with the option's letter from the given choices directly."  # LLaVA-1.5's multiple-choice suffix
LETTERS = string.ascii_uppercase
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_TRUE = ("1", "true", "yes", "on")


class DataError(ValueError):
    """A benchmark's data is missing, unreadable or not in its schema (a ``ValueError``, so the CLI reports it)."""


# -- rows ---------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` forbids reaching the Hugging Face hub."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_dataset(bench: str, repo: str, config: str | None, split: str):
    """``datasets.load_dataset(repo, config, split=split)``, or a DataError saying how to work without it."""
    what = f"{repo}" + (f" (configuration {config})" if config else "") + f", split {split}"
    local = f"pass data_dir (--data-dir) with a local copy, {split}.jsonl in the dataset's schema (see the {bench} class docstring)"
    if hub_offline():
        raise DataError(f"{bench} reads the Hugging Face dataset {what}, but the hub is offline (HF_HUB_OFFLINE); {local}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{bench} reads the Hugging Face dataset {what} with the `datasets` package, which is not installed: "
                        f"pip install datasets, or {local}") from None
    return datasets.load_dataset(repo, config, split=split)


def read_table(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSONL or parquet file; ``where`` names the file and line for errors."""
    if path.suffix == ".parquet":
        try:
            import pandas

            frame = pandas.read_parquet(path)
        except ImportError:
            raise DataError(f"Reading {path} needs pyarrow (pip install pyarrow); or convert it to {path.stem}.jsonl") from None
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

    Subclasses set ``hf_name``, ``hf_config``, ``splits`` (split name accepted here -> the
    dataset's split; the harness's default ``test`` maps to the split the community reports),
    ``columns`` (required in every row) and implement ``to_samples``. Loaded samples are
    remembered by id, so ``aggregate`` can use what a record does not carry.
    """

    hf_name: str = ""  # Hugging Face dataset id
    hf_config: str | None = None  # dataset configuration
    splits: dict[str, str] = {"test": "test"}  # accepted split -> the dataset's split
    columns: tuple[str, ...] = ()  # required in every row
    whole_rows: bool = False  # ``limit`` never splits the samples of one row (MMBench's rotations)

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self.data_dir = Path(data_dir) if data_dir else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise DataError(f"data_dir {str(data_dir)!r} (--data-dir) is not a directory")
        self.samples_by_id: dict[str, Sample] = {}
        self.by_id: dict[str, dict] = {}  # sample id -> what aggregate needs beyond the records
        self._images: dict[str, Image.Image] = {}  # decoded once, shared by the questions about one image

    # -- rows ---------------------------------------------------------------------------------------------
    def dataset_split(self, split: str) -> str:
        """The dataset's name for ``split``; an unknown split is an error listing the known ones."""
        if split not in self.splits:
            raise DataError(f"{self.name} has no split {split!r}; splits: {sorted(self.splits)}")
        return self.splits[split]

    def local_file(self, split: str) -> Path:
        """``<data_dir>/<split>.jsonl`` (or the dataset's split name, or parquet); a clear error if none exists."""
        assert self.data_dir is not None
        names = dict.fromkeys([self.dataset_split(split), split])
        candidates = [self.data_dir / f"{n}{ext}" for n in names for ext in (".jsonl", ".parquet")]
        for path in candidates:
            if path.is_file():
                return path
        found = sorted(p.name for p in self.data_dir.iterdir() if p.suffix in (".jsonl", ".parquet"))
        raise DataError(f"{self.name}: none of {[p.name for p in candidates]} in {self.data_dir} (found {found or 'no tables'})")

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
    def load(self, split: str, limit: int | None = None) -> list[Sample]:
        """Samples of ``split`` (the first ``limit``); a row that cannot be read is an error naming it."""
        self.dataset_split(split)  # unknown splits fail before any download
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
            raise DataError(f"{self.name}: record {record.get('id')!r} is not a sample this benchmark loaded; "
                            "call load(split) on the same instance before aggregate") from None

    def aggregate(self, records: list[dict]) -> dict:
        """Accuracy (``is_correct`` on each record's prediction) overall and per family."""
        if not records:
            raise DataError(f"No records to aggregate for {self.name!r}")
        samples = [self.sample_of(r) for r in records]
        marked = [{"family": s.family, "correct": self.is_correct(r["prediction"], s)} for s, r in zip(samples, records)]
        return {"accuracy": mean(m["correct"] for m in marked), "per_family": per_family_accuracy(marked), "n": len(records)}

    # -- images -------------------------------------------------------------------------------------------
    def media_root(self) -> Path | None:
        """Where relative image and video paths start."""
        return self.data_dir

    def image(self, value: Any, cache: bool = True, key: Any = None) -> Image.Image:
        """An RGB image from a PIL image, a ``datasets`` image dict, bytes, a path under ``data_dir`` or base64.

        Files, and hub images with a ``key`` (their file name in the dataset), are kept once per
        instance (``cache``): POPE asks 18 questions per image, and 9,000 copies would not fit.
        """
        if cache and key is not None and f"key:{key}" in self._images:
            return self._images[f"key:{key}"]
        if cache and key is not None and not isinstance(value, str):
            self._images[f"key:{key}"] = self.image(value, cache=False)
            return self._images[f"key:{key}"]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            if value.get("bytes"):
                return _decode_bytes(value["bytes"], "image bytes")
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return _decode_bytes(bytes(value), "image bytes")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"no image in {str(value)[:60]!r}")
        path = self._path(value)
        if path is not None and not cache:
            return _decode_file(path)
        if path is not None:
            if str(path) not in self._images:
                self._images[str(path)] = _decode_file(path)
            return self._images[str(path)]
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"image {value[:60]!r} is neither a file under {self.media_root()} nor base64") from None
        return _decode_bytes(data, f"base64 image {value[:20]!r}...")

    def _path(self, value: str) -> Path | None:
        """The existing file or folder ``value`` names (relative to the media root), if any."""
        if len(value) > 4096 or "\n" in value:  # base64 payloads: not worth a stat (and too long for one)
            return None
        root = self.media_root()
        path = root / value if root is not None else Path(value)
        try:
            return path if path.exists() else None
        except OSError:  # a name too long for the file system
            return None


def _decode_file(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as err:
        raise DataError(f"image file {path} cannot be decoded ({err})") from None


def _decode_bytes(data: bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except OSError as err:
        raise DataError(f"{what} cannot be decoded ({err})") from None


# -- video frames -------------------------------------------------------------------------------------------


def frame_indices(n_frames: int, num_frames: int) -> list[int]:
    """Uniform picks ``np.linspace(0, n-1, k)`` rounded, as the official video evals; all frames when fewer than k."""
    if n_frames < 1:
        raise DataError("a video with no frames")
    k = min(num_frames, n_frames)  # repeating frames would only add duplicate vision tokens
    return np.linspace(0, n_frames - 1, k).round().astype(int).tolist()


def sample_frames(frames: list, n: int) -> list:
    """``n`` of ``frames`` picked uniformly (``frame_indices``)."""
    return [frames[i] for i in frame_indices(len(frames), n)]


def natural_key(name: str) -> list:
    """Sort key putting ``frame_2`` before ``frame_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder of frames, in natural order."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"the frame folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: natural_key(p.name))


def decode_video(path: Path, num_frames: int, bounds: tuple[float, float] | None = None) -> list[Image.Image]:
    """``num_frames`` RGB frames picked uniformly from a video file (within ``bounds`` seconds), decoding only those.

    Needs PyAV (``pip install av``). Seeks to each picked frame instead of decoding the whole
    video, so hour-long Video-MME videos cost ``num_frames`` short decodes.
    """
    try:
        import av
    except ImportError:
        raise DataError(f"reading the video file {path} needs PyAV (pip install av); or give the video as frame images") from None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        base = float(stream.time_base)
        start_pts = stream.start_time or 0
        total = stream.frames or (int(float(stream.duration * stream.time_base) * rate) if stream.duration and rate else 0)
        if not rate or not total:  # length unknown: decode it all, then pick
            frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
            first, last = _clip(len(frames), rate, bounds)
            return sample_frames(frames[first : last + 1], num_frames)
        first, last = _clip(total, rate, bounds)
        out = []
        for index in (first + i for i in frame_indices(last - first + 1, num_frames)):
            target = start_pts + int(round(index / rate / base))
            container.seek(target, stream=stream, backward=True, any_frame=False)  # to the key frame before it
            chosen = None
            for frame in container.decode(stream):
                chosen = frame
                if frame.pts is not None and frame.pts >= target - int(0.5 / rate / base):
                    break
            if chosen is None:
                raise DataError(f"frame {index} of {path} cannot be decoded")
            out.append(chosen.to_image().convert("RGB"))
    return out


def _clip(total: int, rate: float, bounds: tuple[float, float] | None) -> tuple[int, int]:
    """First and last frame index of a video of ``total`` frames within ``bounds`` seconds (all of it without)."""
    if not total:
        raise DataError("a video with no frames")
    if bounds is None or not rate:
        return 0, total - 1
    first = min(max(0, round(bounds[0] * rate)), total - 1)
    return first, max(first, min(total - 1, round(bounds[1] * rate)))


# -- answers ------------------------------------------------------------------------------------------------


def options_text(options: Sequence[str], letters: str = LETTERS) -> str:
    """Options as lines ``A. ...``."""
    return "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))


def parse_option(text: str, letters: str = "ABCD", choices: Sequence[str] = ()) -> str:
    """The option letter an answer picks, or "" if none (what official multiple-choice evals accept).

    In order: a bare letter ("B", "(B)", "b."); the text of exactly one option; a leading letter
    ("B. cat", "(C) cat"); an answer phrase ("Answer: C", "The best answer is (B).", "Best
    option: D"); "(B)" anywhere; the first capital option letter standing alone ("I think B").
    """
    text = text.strip()
    cls = f"[{letters}]"
    bare = re.fullmatch(rf"\(?({cls})\)?[.):]?", text, flags=re.IGNORECASE)
    if bare:
        return bare.group(1).upper()
    if choices:
        norm = normalize_vqa(text)
        hits = [i for i, c in enumerate(choices) if i < len(letters) and normalize_vqa(str(c)) == norm]
        if len(hits) == 1:
            return letters[hits[0]]
    patterns = (
        rf"^\(?({cls})\)?(?=[\s.,:;)\]])",
        rf"(?i:answer|option|choice)(?i:\s+is)?\s*[:：]?\s*\(?({cls})\)?(?![A-Za-z])",
        rf"\(({cls})\)",
        rf"(?<![A-Za-z])({cls})(?![A-Za-z])",
    )
    for pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return ""


def mean(values) -> float:
    """Arithmetic mean of numbers or booleans (0.0 for none)."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def per_family_accuracy(records: list[dict], key: str = "correct") -> dict[str, float]:
    """Mean of ``key`` (correctness or a soft score) per family."""
    per: dict[str, list[float]] = {}
    for r in records:
        per.setdefault(r["family"], []).append(float(r[key]))
    return {f: mean(v) for f, v in sorted(per.items())}


# -- the VQA answer normaliser (TextVQA, GQA) ---------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
# Contractions the VQA evaluation restores when written without apostrophes. Forms of "I" are left
# out (answers are lower-cased first, and the original table only lists them capitalised), and so
# are forms that are ordinary words without the apostrophe (he'll -> hell, we're -> were).
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he'll he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't must've needn't
not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll something's that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we're we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
_ORDINARY_WORDS = {"hell", "were"}  # he'll, we're


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for mask in range(2 ** len(cuts) - 1):  # every way of dropping apostrophes but keeping them all
            kept = {cuts[j] for j in range(len(cuts)) if mask >> j & 1}
            variant = "".join(ch for i, ch in enumerate(word) if ch != "'" or i in kept)
            if variant not in _ORDINARY_WORDS:
                table.setdefault(variant, word)
    return table


_CONTRACTIONS = _contraction_table()


def normalize_vqa(answer: str) -> str:
    """The standard VQA answer normalisation (as EvalAI's answer processor).

    Lower case; commas and question marks dropped; a punctuation mark touching a space removed,
    elsewhere (``t-shirt``) replaced by a space, all of them removed when the answer has a
    digit-comma-digit; periods removed unless a digit follows; number words to digits; articles
    dropped; apostrophe-less contractions restored ("dont" -> "don't").
    """
    text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    joined_digits = re.search(r"\d,\d", text) is not None
    out = text
    for p in _PUNCT:
        # The conditions look at the text before any replacement, as the reference implementation does.
        out = out.replace(p, "" if joined_digits or (p + " ") in text or (" " + p) in text else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: over the leave-one-annotator-out subsets, the mean of min(1, matches / 3)."""
    pred = normalize_vqa(prediction)
    gold = [normalize_vqa(a) for a in answers]
    if len(gold) < 2:
        return float(bool(gold) and gold[0] == pred)
    matches = sum(g == pred for g in gold)
    # Leaving out annotator i removes one match exactly when annotator i gave the predicted answer.
    return mean(min(1.0, (matches - (g == pred)) / 3) for g in gold)


# -- video benchmarks ---------------------------------------------------------------------------------------


class VideoBenchmark(HFBenchmark):
    """A benchmark over videos: ``num_frames`` frames sampled uniformly from each (``frame_indices``).

    A row's video may be a list of frame images (paths, PIL images), a folder of frame images
    (natural order) or a video file (PyAV), relative to ``video_root`` (default ``data_dir``).
    ``max_side`` optionally shrinks frames so their longer side is at most that many pixels: the
    harness holds every sample's frames in memory, which for long benchmarks at full resolution
    does not fit; processors resize frames anyway, though not always to the same size.
    """

    modality = "video"
    default_frames = 8

    def __init__(self, data_dir: str | None = None, num_frames: int | None = None, video_root: str | None = None,
                 max_side: int | None = None):
        super().__init__(data_dir)
        self.num_frames = self.default_frames if num_frames is None else int(num_frames)
        if self.num_frames < 1:
            raise DataError(f"num_frames must be at least 1, got {num_frames}")
        if max_side is not None and int(max_side) < 1:
            raise DataError(f"max_side must be a positive number of pixels, got {max_side}")
        self.max_side = int(max_side) if max_side is not None else None
        self.video_root = Path(video_root) if video_root else None
        if self.video_root is not None and not self.video_root.is_dir():
            raise DataError(f"video_root {str(video_root)!r} is not a directory")
        self._videos: dict[tuple, tuple] = {}  # sampled frames per video, shared by its questions

    def media_root(self) -> Path | None:
        """Videos and frames are found under ``video_root``, else ``data_dir``."""
        return self.video_root or self.data_dir

    def require_video_root(self) -> None:
        """Hub rows name video files that are not in the dataset's rows: fail early without a folder holding them."""
        if self.video_root is None:
            raise DataError(f"{self.name}: the {self.hf_name} rows name videos that must be downloaded and unpacked separately; "
                            "pass video_root with them (or data_dir with a local copy)")

    def frames(self, value: Any, bounds: tuple[float, float] | None = None, subdirs: Sequence[str] = ()) -> tuple:
        """The sampled frames of one video given as a frame list, a frame folder or a video file (tried under ``subdirs`` too)."""
        if isinstance(value, (list, tuple)):
            picks = sample_frames(list(value), self.num_frames)
            if not all(isinstance(v, str) for v in value):  # decoded frames: nothing to share
                return tuple(self._shrink(self.image(v, cache=False)) for v in picks)
            key: tuple = ("list", tuple(value), self.num_frames)
            if key not in self._videos:
                self._videos[key] = tuple(self._shrink(self.image(v, cache=False)) for v in picks)
            return self._videos[key]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"no video in {str(value)[:60]!r}")
        path = next((p for p in (self._path(str(Path(d) / value)) for d in ("", *subdirs)) if p is not None), None)
        if path is None:
            where = [str(Path(d) / value) for d in ("", *subdirs)]
            raise DataError(f"video {value!r} not found under {self.media_root()} (tried {where})")
        key = (str(path), self.num_frames, bounds)
        if key not in self._videos:
            if path.is_dir():
                picked = [_decode_file(p) for p in sample_frames(frame_files(path), self.num_frames)]
            else:
                picked = decode_video(path, self.num_frames, bounds)
            self._videos[key] = tuple(self._shrink(im) for im in picked)
        return self._videos[key]

    def _shrink(self, image: Image.Image) -> Image.Image:
        if self.max_side is None or max(image.size) <= self.max_side:
            return image
        scale = self.max_side / max(image.size)
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
