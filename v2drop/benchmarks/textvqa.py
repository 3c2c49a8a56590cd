"""TextVQA: questions that need reading text in the image, scored by VQA accuracy over ten answers."""

from __future__ import annotations

from collections import Counter

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark
from v2drop.benchmarks.metrics import mean, vqa_full_credit
from v2drop.benchmarks.prompts import SHORT_ANSWER
from v2drop.benchmarks.vqa import normalize_vqa, vqa_accuracy


@register_benchmark("textvqa")
class TextVQA(HFBenchmark):
    """TextVQA validation (``lmms-lab/textvqa``, split ``validation``: 5,000 questions).

    Splits: ``validation`` (default) and ``test``, another name for ``validation`` (TextVQA's test
    answers are not public).

    Local copy: ``<data_dir>/validation.jsonl`` (or ``test.jsonl``) with ``question_id``,
    ``question``, ``answers`` (the ten annotators' answers), ``image`` (path relative to
    ``data_dir``, or base64) and ``ocr_tokens`` (used with ``ocr=True``).

    ``answer_reading``: ``llava`` (default) or ``lmms-eval``; both score with EvalAI's normaliser
    and VQA accuracy (LLaVA's ``m4c_evaluator`` and lmms-eval's ``textvqa_process_results`` agree),
    and differ in the prompt. ``llava``: question + "\\nReference OCR token: a, b, ..." (LLaVA-1.5's
    ``llava_textvqa_val_v051_ocr.jsonl``) + "\\nAnswer the question using a single word or
    phrase." ``lmms-eval``: ``question.capitalize()`` (first letter upper, the rest lower, as
    ``textvqa_doc_to_text``) + the same suffix, OCR tokens only with ``ocr=True`` (its default
    ``ocr: false``). ``ocr`` overrides either default. ``aggregate``:
    ``vqa_accuracy`` (= ``accuracy``), the mean over questions of the average, over the ten
    leave-one-out subsets of nine answers, of min(1, matches / 3), after the VQA normalisation;
    ``full_credit`` is the share of questions ``is_correct`` (three or more annotators agree).
    """

    hf_name = "lmms-lab/textvqa"
    splits = ("validation", "test")
    default_split = "validation"
    split_aliases = {"test": "validation"}
    columns = ("question_id", "question", "answers", "image")
    families = ("textvqa",)
    default_reading = "llava"

    def __init__(self, data_dir: str | None = None, ocr: bool | None = None, answer_reading: str | None = None):
        super().__init__(data_dir, answer_reading)
        self.ocr = (self.answer_reading == "llava") if ocr is None else bool(ocr)

    def to_samples(self, row, index):
        """One open question; the ten answers are kept for the soft accuracy."""
        answers = [str(a) for a in row["answers"]]
        if not answers:
            raise ValueError("answers is empty")
        sid = str(row["question_id"])
        self.by_id[sid] = {"answers": answers}
        question = str(row["question"]).strip()
        if self.answer_reading == "lmms-eval":
            question = str(row["question"]).capitalize()
        if self.ocr:
            question += "\nReference OCR token: " + ", ".join(str(t) for t in row.get("ocr_tokens") or [])
        # The reference shown in records: the most common answer after normalisation.
        reference = Counter(normalize_vqa(a) for a in answers).most_common(1)[0][0]
        image = self.image(row["image"], key=row.get("image_id"))
        return [Sample(sid, question + SHORT_ANSWER, reference, "textvqa", (image,))]

    def is_correct(self, prediction, sample):
        """Full credit: at least three annotators gave the normalised prediction."""
        return vqa_full_credit(prediction, self.by_id[sample.id]["answers"])

    def aggregate(self, records):
        """Mean VQA accuracy, and the share with full credit."""
        soft, full = [], []
        for r, sample in self.with_samples(records):
            soft.append(vqa_accuracy(r["prediction"], self.by_id[sample.id]["answers"]))
            full.append(self.is_correct(r["prediction"], sample))
        score = mean(soft)
        return {
            "vqa_accuracy": score,
            "accuracy": score,
            "full_credit": mean(full),
            "per_family": {"textvqa": score},
            "n": len(records),
            "answer_reading": self.answer_reading,
        }
