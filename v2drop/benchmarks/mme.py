"""MME: two yes/no questions per image over 14 subtasks, scored as acc + acc+ per subtask."""

from __future__ import annotations

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark
from v2drop.benchmarks.metrics import acc_plus_scores, mean, per_family_accuracy
from v2drop.benchmarks.prompts import SHORT_ANSWER
from v2drop.benchmarks.reading import mme_llava, mme_lmms_eval

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO_LINE = " Please answer yes or no."  # what both references remove from the question before adding SHORT_ANSWER


@register_benchmark("mme")
class MME(HFBenchmark):
    """MME (``lmms-lab/MME``, split ``test``: 2,374 questions, two per image, 14 subtasks).

    Splits: ``test`` only. Local copy: ``<data_dir>/test.jsonl`` with ``question_id`` (the
    image's file name, e.g. ``code_reasoning/0020.png``, shared by the image's two questions),
    ``question`` (ending "Please answer yes or no."), ``answer`` ("Yes"/"No"), ``category`` (the
    subtask) and ``image`` (path relative to ``data_dir``, or base64).

    Prompt (LLaVA-1.5's ``llava_mme.jsonl`` and lmms-eval's default alike): the question with
    " Please answer yes or no." removed, + "\\nAnswer the question using a single word or phrase."
    ``answer_reading``: ``llava`` (default; MME's ``calculation.py``: lower case, exactly yes/no,
    else yes/no within the first four characters) or ``lmms-eval`` (the same after stripping
    space and periods, and a lone "y"/"n" reads yes/no). ``aggregate``: per subtask acc (questions right), acc+
    (images with both questions right) and score = (acc + acc+) × 100; ``perception`` and
    ``cognition`` sum the scores of their subtasks (max 2,000 and 800), ``total`` both.
    ``accuracy`` is the plain share of questions right.
    """

    hf_name = "lmms-lab/MME"
    splits = ("test",)
    default_split = "test"
    columns = ("question_id", "question", "answer", "category", "image")
    families = PERCEPTION + COGNITION
    default_reading = "llava"
    paper_metric = "total"  # perception + cognition score, as the token-dropping papers' tables

    def to_samples(self, row, index):
        """One yes/no question; its image is remembered for acc+."""
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"answer must be Yes or No, got {row['answer']!r}")
        sid = f"{row['question_id']}#{index}"
        self.by_id[sid] = {"image": str(row["question_id"])}
        image = self.image(row["image"], key=row["question_id"])
        question = str(row["question"]).strip().replace(YES_NO_LINE, "") + SHORT_ANSWER
        return [Sample(sid, question, answer, str(row["category"]), (image,))]

    def is_correct(self, prediction, sample):
        """The yes/no reading of ``answer_reading`` equals the answer ("other" is wrong for both)."""
        read = mme_llava if self.answer_reading == "llava" else mme_lmms_eval
        return read(prediction) == sample.answer

    def aggregate(self, records):
        """Per-subtask acc, acc+ and score; perception, cognition and total scores."""
        marked = [
            {"family": s.family, "image": self.by_id[s.id]["image"], "correct": self.is_correct(r["prediction"], s)}
            for r, s in self.with_samples(records)
        ]
        by_subtask: dict[str, dict[str, list[bool]]] = {}
        for m in marked:
            by_subtask.setdefault(m["family"], {}).setdefault(m["image"], []).append(m["correct"])
        subtasks = {cat: acc_plus_scores(images) for cat, images in sorted(by_subtask.items())}
        perception = sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION)
        cognition = sum(v["score"] for k, v in subtasks.items() if k in COGNITION)
        return {
            "perception": perception,
            "cognition": cognition,
            "total": perception + cognition,
            "subtasks": subtasks,
            "accuracy": mean(m["correct"] for m in marked),
            "per_family": per_family_accuracy(marked),
            "n": len(marked),
            "answer_reading": self.answer_reading,
        }
