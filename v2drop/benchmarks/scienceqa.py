"""ScienceQA-IMG: multiple-choice science questions that come with an image."""

from __future__ import annotations

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark, present
from v2drop.benchmarks.prompts import LETTERS, OPTION_ANSWER, options_text
from v2drop.benchmarks.reading import scienceqa_llava, scienceqa_lmms_eval


@register_benchmark("scienceqa-img")
class ScienceQAImg(HFBenchmark):
    """ScienceQA-IMG (``lmms-lab/ScienceQA``, configuration ``ScienceQA-IMG``, split ``test``: 2,017 questions).

    Splits: ``test`` only. Local copy: ``<data_dir>/test.jsonl`` with ``question``, ``choices``
    (list of strings), ``answer`` (0-based index into choices), ``hint`` (the context; may be
    empty), ``image`` (path relative to ``data_dir``, or base64) and optionally ``subject``.
    Rows whose image is null are skipped: a full ScienceQA copy thus yields its IMG subset.

    Prompt (LLaVA-1.5 / lmms-eval): "Context: <hint>\\n" (when there is one) + question +
    "\\nA. ..." lines + "\\nAnswer with the option's letter from the given choices directly."
    ``answer_reading``: ``llava`` (default; LLaVA-1.5's ``eval_science_qa.py``: the letter
    exactly, "X. ...", or one "The answer is X." match) or ``lmms-eval`` (``sqa_process_results``:
    the stripped letter in any case, or "X." with X upper case). Families: ``subject``.
    """

    hf_name = "lmms-lab/ScienceQA"
    hf_config = "ScienceQA-IMG"
    splits = ("test",)
    default_split = "test"
    columns = ("question", "choices", "answer", "image")
    default_reading = "llava"

    def to_samples(self, row, index):
        """One multiple-choice question, or none when the row has no image."""
        if not present(row["image"]):
            return []
        choices = [str(c) for c in row["choices"]]
        answer = int(row["answer"])
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} is outside the {len(choices)} choices")
        context = f"Context: {str(row['hint']).strip()}\n" if present(row.get("hint")) else ""
        question = context + str(row["question"]).strip() + "\n" + options_text(choices) + OPTION_ANSWER
        return [
            Sample(
                f"sqa-{index}",
                question,
                LETTERS[answer],
                str(row.get("subject") or "scienceqa"),
                (self.image(row["image"]),),
                choices=tuple(choices),
            )
        ]

    def is_correct(self, prediction, sample):
        """The option letter the reference of ``answer_reading`` reads is the answer."""
        if self.answer_reading == "llava":
            return scienceqa_llava(prediction, sample.answer, len(sample.choices))
        return scienceqa_lmms_eval(prediction, sample.answer)
