"""GQA: compositional questions about scene images, exact match after the VQA answer normalisation."""

from __future__ import annotations

import json

from v2drop.benchmarks.base import DataError, Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark, hub_dataset
from v2drop.benchmarks.media import IMAGE_SUFFIXES
from v2drop.benchmarks.prompts import SHORT_ANSWER
from v2drop.benchmarks.reading import gqa_llava, gqa_lmms_eval

STRUCTURAL = ("verify", "query", "choose", "logical", "compare")


@register_benchmark("gqa")
class GQA(HFBenchmark):
    """GQA balanced (``lmms-lab/GQA``: ``testdev_balanced_instructions`` + ``testdev_balanced_images``, 12,578
    questions).

    Splits: ``testdev`` (default; the split the community reports), ``val`` (the val_balanced
    configurations) and ``test``, another name for ``testdev`` (GQA's test answers are not public).

    Local copy: ``<data_dir>/testdev.jsonl`` (or ``test.jsonl``) with ``id``, ``question``,
    ``answer``, ``imageId`` and optionally ``types`` (``{"structural": "query", "semantic": ...,
    "detailed": ...}``) and ``image``; a row without ``image`` uses
    ``<data_dir>/images/<imageId>.jpg`` (or .png, ...). On the hub the images live in the
    ``*_balanced_images`` configuration (columns ``id``, ``image``).

    Prompt (LLaVA-1.5 and lmms-eval alike): question + "\\nAnswer the question using a single word
    or phrase." ``answer_reading``: ``llava`` (default; LLaVA's ``convert_gqa_for_eval.py`` strips
    trailing periods and lower-cases, then GQA's ``eval.py`` needs the answer exactly) or
    ``lmms-eval`` (``exact_match`` with ``ignore_case`` and ``ignore_punctuation``: lower case,
    every ASCII punctuation mark removed, whole strings equal). Families: the structural type
    (verify, query, choose, logical, compare).
    """

    hf_name = "lmms-lab/GQA"
    splits = ("testdev", "val", "test")
    default_split = "testdev"
    split_aliases = {"test": "testdev"}
    columns = ("id", "question", "answer", "imageId")
    families = STRUCTURAL
    default_reading = "llava"

    def hub_rows(self, split):
        """Question rows with their image looked up in the images configuration."""
        questions = hub_dataset(self.name, self.hf_name, f"{split}_balanced_instructions", split)
        images = hub_dataset(self.name, self.hf_name, f"{split}_balanced_images", split)
        position = {str(image_id): i for i, image_id in enumerate(images["id"])}  # a column read, no image decoded
        for i, row in enumerate(questions):
            row = dict(row)
            if str(row.get("imageId")) in position:
                row.setdefault("image", images[position[str(row["imageId"])]]["image"])
            yield f"{self.hf_name} {split} row {i}", row

    def to_samples(self, row, index):
        """One short-answer question."""
        return [
            Sample(
                str(row["id"]),
                str(row["question"]).strip() + SHORT_ANSWER,
                str(row["answer"]),
                structural_type(row),
                (self._image_of(row),),
            )
        ]

    def _image_of(self, row):
        if row.get("image") is not None:
            return self.image(row["image"], key=row["imageId"])
        if self.data_dir is not None:
            for suffix in IMAGE_SUFFIXES:
                path = self.data_dir / "images" / f"{row['imageId']}{suffix}"
                if path.is_file():
                    return self.image(str(path.absolute()))  # a relative data_dir would be joined twice
        raise DataError(f"no image column and no images/{row['imageId']}.jpg (or .png) under {self.data_dir}")

    def is_correct(self, prediction, sample):
        """Exact match as the reference of ``answer_reading`` reads it."""
        return (gqa_llava if self.answer_reading == "llava" else gqa_lmms_eval)(prediction, sample.answer)


def structural_type(row: dict) -> str:
    """The question's structural type from GQA's ``types`` column (a dict or its JSON), or "gqa"."""
    types = row.get("types")
    if isinstance(types, str):
        try:
            types = json.loads(types)
        except json.JSONDecodeError:
            return "gqa"
    return str(types.get("structural") or "gqa") if isinstance(types, dict) else "gqa"
