"""POPE: yes/no object-hallucination probes on COCO images, scored like the official POPE script."""

from __future__ import annotations

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark
from v2drop.benchmarks.metrics import binary_scores, mean, per_family_accuracy, read_yes_no_by_negation
from v2drop.benchmarks.prompts import SHORT_ANSWER

CATEGORIES = ("adversarial", "popular", "random")


@register_benchmark("pope")
class POPE(HFBenchmark):
    """POPE (``lmms-lab/POPE``, split ``test``: 3 × 3,000 yes/no questions about 500 COCO images).

    Splits: ``test`` only. Local copy: ``<data_dir>/test.jsonl``, one object per line with
    ``question_id`` (unique within its category), ``question`` ("Is there a dog in the image?"),
    ``answer`` ("yes"/"no"), ``image`` (path relative to ``data_dir``, or base64) and
    ``category`` (``adversarial``, ``popular`` or ``random``: POPE's three splits). Other
    columns (``id``, ``image_source``) are ignored.

    Prompt: the question + "\\nAnswer the question using a single word or phrase." (LLaVA-1.5).
    ``aggregate``: accuracy, precision, recall, F1 and yes ratio over all questions (as lmms-eval
    reports them) and per category (``per_split``, as the official script prints them), and
    ``f1_mean_of_splits``, the mean F1 over the three categories.
    """

    hf_name = "lmms-lab/POPE"
    splits = ("test",)
    default_split = "test"
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
        """POPE's yes/no reading of the prediction (``read_yes_no_by_negation``) equals the answer."""
        return read_yes_no_by_negation(prediction) == sample.answer

    def aggregate(self, records):
        """Overall and per-category accuracy, precision, recall, F1, yes ratio; mean F1 over categories."""
        marked = []
        for r, sample in self.with_samples(records):
            pred, gold = read_yes_no_by_negation(r["prediction"]) == "yes", sample.answer == "yes"
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
