"""MVBench: 20 temporal video-understanding tasks of 200 multiple-choice questions each."""

from __future__ import annotations

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import VideoBenchmark, hub_dataset
from v2drop.benchmarks.metrics import mean, per_family_accuracy
from v2drop.benchmarks.prompts import LETTERS
from v2drop.benchmarks.reading import mvbench_lmms_eval

POST_PROMPT = "Only give the best option.\n"  # every mvbench_<task>.yaml's default post_prompt in lmms-eval 0.6.1

# Task (the dataset configuration) -> folder of its videos in the dataset repository's video archives,
# as lmms-eval lays them out.
TASK_DIRS = {
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_antonym": "ssv2_video_mp4",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_segment",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video_segment",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "counterfactual_inference": "clevrer/video_validation",
}


@register_benchmark("mvbench")
class MVBench(VideoBenchmark):
    """MVBench (``OpenGVLab/MVBench``: one configuration per task, split ``train``; 4,000 questions).

    Splits: ``test`` (default) and ``train``, two names for the one set of questions: MVBench is
    evaluation-only, and its Hugging Face copy stores the questions as split ``train``.

    Local copy: ``<data_dir>/test.jsonl`` (or ``train.jsonl``) with ``video`` (a list of frame
    image paths, a folder of frames or a video file, relative to ``video_root`` or ``data_dir``),
    ``question``, ``candidates`` (the options), ``answer`` (the right candidate's text), ``task``
    (the configuration name, e.g. ``action_sequence``); ``start``/``end`` columns are ignored:
    the videos in the dataset's ``*_segment`` folders are already cut to the clip, and lmms-eval's
    ``mvbench_doc_to_visual`` passes the whole file. From the hub, ``video_root`` must hold the
    unpacked video archives (``star/``, ``clevrer/``, ...).

    Frames: ``num_frames`` (default 8; the official evaluation uses 16) picked uniformly.
    Prompt (lmms-eval's ``mvbench_doc_to_text``): "Question:" + question + "\\nOption:\\n" +
    "(A) ...\\n" lines + "Only give the best option.\\n". ``answer_reading``: ``lmms-eval`` only
    (LLaVA-1.5 has no video evaluation): ``mcq_acc`` ("X. ..." or the first standalone a-e word),
    and empty predictions are left out of each task's denominator. ``aggregate``: ``accuracy``
    over answered questions, per task (``per_family``, each as lmms-eval's
    ``mvbench_aggregate_results`` / 100) and ``mean_of_tasks`` (the paper's average).
    """

    hf_name = "OpenGVLab/MVBench"
    splits = ("test", "train")
    default_split = "test"
    split_aliases = {"test": "train"}
    columns = ("video", "question", "candidates", "answer")
    families = tuple(TASK_DIRS)
    paper_metric = "mean_of_tasks"  # the mean of the 20 task accuracies
    default_frames = 8
    readings = ("lmms-eval",)

    def hub_rows(self, split):
        """Rows of every task configuration, each tagged with its task."""
        self.require_video_root()
        for task in TASK_DIRS:
            for i, row in enumerate(hub_dataset(self.name, self.hf_name, task, split)):
                yield f"{self.hf_name} {task} row {i}", {**dict(row), "task": task}

    def to_samples(self, row, index):
        """One multiple-choice question over the sampled frames."""
        candidates = [str(c) for c in row["candidates"]]
        if not 2 <= len(candidates) <= len(LETTERS):
            raise ValueError(f"needs at least two candidates, got {candidates}")
        answer = str(row["answer"])
        if answer not in candidates:
            raise ValueError(f"answer {answer!r} is not one of the candidates {candidates}")
        task = str(row.get("task") or "mvbench")
        options = "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(candidates))
        question = "Question:" + str(row["question"]) + "\nOption:\n" + options + POST_PROMPT
        frames = self.frames(row["video"], None, subdirs=[TASK_DIRS[task]] if task in TASK_DIRS else [])
        return [
            Sample(
                f"{task}-{index}", question, LETTERS[candidates.index(answer)], task, frames, choices=tuple(candidates)
            )
        ]

    def is_correct(self, prediction, sample):
        """lmms-eval's ``mcq_acc``: the prediction's reading is the answer's letter."""
        return mvbench_lmms_eval(prediction, sample.answer)

    def aggregate(self, records):
        """Accuracy over answered questions, overall and per task (empty predictions left out), and the mean over
        tasks."""
        answered = [
            {"family": s.family, "correct": self.is_correct(r["prediction"], s)}
            for r, s in self.with_samples(records)
            if r["prediction"] != ""
        ]
        per_task = per_family_accuracy(answered)
        for task in sorted({s.family for _, s in self.with_samples(records)} - set(per_task)):
            per_task[task] = 0.0  # lmms-eval scores a task with no answered question 0
        per_task = dict(sorted(per_task.items()))
        return {
            "accuracy": mean(a["correct"] for a in answered),
            "per_family": per_task,
            "mean_of_tasks": mean(per_task.values()),
            "n": len(records),
            "n_answered": len(answered),
            "answer_reading": self.answer_reading,
        }
