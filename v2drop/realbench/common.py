"""What the real benchmarks share: loading rows (Hugging Face or a local copy), images, answer parsing."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from v2drop.benchmarks import Benchmark, Sample

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_ANSWER = "\nAnswer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


class HFBenchmark(Benchmark):
    """A benchmark read from its community's Hugging Face dataset or from ``data_dir/<split>.jsonl``.

    Local copies use the dataset's own column names, one JSON object per line; image columns hold
    a path relative to ``data_dir`` (or base64 PNG/JPEG), video columns a list of frame paths or a
    video file path. ``split`` names: the harness's ``test`` and ``validation`` both map to the
    benchmark's evaluation split (``hf_split``) unless the local directory has a file of that name.
    """

    hf_name: str = ""  # Hugging Face dataset id
    hf_config: str | None = None  # dataset configuration
    hf_split: str = "test"  # the split the community evaluates on

    def __init__(self, data_dir: str | None = None):
        self.data_dir = Path(data_dir) if data_dir else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir} is not a directory")
        self.by_id: dict[str, dict] = {}  # sample id -> what aggregate needs beyond the records

    def rows(self, split: str) -> list[dict]:
        """The raw rows of ``split``."""
        if self.data_dir is not None:
            path = self.data_dir / f"{split}.jsonl"
            if not path.exists():
                path = self.data_dir / f"{self.hf_split}.jsonl"
            if not path.exists():
                found = sorted(p.name for p in self.data_dir.glob("*.jsonl"))
                raise ValueError(f"{self.name}: no {split}.jsonl or {self.hf_split}.jsonl in {self.data_dir} (found {found or 'none'})")
            rows = []
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {i + 1} is not JSON ({err})") from None
            return rows
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ValueError(f"{self.name} needs the Hugging Face dataset {self.hf_name} and the hub is offline; "
                             f"pass --data-dir with a local copy ({split}.jsonl in the dataset's schema)")
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{self.name} loads {self.hf_name} with the `datasets` package: pip install datasets, "
                             "or pass --data-dir with a local copy") from None
        return list(datasets.load_dataset(self.hf_name, self.hf_config, split=self.hf_split))

    def load(self, split: str, limit: int | None = None) -> list[Sample]:
        """Samples of ``split`` (first ``limit``), rows that cannot be read named in the error."""
        samples: list[Sample] = []
        for i, row in enumerate(self.rows(split)):
            try:
                samples.extend(self.to_samples(row, i))
            except (KeyError, ValueError, OSError) as err:
                raise ValueError(f"{self.name}: row {i} cannot be read ({type(err).__name__}: {err})") from None
            if limit is not None and len(samples) >= limit:
                return samples[:limit]
        return samples

    def to_samples(self, row: dict, index: int) -> list[Sample]:
        """The sample(s) of one row."""
        raise NotImplementedError

    def image(self, value: Any) -> Image.Image:
        """An RGB image from a PIL image, a datasets image dict, a path under ``data_dir`` or base64."""
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            value = value.get("path")
        if not isinstance(value, str) or not value:
            raise ValueError(f"no image in {str(value)[:60]!r}")
        path = (self.data_dir / value) if self.data_dir is not None else Path(value)
        if path.exists():
            return Image.open(path).convert("RGB")
        try:
            return Image.open(io.BytesIO(base64.b64decode(value, validate=True))).convert("RGB")
        except Exception:  # noqa: BLE001 - neither a file nor base64
            raise ValueError(f"image {value[:60]!r} is neither a file under {self.data_dir} nor base64") from None


def sample_frames(frames: list, n: int) -> list:
    """``n`` frames picked uniformly (``np.linspace(0, len-1, n)`` rounded, as the official video evals)."""
    if not frames:
        raise ValueError("a video with no frames")
    index = np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)
    return [frames[i] for i in index]


def parse_option(text: str, letters: str = "ABCD") -> str:
    """The option letter of an answer: "B", "(B) cat", "B. cat", "Answer: B", "The answer is (C)."; "" if none."""
    text = text.strip()
    patterns = [rf"^\(?([{letters}])\)?(?:[.:,)\s]|$)", rf"answer(?: is)?\s*[:：]?\s*\(?([{letters}])\)?\b", rf"\(([{letters}])\)", rf"\b([{letters}])\b"]
    for pattern in patterns:
        m = re.search(pattern, text, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        if m:
            return m.group(1).upper()
    return ""


def options_text(options: list[str], letters: str = LETTERS) -> str:
    """Options as lines ``A. ...``."""
    return "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))


def per_family_accuracy(records: list[dict]) -> dict[str, float]:
    """Mean correctness per family."""
    per: dict[str, list[bool]] = {}
    for r in records:
        per.setdefault(r["family"], []).append(bool(r["correct"]))
    return {f: sum(v) / len(v) for f, v in sorted(per.items())}


# -- the VQA answer normaliser (TextVQA, GQA) ---------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't", "wont": "won't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's", "wasnt": "wasn't"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def normalize_vqa(answer: str) -> str:
    """The standard VQA normalisation: punctuation, number words to digits, articles and contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        # a punctuation mark between word characters is removed, elsewhere replaced by a space (as the VQA eval)
        text = re.sub(rf"(?<=\w){re.escape(p)}(?=\w)", "", text) if p in ",-/" else text.replace(p, " ")
        text = text.replace(p, " ")
    text = re.sub(r"(?!<=\d)(\.)(?!\d)", "", text)  # periods, except decimal points
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)
