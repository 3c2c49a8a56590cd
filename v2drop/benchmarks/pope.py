"""POPE: yes/no object-hallucination probes on COCO images, scored like the official POPE script."""

from __future__ import annotations

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark
from v2drop.benchmarks.metrics import binary_scores, mean, per_family_accuracy
from v2drop.benchmarks.prompts import SHORT_ANSWER
from v2drop.benchmarks.reading import pope_llava, pope_lmms_eval, pope_lmms_eval_scores

CATEGORIES = ("adversarial", "popular", "random")


@register_benchmark("pope")
class POPE(HFBenchmark):
    """POPE (``lmms-lab/POPE``, split ``test``: 3 × 3,000 yes/no questions about 500 COCO images).

    Splits: ``test`` only. Local copy: ``<data_dir>/test.jsonl``, one object per line with
    ``question_id`` (unique within its category), ``question`` ("Is there a dog in the image?"),
    ``answer`` ("yes"/"no"), ``image`` (path relative to ``data_dir``, or base64) and
    ``category`` (``adversarial``, ``popular`` or ``random``: POPE's three splits). Other
    columns (``id``, ``image_source``) are ignored.

    Prompt (LLaVA-1.5 and lmms-eval alike): the question + "\\nAnswer the question using a single
    word or phrase." ``answer_reading``: ``llava`` (default; LLaVA's ``eval_pope.py``: "no" when
    the first sentence has the word "No", "no" or "not", case-sensitive) or ``lmms-eval`` (right
    only when the lower-cased, stripped answer is exactly the label; lmms-eval's precision, recall
    and yes ratio, which is the share of *gold* yes). ``aggregate``: accuracy, precision, recall,
    F1 and yes ratio over all questions and per category (``per_split``, as LLaVA's script prints
    them), and ``f1_mean_of_splits``, the mean F1 over the three categories (the number LLaVA-1.5
    reports).
    """

    hf_name = "lmms-lab/POPE"
    splits = ("test",)
    default_split = "test"
    columns = ("question_id", "question", "answer", "image", "category")
    families = CATEGORIES
    default_reading = "llava"
    paper_metric = "f1_mean_of_splits"  # LLaVA-1.5's POPE number: F1 averaged over the three categories

    def to_samples(self, row, index):
        """One yes/no question."""
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"answer must be yes or no, got {row['answer']!r}")
        image = self.image(row["image"], key=row.get("image_source"))
        question = str(row["question"]).strip() + SHORT_ANSWER
        return [Sample(f"{row['category']}-{row['question_id']}", question, answer, str(row["category"]), (image,))]

    def read(self, prediction: str) -> str:
        """The prediction as the reference of ``answer_reading`` reads it (llava: always yes/no)."""
        return pope_llava(prediction) if self.answer_reading == "llava" else pope_lmms_eval(prediction)

    def is_correct(self, prediction, sample):
        """The prediction, read as ``answer_reading`` says, equals the answer."""
        return self.read(prediction) == sample.answer

    def scores(self, preds: list[str], golds: list[str]) -> dict:
        """Accuracy, precision, recall, F1 and yes ratio of read predictions against the labels, as the reference
        computes them.
        """
        if self.answer_reading == "lmms-eval":
            return pope_lmms_eval_scores(preds, golds)
        return binary_scores([p == "yes" for p in preds], [g == "yes" for g in golds])

    def aggregate(self, records):
        """Overall and per-category accuracy, precision, recall, F1, yes ratio; mean F1 over categories."""
        marked = [
            {"family": s.family, "pred": self.read(r["prediction"]), "gold": s.answer}
            for r, s in self.with_samples(records)
        ]
        for m in marked:
            m["correct"] = m["pred"] == m["gold"]
        out = self.scores([m["pred"] for m in marked], [m["gold"] for m in marked])
        out["per_split"] = {}
        for c in sorted({m["family"] for m in marked}):
            rows = [m for m in marked if m["family"] == c]
            out["per_split"][c] = self.scores([m["pred"] for m in rows], [m["gold"] for m in rows])
        out["f1_mean_of_splits"] = mean(v["f1"] for v in out["per_split"].values())
        out["per_family"] = per_family_accuracy(marked)
        out["n"] = len(marked)
        out["answer_reading"] = self.answer_reading
        return out
