"""Answer readings of the reference scorers, one function per benchmark and reference, re-implemented exactly.

Two references (a benchmark's ``answer_reading``; ``docs/benchmarks.md`` gives each default):

- ``lmms-eval``: lmms-eval 0.6.1's ``process_results`` and aggregation functions
  (``lmms_eval/tasks/<bench>/utils.py`` at tag v0.6.1 and the metrics its task YAMLs name).
- ``llava``: LLaVA-1.5's evaluation scripts (``llava/eval/eval_pope.py``, ``eval_science_qa.py``,
  ``m4c_evaluator.py``, ``scripts/convert_gqa_for_eval.py`` + GQA's ``eval.py``, MME's
  ``eval_tool/calculation.py``); MMBench is scored by MMBench's own evaluator, which lmms-eval copies.

``tests/test_scoring_parity.py`` runs lmms-eval's own functions on the same predictions and asserts
equal scores; what cannot be equal (an LLM judge, a crash) is listed in ``docs/benchmarks.md``.
Nothing here imports the rest of the package.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

READINGS = ("lmms-eval", "llava")


def check_reading(value: str, allowed: Sequence[str], bench: str) -> str:
    """``value`` when it is one of ``allowed`` readings of ``bench``; a ValueError naming the valid ones otherwise."""
    if value not in allowed:
        raise ValueError(f"{bench}: answer_reading {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


# -- POPE -----------------------------------------------------------------------------------------------------


def pope_llava(text: str) -> str:
    """LLaVA's ``eval_pope.py``: "no" if the first sentence (commas dropped, split on spaces) has "No", "no" or "not";
    else "yes".

    Case-sensitive, as the script: "NO" and "no!" read "yes".
    """
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_lmms_eval(text: str) -> str:
    """lmms-eval's ``pope_process_results``: the prediction lower-cased and stripped (right only when exactly
    yes/no)."""
    return text.lower().strip()


def pope_lmms_eval_scores(preds: Sequence[str], golds: Sequence[str]) -> dict:
    """lmms-eval's POPE aggregations over (lmms-eval-read prediction, gold) pairs.

    As lmms-eval: a prediction that is neither "yes" nor "no" is a false positive or negative
    nowhere, and ``yes_ratio`` is the share of *gold* answers that are yes.
    """
    n = len(preds)
    tp = sum(g == "yes" and p == "yes" for p, g in zip(preds, golds))
    fp = sum(g == "no" and p == "yes" for p, g in zip(preds, golds))
    fn = sum(g == "yes" and p == "no" for p, g in zip(preds, golds))
    precision = tp / (tp + fp) if tp + fp > 0 else 0
    recall = tp / (tp + fn) if tp + fn > 0 else 0
    yes, no = sum(g == "yes" for g in golds), sum(g == "no" for g in golds)
    return {
        "accuracy": sum(p == g for p, g in zip(preds, golds)) / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0,
        "yes_ratio": yes / (yes + no) if yes + no > 0 else 0,
    }


# -- MME ------------------------------------------------------------------------------------------------------


def mme_lmms_eval(text: str) -> str:
    """lmms-eval's ``parse_pred_ans`` (Otter's): exactly yes/no, a lone "y"/"n", else yes/no in the first four
    characters, else "other".

    Lower case, surrounding space and every period removed first.
    """
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_llava(text: str) -> str:
    """MME's ``calculation.py`` (LLaVA-1.5 scores MME with it): lower case, exactly yes/no, else yes/no in the first
    four characters, else "other".
    """
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


# -- GQA ------------------------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def gqa_lmms_eval(prediction: str, answer: str) -> bool:
    """lmms-eval's ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (GQA's task YAML): whole strings, no
    stripping.
    """
    return prediction.lower().translate(_PUNCT_TABLE) == answer.lower().translate(_PUNCT_TABLE)


def gqa_llava(prediction: str, answer: str) -> bool:
    """LLaVA's ``convert_gqa_for_eval.py`` (``rstrip('.')``, lower case), then GQA's ``eval.py`` (equal to the
    answer)."""
    return prediction.rstrip(".").lower() == answer


# -- ScienceQA ------------------------------------------------------------------------------------------------


def scienceqa_lmms_eval(prediction: str, answer: str) -> bool:
    """lmms-eval's ``sqa_process_results``: the stripped prediction is the letter (any case), or starts "X." with X
    upper case.
    """
    target = answer.strip().lower()
    pred = prediction.strip()
    if pred.lower() == target:
        return True
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0].lower() == target
    return False


def scienceqa_llava(prediction: str, answer: str, n_choices: int) -> bool:
    """LLaVA-1.5's ``eval_science_qa.py``: the letter exactly, "X. ..." , or exactly one "The answer is X." match; a
    letter beyond the choices is wrong.
    """
    options = ("A", "B", "C", "D", "E")  # a list in the script: membership is whole-string, never a substring
    if prediction in options:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in options and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", prediction)
        letter = found[0] if len(found) == 1 else "FAILED"
    # get_pred_idx: a letter outside the question's choices counts as no answer (-1).
    return letter in options[:n_choices] and letter == answer


# -- MMBench (MMBench's evaluator, as lmms-eval copies it) ------------------------------------------------------


def mmbench_infer_option(answer: str, num_choice: int = 5) -> str | bool:
    """MMBench's ``can_infer_option``: the one option letter standing alone (or as "X.", "(X)", ...) in the answer, else
    False.
    """
    choices = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return False

    def count(splits, choices="ABCD", prefix="", suffix=""):
        return sum(prefix + c + suffix in splits for c in choices)

    splits = [x.strip() for x in answer.split()]
    if count(splits, choices) == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:  # "A" may be an article: fall through to the marked forms
                break
            if ch in splits:
                return ch
    tups = [
        ("", "."),
        ("", ","),
        ("", ":"),
        ("", ")"),
        ("", ")."),
        ("(", ")"),
        ("(", ")."),
        (":", ""),
        (":", ","),
        (":", "."),
        (":", ")"),
        (":", ")."),
    ]
    for prefix, suffix in tups:
        if count(splits, choices, prefix=prefix, suffix=suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return False


def mmbench_infer_text(answer: str, choices: Mapping[str, str]) -> str | bool:
    """MMBench's ``can_infer_text``: the one option (of A-D) whose lower-cased text occurs in the lower-cased answer,
    else False.
    """
    answer = answer.lower()
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else False


def mmbench_read(prediction: str, choices: Mapping[str, str]) -> str | bool:
    """MMBench's ``can_infer`` on a stripped prediction: the option letter it reads, or False (where MMBench would ask
    an LLM judge).
    """
    prediction = str(prediction.strip())
    return mmbench_infer_option(prediction) or mmbench_infer_text(
        prediction, {k: v for k, v in choices.items() if k in "ABCD"}
    )


# -- MVBench --------------------------------------------------------------------------------------------------

_MV_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_MV_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_MV_COMMA = re.compile(r"(\d)(\,)(\d)")


def mvbench_process(answer: str) -> str:
    """lmms-eval's ``mcq_acc`` reading: "X. ..." gives X; else punctuation dropped and the first standalone a-e word,
    upper-cased; else the cleaned text.
    """
    match = re.match(r"^([A-E])\.\s*(.+)$", answer.strip(), re.IGNORECASE)
    if match:
        return match.group(1).upper()
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _MV_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text) or _MV_COMMA.search(text) is not None else " ")
    out = _MV_PERIOD.sub("", out)
    out = out.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", out, re.IGNORECASE)
    return letter.group(1).upper() if letter else out


def mvbench_lmms_eval(prediction: str, answer_letter: str) -> bool:
    """lmms-eval's ``mcq_acc``: both readings (``mvbench_process``) agree."""
    return mvbench_process(prediction) == mvbench_process(answer_letter)


# -- Video-MME ------------------------------------------------------------------------------------------------

# lmms-eval's list, with its two missing commas: "The best option isThe correct option is" and
# "Best answer:Best option:" are single (never-matching) prefixes there, so they are here.
_VIDEOMME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)


def videomme_lmms_eval(prediction: str) -> str:
    """lmms-eval's ``extract_characters_regex``: answer phrases removed, then the first capital A-D anywhere ("" when
    none, or over ten words without one).
    """
    s = prediction.strip()
    for prefix in _VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    match = re.search(r"[ABCD]", s)
    return match[0] if match else ""
