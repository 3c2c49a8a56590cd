"""Video benchmarks in their community schemas: MVBench and Video-MME (frames sampled uniformly)."""

from __future__ import annotations

from pathlib import Path

from v2drop.benchmarks import Sample, register_benchmark
from v2drop.realbench.common import OPTION_ANSWER, HFBenchmark, options_text, parse_option, per_family_accuracy, sample_frames


class VideoBenchmark(HFBenchmark):
    """A video benchmark: ``num_frames`` frames sampled uniformly from each video.

    A row's video is a list of frame image paths (a local copy) or a video file path under
    ``data_dir`` / ``video_root`` (decoded with PyAV, ``pip install av``). The hub copies of MVBench
    and Video-MME ship their videos as archives beside the question tables: unpack them and pass
    that directory as ``video_root`` (or put the tables and videos together under ``--data-dir``).
    """

    modality = "video"
    video_column = "video"

    def __init__(self, data_dir: str | None = None, num_frames: int = 8, video_root: str | None = None):
        super().__init__(data_dir)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames
        self.video_root = Path(video_root) if video_root else self.data_dir

    def frames(self, value) -> tuple:
        """The sampled frames of one row's video."""
        if isinstance(value, (list, tuple)):
            return tuple(self.image(f) for f in sample_frames(list(value), self.num_frames))
        path = (self.video_root / value) if self.video_root is not None else Path(value)
        from v2drop.integrations.video import decode_frames

        return tuple(sample_frames(decode_frames(str(path)), self.num_frames))

    def aggregate(self, records):
        """Accuracy overall and per category."""
        return {"accuracy": sum(bool(r["correct"]) for r in records) / len(records), "per_family": per_family_accuracy(records),
                "n": len(records)}


@register_benchmark("mvbench")
class MVBench(VideoBenchmark):
    """MVBench (``OpenGVLab/MVBench``): video, question, candidates, answer (the correct candidate's text), task.

    Options are lettered in the given order, "(A) ..." as the official evaluation; accuracy per task.
    """

    hf_name = "OpenGVLab/MVBench"
    hf_split = "train"

    def to_samples(self, row, index):
        """One multiple-choice question over the sampled frames."""
        candidates = [str(c) for c in row["candidates"]]
        letters = "ABCDE"[: len(candidates)]
        gold = letters[candidates.index(str(row["answer"]))]
        question = "Question: " + row["question"] + "\nOptions:\n" + "\n".join(f"({l}) {c}" for l, c in zip(letters, candidates))
        return [Sample(f"{row.get('task', 'mvbench')}-{index}", question + OPTION_ANSWER, gold, str(row.get("task", "mvbench")),
                       self.frames(row[self.video_column]), choices=tuple(candidates))]

    def is_correct(self, prediction, sample):
        """The parsed option letter is the answer."""
        return parse_option(prediction, "ABCDE"[: len(sample.choices)]) == sample.answer


@register_benchmark("videomme")
class VideoMME(VideoBenchmark):
    """Video-MME (``lmms-lab/Video-MME``, test): videoID, question, options ("A. ..."), answer (letter), duration, task_type.

    Accuracy per task type (the families) and per duration (short/medium/long).
    """

    hf_name = "lmms-lab/Video-MME"
    video_column = "videoID"

    def __init__(self, data_dir: str | None = None, num_frames: int = 16, video_root: str | None = None):
        super().__init__(data_dir, num_frames, video_root)

    def to_samples(self, row, index):
        """One multiple-choice question; the duration is kept for the per-duration accuracy."""
        options = [str(o) for o in row["options"]]
        sid = f"{row.get('question_id', index)}"
        self.by_id[sid] = {"duration": str(row.get("duration", "unknown"))}
        text = row["question"] + "\n" + "\n".join(options) if all(o[:2] in ("A.", "B.", "C.", "D.") for o in options) \
            else row["question"] + "\n" + options_text(options)
        video = row.get("frames") or row[self.video_column]
        return [Sample(sid, text + OPTION_ANSWER, str(row["answer"]).strip().upper(), str(row.get("task_type", "videomme")),
                       self.frames(video), choices=tuple(options))]

    def is_correct(self, prediction, sample):
        """The parsed option letter is the answer."""
        return parse_option(prediction, "ABCD") == sample.answer

    def aggregate(self, records):
        """Accuracy overall, per task type and per duration."""
        out = super().aggregate(records)
        durations: dict[str, list[bool]] = {}
        for r in records:
            durations.setdefault(self.by_id.get(r["id"], {}).get("duration", "unknown"), []).append(bool(r["correct"]))
        out["per_duration"] = {d: sum(v) / len(v) for d, v in sorted(durations.items())}
        return out
