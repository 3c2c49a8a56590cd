"""MMBench: single-image multiple-choice questions over 20 abilities, scored by CircularEval over the dataset's
copies."""

from __future__ import annotations

import math

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark, present
from v2drop.benchmarks.metrics import mean, per_family_accuracy
from v2drop.benchmarks.prompts import OPTION_ANSWER, options_text
from v2drop.benchmarks.reading import mmbench_read

OPTION_COLUMNS = "ABCDE"
COPY_STRIDE = 1_000_000  # rows whose index is equal modulo this are one question with rotated options
SYS_PROMPT = "There are several options:"  # lmms-eval's mmbench.yaml metadata.sys_prompt


@register_benchmark("mmbench")
class MMBench(HFBenchmark):
    """MMBench English dev (``lmms-lab/MMBench``, configuration ``en``, split ``dev``: 4,329 rows, 1,164 questions).

    Splits: ``dev`` (default) and ``test``, another name for ``dev`` (MMBench's test answers are
    not public).

    The rows already hold MMBench's CircularEval copies: rows whose ``index % 1_000_000`` is equal
    are one question with its options rotated (the question itself has ``index < 1_000_000``).
    ``circular=True`` (default) scores as MMBench's evaluator (and lmms-eval's copy of it): a
    question is right only when every loaded copy is right. ``circular=False`` scores each
    question by its first copy only. Rows are never rotated again. ``limit`` takes rows in file
    order, so a limited run may hold only some copies of a question.

    Local copy: ``<data_dir>/dev.jsonl`` (or ``test.jsonl``) with ``index``, ``question``,
    ``hint`` (may be null/"nan"), options ``A`` ``B`` ``C`` ``D`` (and ``E``; absent ones null
    or "nan"), ``answer`` (a letter), ``category`` and ``image`` (path relative to ``data_dir``,
    or base64 as in MMBench's TSV files).

    Prompt: ``llava`` (default; LLaVA-1.5's ``model_vqa_mmbench.py``): hint + "\\n" + question + "\\nA. ..."
    lines + "\\nAnswer with the option's letter from the given choices directly."; ``lmms-eval``
    (``mmbench_doc_to_text``): "<hint> <question> There are several options:\\nA. ...",
    + "\\n" + "\\nAnswer with ...". Answers are read by MMBench's ``can_infer`` (an option letter
    standing alone, or the one option whose text the answer contains) in both readings; an answer
    it cannot read is wrong (MMBench then asks an LLM judge, which is not run here).
    ``aggregate``: ``accuracy`` (circular when on), ``accuracy_first_copy`` (the single pass over
    the questions' own rows) and per category.
    """

    hf_name = "lmms-lab/MMBench"
    hf_config = "en"
    splits = ("dev", "test")
    default_split = "dev"
    split_aliases = {"test": "dev"}
    columns = ("index", "question", "answer", "image", "A", "B")
    default_reading = "llava"

    def __init__(self, data_dir: str | None = None, circular: bool = True, answer_reading: str | None = None):
        super().__init__(data_dir, answer_reading)
        self.circular = bool(circular)

    def to_samples(self, row, index):
        """One sample per row; its question group (``index % 1_000_000``) is remembered for CircularEval."""
        letters = [c for c in OPTION_COLUMNS if present(row.get(c))]
        if letters != list(OPTION_COLUMNS[: len(letters)]):
            raise ValueError(f"options must be consecutive from A, got {letters}")
        options = [str(row[c]).strip() for c in letters]
        answer = str(row["answer"]).strip().upper()
        if answer not in letters:
            raise ValueError(f"answer {row['answer']!r} is not one of the options {letters}")
        row_index = int(row["index"])
        # What MMBench's evaluator reads option texts from: every A-D cell that pandas does not call missing
        # (so a literal "nan" string is an option text there, as in lmms-eval's results frame).
        raw = {c: row.get(c, "nan") for c in "ABCD"}
        judge_choices = {c: v for c, v in raw.items() if not _missing(v)}
        sid = str(row_index)
        self.by_id[sid] = {"group": row_index % COPY_STRIDE, "first": row_index < COPY_STRIDE, "choices": judge_choices}
        image = self.image(row["image"])
        family = str(row.get("category") or "mmbench")
        return [Sample(sid, self.prompt(row, options), answer, family, (image,), choices=tuple(options))]

    def prompt(self, row: dict, options: list[str]) -> str:
        """The question as the reference of ``answer_reading`` asks it."""
        if self.answer_reading == "llava":
            hint = f"{row['hint']}\n" if present(row.get("hint")) else ""
            return hint + str(row["question"]) + "\n" + options_text(options) + OPTION_ANSWER
        lines = "\n".join(
            f"{c}. {row[c]}" for c in "ABCDE" if c in row and row[c] and not _missing(row[c]) and row[c] != "nan"
        )
        body = f"{SYS_PROMPT}\n{lines}".rstrip("\n")
        hint = row.get("hint")
        head = f"{hint} {row['question']}" if not _missing(hint) and hint != "nan" else f"{row['question']}"
        return f"{head} {body}\n{OPTION_ANSWER}"

    def is_correct(self, prediction, sample):
        """MMBench's ``can_infer`` reads the prediction's option, and it is the answer."""
        return mmbench_read(prediction, self.by_id[sample.id]["choices"]) == sample.answer

    def aggregate(self, records):
        """CircularEval accuracy over question groups (or first-copy accuracy), per category, and the first copies'
        accuracy.
        """
        groups: dict[int, list[tuple[bool, str, bool]]] = {}
        for r, sample in self.with_samples(records):
            info = self.by_id[sample.id]
            groups.setdefault(info["group"], []).append(
                (info["first"], sample.family, self.is_correct(r["prediction"], sample))
            )
        # As MMBench's evaluator: a group is scored only when its question's own row (index < 1e6) was asked.
        scored = {g: v for g, v in groups.items() if any(first for first, _, _ in v)}
        if not scored:
            raise ValueError(
                "mmbench: no record is a question's own row (index < 1,000,000); CircularEval scores those groups"
            )
        first = [{"family": f, "correct": c} for v in scored.values() for is_first, f, c in v if is_first]
        circular = [
            {"family": next(f for is_first, f, _ in v if is_first), "correct": all(c for _, _, c in v)}
            for v in scored.values()
        ]
        per_q = circular if self.circular else first
        return {
            "accuracy": mean(q["correct"] for q in per_q),
            "per_family": per_family_accuracy(per_q),
            "circular": self.circular,
            "accuracy_first_copy": mean(q["correct"] for q in first),
            "n": len(per_q),
            "n_samples": len(records),
            "answer_reading": self.answer_reading,
        }


def _missing(value) -> bool:
    """pandas' ``isna`` for one cell: None or NaN (a "nan" string is not missing)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
