"""MME: two yes/no questions per image over 14 subtasks, scored as acc + acc+ per subtask."""

from __future__ import annotations

from v2drop.benchmarks import Sample, register_benchmark
from v2drop.realbench.common import HFBenchmark, mean, per_family_accuracy

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def yes_no(text: str) -> str:
    """MME's reading of an answer: exactly yes/no, else yes/no within its first four characters, else "other"."""
    text = text.strip().lower().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


@register_benchmark("mme")
class MME(HFBenchmark):
    """MME (``lmms-lab/MME``, split ``test``: 2,374 questions, two per image, 14 subtasks).

    Local copy: ``<data_dir>/test.jsonl`` with ``question_id`` (the image's file name, e.g.
    ``code_reasoning/0020.png``, shared by the image's two questions), ``question`` (ending
    "Please answer yes or no."), ``answer`` ("Yes"/"No"), ``category`` (the subtask) and
    ``image`` (path relative to ``data_dir``, or base64).

    Prompt: the question as given. ``aggregate``: per subtask acc (questions right), acc+
    (images with both questions right) and score = (acc + acc+) × 100; ``perception`` and
    ``cognition`` sum the scores of their subtasks (max 2,000 and 800), ``total`` both.
    ``accuracy`` is the plain share of questions right.
    """

    hf_name = "lmms-lab/MME"
    splits = {"test": "test"}
    columns = ("question_id", "question", "answer", "category", "image")
    families = PERCEPTION + COGNITION

    def to_samples(self, row, index):
        """One yes/no question; its image is remembered for acc+."""
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"answer must be Yes or No, got {row['answer']!r}")
        sid = f"{row['question_id']}#{index}"
        self.by_id[sid] = {"image": str(row["question_id"])}
        image = self.image(row["image"], key=row["question_id"])
        return [Sample(sid, str(row["question"]).strip(), answer, str(row["category"]), (image,))]

    def is_correct(self, prediction, sample):
        """MME's yes/no reading of the prediction equals the answer."""
        return yes_no(prediction) == sample.answer

    def aggregate(self, records):
        """Per-subtask acc, acc+ and score; perception, cognition and total scores."""
        if not records:
            raise ValueError("No records to aggregate for 'mme'")
        marked = []
        for r in records:
            sample = self.sample_of(r)
            marked.append({"family": sample.family, "image": self.by_id[sample.id]["image"],
                           "correct": self.is_correct(r["prediction"], sample)})
        subtasks = {}
        for cat in sorted({m["family"] for m in marked}):
            rows = [m for m in marked if m["family"] == cat]
            images: dict[str, list[bool]] = {}
            for m in rows:
                images.setdefault(m["image"], []).append(m["correct"])
            acc, acc_plus = mean(m["correct"] for m in rows), mean(all(v) for v in images.values())
            subtasks[cat] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}
        perception = sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION)
        cognition = sum(v["score"] for k, v in subtasks.items() if k in COGNITION)
        return {"perception": perception, "cognition": cognition, "total": perception + cognition, "subtasks": subtasks,
                "accuracy": mean(m["correct"] for m in marked), "per_family": per_family_accuracy(marked), "n": len(marked)}
