"""Every rule that reads an answer or scores one, for all benchmarks, in one place.

Each benchmark's prompt and metric are described in ``docs/benchmarks.md``; the rules here keep
the behaviour each benchmark has always had (the two yes/no readings differ on purpose: they are
POPE's and MME's own). Nothing here imports the rest of the package.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

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

    Used by ``pope``. As the official POPE script (first sentence, commas dropped, split on
    spaces), except that words are lower-cased and stripped of punctuation, so "NO" and "no!"
    count as no too. Never returns anything but "yes" or "no".
    """
    first = text.split(".")[0]
    words = {w.strip(string.punctuation) for w in first.replace(",", "").lower().split()}
    return "no" if words & {"no", "not"} else "yes"


def read_yes_no_by_prefix(text: str) -> str:
    """MME's reading of an answer: exactly yes/no, else yes/no within its first four characters, else "other".

    Used by ``mme``. Lower case and periods removed first; "yes" is looked for before "no", so
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
    """MME's scores of one subtask: acc (questions right), acc+ (images with every question right), (acc + acc+) × 100."""
    acc = mean(c for v in correct_by_image.values() for c in v)
    acc_plus = mean(all(v) for v in correct_by_image.values())
    return {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}


# -- multiple choice ----------------------------------------------------------------------------------------


def parse_option(text: str, letters: str = "ABCD", choices: Sequence[str] = ()) -> str:
    """The option letter an answer picks, or "" if none (what official multiple-choice evals accept).

    Used by ``mmbench``, ``scienceqa-img``, ``mvbench`` and ``videomme``. In order: a bare letter
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


# -- the VQA answer normaliser (TextVQA, GQA) ---------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
# Contractions the VQA evaluation restores when written without apostrophes. Forms of "I" are left
# out (answers are lower-cased first, and the original table only lists them capitalised), and so
# are forms that are ordinary words without the apostrophe (he'll -> hell, we're -> were).
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he'll he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't must've needn't
not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll something's that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we're we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
_ORDINARY_WORDS = {"hell", "were"}  # he'll, we're


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for mask in range(2 ** len(cuts) - 1):  # every way of dropping apostrophes but keeping them all
            kept = {cuts[j] for j in range(len(cuts)) if mask >> j & 1}
            variant = "".join(ch for i, ch in enumerate(word) if ch != "'" or i in kept)
            if variant not in _ORDINARY_WORDS:
                table.setdefault(variant, word)
    return table


_CONTRACTIONS = _contraction_table()


def normalize_vqa(answer: str) -> str:
    """The standard VQA answer normalisation (as EvalAI's answer processor).

    Lower case; commas and question marks dropped; a punctuation mark touching a space removed,
    elsewhere (``t-shirt``) replaced by a space, all of them removed when the answer has a
    digit-comma-digit; periods removed unless a digit follows; number words to digits; articles
    dropped; apostrophe-less contractions restored ("dont" -> "don't").
    """
    text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    joined_digits = re.search(r"\d,\d", text) is not None
    out = text
    for p in _PUNCT:
        # The conditions look at the text before any replacement, as the reference implementation does.
        out = out.replace(p, "" if joined_digits or (p + " ") in text or (" " + p) in text else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_exact_match(prediction: str, answer: str) -> bool:
    """``normalize_vqa`` of both agree: GQA's rule."""
    return normalize_vqa(prediction) == normalize_vqa(answer)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy (TextVQA's metric): over the leave-one-annotator-out subsets, the mean of min(1, matches / 3)."""
    pred = normalize_vqa(prediction)
    gold = [normalize_vqa(a) for a in answers]
    if len(gold) < 2:
        return float(bool(gold) and gold[0] == pred)
    matches = sum(g == pred for g in gold)
    # Leaving out annotator i removes one match exactly when annotator i gave the predicted answer.
    return mean(min(1.0, (matches - (g == pred)) / 3) for g in gold)


def vqa_full_credit(prediction: str, answers: Sequence[str]) -> bool:
    """At least three annotators (all of them when fewer) gave the prediction, after ``normalize_vqa``: TextVQA's ``is_correct``."""
    pred = normalize_vqa(prediction)
    return sum(normalize_vqa(a) == pred for a in answers) >= min(3, len(answers))
