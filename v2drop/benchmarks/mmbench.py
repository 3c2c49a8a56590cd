"""MMBench: single-image multiple-choice questions over 20 abilities, with optional circular evaluation."""

from __future__ import annotations

from v2drop.benchmarks.base import Sample, register_benchmark
from v2drop.benchmarks.hub import HFBenchmark, present
from v2drop.benchmarks.metrics import mean, option_is_correct, per_family_accuracy
from v2drop.benchmarks.prompts import OPTION_ANSWER, options_text

OPTION_COLUMNS = "ABCDE"


@register_benchmark("mmbench")
class MMBench(HFBenchmark):
    """MMBench English dev (``lmms-lab/MMBench``, configuration ``en``, split ``dev``: 4,329 questions).

    Splits: ``dev`` (default) and ``test``, another name for ``dev`` (MMBench's test answers are
    not public).

    Local copy: ``<data_dir>/dev.jsonl`` (or ``test.jsonl``) with ``index``, ``question``,
    ``hint`` (may be null/"nan"), options ``A`` ``B`` ``C`` ``D`` (and ``E``; absent ones null
    or "nan"), ``answer`` (a letter), ``category`` and ``image`` (path relative to ``data_dir``,
    or base64 as in MMBench's TSV files). ``L2-category``, ``source``, ``split``, ``comment``
    are ignored.

    Prompt: hint + "\\n" + question + "\\nA. ..." lines + "\\nAnswer with the option's letter from
    the given choices directly." (LLaVA-1.5). ``circular=True`` asks each question once per
    rotation of its options (ids ``<index>@<shift>``); a question counts only if every rotation is
    answered right (MMBench's CircularEval), and ``limit`` never splits a question's rotations.
    ``aggregate``: ``accuracy`` per question (circular when on), ``accuracy_first_rotation`` (the
    plain accuracy on the original order) and per category.
    """

    hf_name = "lmms-lab/MMBench"
    hf_config = "en"
    splits = ("dev", "test")
    default_split = "dev"
    split_aliases = {"test": "dev"}
    columns = ("index", "question", "answer", "image", "A", "B")

    def __init__(self, data_dir: str | None = None, circular: bool = False):
        super().__init__(data_dir)
        self.circular = bool(circular)
        self.whole_rows = self.circular

    def to_samples(self, row, index):
        """One sample, or one per rotation of the options."""
        letters = [c for c in OPTION_COLUMNS if present(row.get(c))]
        if letters != list(OPTION_COLUMNS[: len(letters)]):
            raise ValueError(f"options must be consecutive from A, got {letters}")
        options = [str(row[c]).strip() for c in letters]
        answer = str(row["answer"]).strip().upper()
        if answer not in letters:
            raise ValueError(f"answer {row['answer']!r} is not one of the options {letters}")
        hint = f"{str(row['hint']).strip()}\n" if present(row.get("hint")) else ""
        image = self.image(row["image"])
        family = str(row.get("category") or "mmbench")
        out = []
        for shift in range(len(options) if self.circular else 1):
            rotated = options[shift:] + options[:shift]
            gold = OPTION_COLUMNS[(letters.index(answer) - shift) % len(options)]
            sid = f"{row['index']}@{shift}"
            self.by_id[sid] = {"question": str(row["index"]), "shift": shift}
            question = hint + str(row["question"]).strip() + "\n" + options_text(rotated) + OPTION_ANSWER
            out.append(Sample(sid, question, gold, family, (image,), choices=tuple(rotated)))
        return out

    def is_correct(self, prediction, sample):
        """The option the prediction picks (letter, or an option's text) is the answer."""
        return option_is_correct(prediction, sample.answer, sample.choices, OPTION_COLUMNS)

    def aggregate(self, records):
        """Accuracy per question (all rotations right when circular), per category, and on the original order."""
        questions: dict[str, list[tuple[int, str, bool]]] = {}
        for r, sample in self.with_samples(records):
            info = self.by_id[sample.id]
            questions.setdefault(info["question"], []).append((info["shift"], sample.family, self.is_correct(r["prediction"], sample)))
        per_q = [{"family": v[0][1], "correct": all(c for _, _, c in v)} for v in questions.values()]
        first = [c for v in questions.values() for shift, _, c in v if shift == 0]
        return {"accuracy": mean(q["correct"] for q in per_q), "per_family": per_family_accuracy(per_q), "circular": self.circular,
                "accuracy_first_rotation": mean(first), "n": len(per_q), "n_samples": len(records)}
