"""POPE: yes/no object-hallucination probes on COCO images, scored like the official POPE script."""

from __future__ import annotations

import string

from v2drop.benchmarks import Sample, register_benchmark
from v2drop.realbench.common import SHORT_ANSWER, HFBenchmark, mean, per_family_accuracy

CATEGORIES = ("adversarial", "popular", "random")


def yes_no(text: str) -> str:
    """POPE's reading of an answer: "no" if its first sentence has the word "no" or "not", else "yes".

    As the official script (first sentence, commas dropped, split on spaces), except that words
    are lower-cased and stripped of punctuation, so "NO" and "no!" count as no too.
    """
    first = text.split(".")[0]
    words = {w.strip(string.punctuation) for w in first.replace(",", "").lower().split()}
    return "no" if words & {"no", "not"} else "yes"


def binary_scores(predicted_yes: list[bool], gold_yes: list[bool]) -> dict:
    """Accuracy, precision, recall, F1 (positive = yes) and the share of yes answers; 0.0 where undefined."""
    tp = sum(p and g for p, g in zip(predicted_yes, gold_yes))
    fp = sum(p and not g for p, g in zip(predicted_yes, gold_yes))
    fn = sum(g and not p for p, g in zip(predicted_yes, gold_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": mean(p == g for p, g in zip(predicted_yes, gold_yes)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": mean(predicted_yes),
    }


@register_benchmark("pope")
class POPE(HFBenchmark):
    """POPE (``lmms-lab/POPE``, split ``test``: 3 × 3,000 yes/no questions about 500 COCO images).

    Local copy: ``<data_dir>/test.jsonl``, one object per line with
    ``question_id`` (unique within its category), ``question`` ("Is there a dog in the image?"),
    ``answer`` ("yes"/"no"), ``image`` (path relative to ``data_dir``, or base64) and
    ``category`` (``adversarial``, ``popular`` or ``random``: POPE's three splits). Other columns
    (``id``, ``image_source``) are ignored.

    Prompt: the question + "\\nAnswer the question using a single word or phrase." (LLaVA-1.5).
    ``aggregate``: accuracy, precision, recall, F1 and yes ratio over all questions (as lmms-eval
    reports them) and per category (``per_split``, as the official script prints them), and
    ``f1_mean_of_splits``, the mean F1 over the three categories.
    """

    hf_name = "lmms-lab/POPE"
    splits = {"test": "test"}
    columns = ("question_id", "question", "answer", "image", "category")
    families = CATEGORIES

    def to_samples(self, row, index):
        """One yes/no question."""
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"answer must be yes or no, got {row['answer']!r}")
        image = self.image(row["image"], key=row.get("image_source"))
        question = str(row["question"]).strip() + SHORT_ANSWER
        return [Sample(f"{row['category']}-{row['question_id']}", question, answer, str(row["category"]), (image,))]

    def is_correct(self, prediction, sample):
        """POPE's yes/no reading of the prediction equals the answer."""
        return yes_no(prediction) == sample.answer

    def aggregate(self, records):
        """Overall and per-category accuracy, precision, recall, F1, yes ratio; mean F1 over categories."""
        if not records:
            raise ValueError("No records to aggregate for 'pope'")
        marked = []
        for r in records:
            sample = self.sample_of(r)
            pred, gold = yes_no(r["prediction"]) == "yes", sample.answer == "yes"
            marked.append({"family": sample.family, "pred": pred, "gold": gold, "correct": pred == gold})
        out = binary_scores([m["pred"] for m in marked], [m["gold"] for m in marked])
        cats = sorted({m["family"] for m in marked})
        out["per_split"] = {}
        for c in cats:
            rows = [m for m in marked if m["family"] == c]
            out["per_split"][c] = binary_scores([m["pred"] for m in rows], [m["gold"] for m in rows])
        out["f1_mean_of_splits"] = mean(v["f1"] for v in out["per_split"].values())
        out["per_family"] = per_family_accuracy(marked)
        out["n"] = len(marked)
        return out
