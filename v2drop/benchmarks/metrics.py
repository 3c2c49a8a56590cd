"""Every rule that reads an answer or scores one, for all benchmarks, in one place.

The benchmarks score with the reference readings of ``v2drop.benchmarks.reading`` (lmms-eval's
and LLaVA-1.5's, chosen by ``answer_reading``); the lenient readings here (``parse_option``,
``read_yes_no_by_*``, ``exact_match``) serve the digits benchmarks and users' own benchmarks.
Nothing here imports the rest of the package but ``vqa`` (EvalAI's normaliser).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

from v2drop.benchmarks.vqa import normalize_vqa, vqa_accuracy  # noqa: F401  (re-exported: EvalAI's normaliser)

# -- generic ------------------------------------------------------------------------------------------------


def mean(values: Iterable) -> float:
    """Arithmetic mean of numbers or booleans (0.0 for none)."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def per_family_accuracy(records: Iterable[dict], key: str = "correct") -> dict[str, float]:
    """Mean of ``key`` (correctness or a soft score) per ``family``, families sorted."""
    per: dict[str, list[float]] = {}
    for r in records:
        per.setdefault(r["family"], []).append(float(r[key]))
    return {f: mean(v) for f, v in sorted(per.items())}


def normalize_answer(text: str) -> str:
    """Lower case, first word only, surrounding punctuation removed ("A." -> "a", "Yes, it is" -> "yes")."""
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


def exact_match(prediction: str, answer: str) -> bool:
    """``normalize_answer`` of both agree: the digits benchmarks' rule (and the ``Benchmark`` default)."""
    return normalize_answer(prediction) == normalize_answer(answer)


# -- yes/no -------------------------------------------------------------------------------------------------


def read_yes_no_by_negation(text: str) -> str:
    """POPE's reading of an answer: "no" if its first sentence has the word "no" or "not", else "yes".

    A lenient reading (the ``pope`` benchmark reads with LLaVA's exact, case-sensitive rule,
    ``reading.pope_llava``): as LLaVA's ``eval_pope.py`` (first sentence, commas dropped), except
    that words are lower-cased and stripped of punctuation, so "NO" and "no!" count as no too.
    Never returns anything but "yes" or "no".
    """
    first = text.split(".")[0]
    words = {w.strip(string.punctuation) for w in first.replace(",", "").lower().split()}
    return "no" if words & {"no", "not"} else "yes"


def read_yes_no_by_prefix(text: str) -> str:
    """MME's reading of an answer: exactly yes/no, else yes/no within its first four characters, else "other".

    A lenient reading (the ``mme`` benchmark reads with ``reading.mme_llava`` / ``mme_lmms_eval``).
    Lower case and periods removed first; "yes" is looked for before "no", so
    "Not sure" reads "no" and "The answer is no" reads "other" (wrong for either answer).
    """
    text = text.strip().lower().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def binary_scores(predicted_yes: Sequence[bool], gold_yes: Sequence[bool]) -> dict:
    """Accuracy, precision, recall, F1 (positive = yes) and the share of yes answers; 0.0 where undefined (POPE)."""
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


def acc_plus_scores(correct_by_image: dict[str, list[bool]]) -> dict[str, float]:
    """MME's scores of one subtask: acc (questions right), acc+ (images with every question right), (acc + acc+) ×
    100."""
    acc = mean(c for v in correct_by_image.values() for c in v)
    acc_plus = mean(all(v) for v in correct_by_image.values())
    return {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}


# -- multiple choice ----------------------------------------------------------------------------------------


def parse_option(text: str, letters: str = "ABCD", choices: Sequence[str] = ()) -> str:
    """The option letter an answer picks, or "" if none (what official multiple-choice evals accept).

    A lenient reading for users' own benchmarks; the real benchmarks read as their references do
    (``v2drop.benchmarks.reading``), which accept far less. In order: a bare letter
    ("B", "(B)", "b."); the text of exactly one option (after ``normalize_vqa``); a leading letter
    ("B. cat", "(C) cat"); an answer phrase ("Answer: C", "The best answer is (B).", "Best
    option: D"); "(B)" anywhere; the first capital option letter standing alone ("I think B").
    """
    text = text.strip()
    cls = f"[{letters}]"
    bare = re.fullmatch(rf"\(?({cls})\)?[.):]?", text, flags=re.IGNORECASE)
    if bare:
        return bare.group(1).upper()
    if choices:
        norm = normalize_vqa(text)
        hits = [i for i, c in enumerate(choices) if i < len(letters) and normalize_vqa(str(c)) == norm]
        if len(hits) == 1:
            return letters[hits[0]]
    patterns = (
        rf"^\(?({cls})\)?(?=[\s.,:;)\]])",
        rf"(?i:answer|option|choice)(?i:\s+is)?\s*[:：]?\s*\(?({cls})\)?(?![A-Za-z])",
        rf"\(({cls})\)",
        rf"(?<![A-Za-z])({cls})(?![A-Za-z])",
    )
    for pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return ""


def option_is_correct(prediction: str, answer: str, choices: Sequence[str], letters: str) -> bool:
    """The option ``parse_option`` reads from ``prediction`` (first ``len(choices)`` of ``letters``) is ``answer``."""
    return parse_option(prediction, letters[: len(choices)], choices) == answer


# -- the VQA answer normaliser (TextVQA): EvalAI's, in v2drop.benchmarks.vqa --------------------------------


def vqa_exact_match(prediction: str, answer: str) -> bool:
    """``normalize_vqa`` of both agree (a lenient VQA exact match; the benchmarks use their references' readings)."""
    return normalize_vqa(prediction) == normalize_vqa(answer)


def vqa_full_credit(prediction: str, answers: Sequence[str]) -> bool:
    """At least three annotators (all of them when fewer) gave the prediction, after ``normalize_vqa``: TextVQA's
    ``is_correct``.
    """
    pred = normalize_vqa(prediction)
    return sum(normalize_vqa(a) == pred for a in answers) >= min(3, len(answers))
