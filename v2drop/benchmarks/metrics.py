"""Every rule that reads an answer or scores one, for all benchmarks, in one place.

The benchmarks read answers with the reference readings of ``v2drop.benchmarks.reading``
(lmms-eval's and LLaVA-1.5's, chosen by ``answer_reading``); ``exact_match`` here is the digits
benchmarks' rule and the ``Benchmark`` default. Nothing here imports the rest of the package but
``vqa`` (EvalAI's normaliser).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence

from v2drop.benchmarks.vqa import normalize_vqa

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


# -- yes/no (POPE) and MME ----------------------------------------------------------------------------------


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
    """MME's scores of one subtask: acc (questions right), acc+ (images with every question right), (acc + acc+) × 100.

    ``correct_by_image`` maps each image to the correctness of its questions.
    """
    acc = mean(c for v in correct_by_image.values() for c in v)
    acc_plus = mean(all(v) for v in correct_by_image.values())
    return {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}


# -- TextVQA (EvalAI's answer normaliser is in v2drop.benchmarks.vqa) ---------------------------------------


def vqa_full_credit(prediction: str, answers: Sequence[str]) -> bool:
    """At least three annotators (all, when fewer) gave it, after ``normalize_vqa``: TextVQA's ``is_correct``."""
    pred = normalize_vqa(prediction)
    return sum(normalize_vqa(a) == pred for a in answers) >= min(3, len(answers))
