"""Video-MME: multiple-choice questions about short, medium and long videos (no subtitles)."""

from __future__ import annotations

import re

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import VideoBenchmark, present
from v2drop.benchmarks.prompts import LETTERS, OPTION_ANSWER, options_text
from v2drop.benchmarks.reading import videomme_lmms_eval

# lmms-eval's videomme_doc_to_text instruction line (its post_prompt default is OPTION_ANSWER, from videomme.yaml).
INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)

TASK_TYPES = (
    "Temporal Perception",
    "Spatial Perception",
    "Attribute Perception",
    "Action Recognition",
    "Object Recognition",
    "OCR Problems",
    "Counting Problem",
    "Temporal Reasoning",
    "Spatial Reasoning",
    "Action Reasoning",
    "Object Reasoning",
    "Information Synopsis",
)
_LETTERED = re.compile(r"^\s*\(?([A-Z])[.)]\s*")


@register_benchmark("videomme")
class VideoMME(VideoBenchmark):
    """Video-MME without subtitles (``lmms-lab/Video-MME``, split ``test``: 2,700 questions on 900 videos).

    Splits: ``test`` only. Local copy: ``<data_dir>/test.jsonl`` with ``videoID``,
    ``question_id``, ``question``, ``options`` (["A. ...", "B. ...", ...]), ``answer`` (a
    letter), ``duration`` (short/medium/long), ``task_type`` and optionally ``domain``,
    ``sub_category`` and the video itself in ``video`` (or ``frames``): a list of frame paths, a
    frame folder or a video file. Without it the video is looked up by ``videoID`` under
    ``video_root`` (default ``data_dir``): ``frames/<videoID>/``, ``<videoID>/``,
    ``data/<videoID>.mp4`` (the unpacked hub archives), ``<videoID>.mp4`` (also .MP4, .mkv,
    .webm).

    Frames: ``num_frames`` (default 16) picked uniformly. Prompt (lmms-eval's
    ``videomme_doc_to_text``): "Select the best answer to the following multiple-choice question
    based on the video and the subtitles. Respond with only the letter (A, B, C, or D) of the
    correct option." + "\\n" + question + "\\n" + the options, one per line + "\\n" + "\\nAnswer
    with the option's letter from the given choices directly." ``answer_reading``: ``lmms-eval``
    only (``extract_characters_regex``: answer phrases removed, then the first capital A-D
    anywhere). ``aggregate``: accuracy overall, per task type (the families) and per duration
    (``per_duration``).
    """

    hf_name = "lmms-lab/Video-MME"
    splits = ("test",)
    default_split = "test"
    columns = ("videoID", "question_id", "question", "options", "answer")
    families = TASK_TYPES
    default_frames = 16
    readings = ("lmms-eval",)

    def hub_rows(self, split):
        """The question rows; their videos come from ``video_root``."""
        self.require_video_root()
        yield from super().hub_rows(split)

    def to_samples(self, row, index):
        """One multiple-choice question over the sampled frames; the duration is kept for ``per_duration``."""
        raw = [str(o).strip() for o in row["options"]]
        texts = [_LETTERED.sub("", o, count=1) for o in raw]
        answer = str(row["answer"]).strip().upper()
        if answer not in LETTERS[: len(raw)]:
            raise ValueError(f"answer {row['answer']!r} is not one of the {len(raw)} option letters")
        lettered = all(_LETTERED.match(o) and _LETTERED.match(o).group(1) == LETTERS[i] for i, o in enumerate(raw))
        options = "\n".join(str(o) for o in row["options"]) if lettered else options_text(texts)
        question = INSTRUCTION + "\n" + str(row["question"]) + "\n" + options + "\n" + OPTION_ANSWER
        sid = str(row["question_id"])
        self.by_id[sid] = {"duration": str(row.get("duration") or "unknown")}
        return [
            Sample(
                sid, question, answer, str(row.get("task_type") or "videomme"), self._video(row), choices=tuple(texts)
            )
        ]

    def _video(self, row) -> tuple:
        for column in ("video", "frames"):
            if present(row.get(column)) or isinstance(row.get(column), (list, tuple)):
                return self.frames(row[column])
        vid = str(row["videoID"])
        names = [f"frames/{vid}", vid] + [
            f"{d}{vid}{ext}" for d in ("data/", "") for ext in (".mp4", ".MP4", ".mkv", ".webm")
        ]
        path = next((n for n in names if self.find_media(n) is not None), None)
        if path is None:
            raise ValueError(f"no video or frames column and none of {names} under {self.media_root()}")
        return self.frames(path)

    def is_correct(self, prediction, sample):
        """lmms-eval's ``extract_characters_regex`` reads the answer's letter."""
        return videomme_lmms_eval(prediction).lower() == sample.answer.lower()

    def aggregate(self, records):
        """Accuracy overall, per task type and per duration."""
        out = super().aggregate(records)
        durations: dict[str, list[bool]] = {}
        for r, sample in self.with_samples(records):
            durations.setdefault(self.by_id[sample.id]["duration"], []).append(self.is_correct(r["prediction"], sample))
        out["per_duration"] = {d: sum(v) / len(v) for d, v in sorted(durations.items())}
        out["answer_reading"] = self.answer_reading
        return out
