"""Scoring parity: in ``answer_reading=llava`` our scores equal LLaVA-1.5's own evaluation scripts.

The references are LLaVA's files as published on PyPI (``llava-torch`` 1.2.2.post1, which CI
installs without dependencies): ``llava/eval/eval_pope.py`` (``eval_pope``), ``eval_science_qa.py``
(run as the script it is) and ``eval_textvqa.py`` (``eval_single``, which uses ``m4c_evaluator.py``).
Each is loaded from its file, not through ``import llava``: the package's ``__init__`` imports
LLaVA's model code, which needs a transformers 4.x and never takes part in scoring. Every
reference reads files in LLaVA's formats (label files, ``problems.json``, answer files), so the
tests write those from our samples and the predictions.

GQA, MME and MMBench are scored in LLaVA-1.5 by files that are not in the package (GQA's ``eval.py``,
MME's ``calculation.py``, MMBench's server); ``tests/test_realbench.py`` checks those readings on
hand-worked cases, and ``docs/benchmarks.md`` says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import runpy
import sys
import types
from pathlib import Path

import pytest

from v2drop.benchmarks import get_benchmark

SPEC = importlib.util.find_spec("llava")
if SPEC is None or not SPEC.submodule_search_locations:
    pytest.skip(
        "llava-torch is not installed (pip install --no-deps llava-torch==1.2.2.post1)", allow_module_level=True
    )
EVAL = Path(SPEC.submodule_search_locations[0]) / "eval"
FIXTURES = Path(__file__).parent / "fixtures" / "realbench"

# Predictions that tell LLaVA's readings apart from looser ones: case, sentences, commas, letters
# with and without ". ", "The answer is X.", several matches, letters beyond the choices.
ADVERSARIAL = [
    "Yes",
    "yes.",
    "YES",
    "Yes, there is.",
    " no ",
    "No.",
    "NO",
    "No, it is not.",
    "not sure",
    "There is no dog",
    "no!",
    "Nope",
    "It is not. Yes.",
    "",
    "A",
    "B",
    "E",
    "(B)",
    "B.",
    "B. ",
    "C. cat",
    "b",
    "The answer is C.",
    "The answer is D. The answer is A.",
    "the answer is B.",
    "Answer: C",
    "cat",
    "two",
    "2",
    "Two.",
    "three apples",
    "pepsi",
    "Pepsi!",
    "coca cola",
    "The Coca-Cola",
    "red",
    "RED.",
    "left",
    "don't know",
    "2 ",
    "  C  ",
    " A",
    "B ",
    " D ",
    "A.",
    "D. dog",
    "(A)",
]


def llava_module(name: str) -> types.ModuleType:
    """``llava/eval/<name>.py`` loaded from its file; ``llava`` and ``llava.eval`` are bare packages while it
    imports."""
    added = []
    for pkg, path in (("llava", EVAL.parent), ("llava.eval", EVAL)):
        if pkg not in sys.modules:
            module = types.ModuleType(pkg)
            module.__path__ = [str(path)]
            sys.modules[pkg] = module
            added.append(pkg)
    try:
        spec = importlib.util.spec_from_file_location(f"llava.eval.{name}", EVAL / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        added.append(spec.name)
        spec.loader.exec_module(module)
        return module
    finally:
        for pkg in added:
            sys.modules.pop(pkg, None)


def prediction_sets(n: int) -> list[list[str]]:
    """Every adversarial prediction at every position."""
    return [[ADVERSARIAL[(i + s) % len(ADVERSARIAL)] for i in range(n)] for s in range(len(ADVERSARIAL))]


def ours(bench, samples, preds) -> dict:
    """Our aggregate over hand-written predictions, as the harness records them."""
    return bench.aggregate([{"id": s.id, "family": s.family, "prediction": p} for s, p in zip(samples, preds)])


def printed(fn, *args) -> str:
    """What ``fn(*args)`` prints (LLaVA's scripts report by printing)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def printed_value(text: str, label: str) -> float:
    """The number after ``label: `` in printed output (the last such line)."""
    lines = [line for line in text.splitlines() if line.startswith(label + ": ")]
    return float(lines[-1].split(": ", 1)[1])


def test_pope_llava_parity(tmp_path):
    """``eval_pope(answers, label_file)``, per category as the script's ``__main__`` calls it."""
    ref = llava_module("eval_pope")
    bench = get_benchmark("pope", data_dir=str(FIXTURES / "pope"), answer_reading="llava")
    samples = bench.load("test")
    categories = sorted({s.family for s in samples})
    for preds in prediction_sets(len(samples)):
        out = ours(bench, samples, preds)
        assert out["answer_reading"] == "llava"
        for category in categories:
            rows = [(s, p) for s, p in zip(samples, preds) if s.family == category]
            labels = tmp_path / f"coco_pope_{category}.json"
            labels.write_text("".join(json.dumps({"label": s.answer}) + "\n" for s, _ in rows))
            mine = out["per_split"][category]
            read_yes = [bench.read(p) == "yes" for _, p in rows]
            gold_yes = [s.answer == "yes" for s, _ in rows]
            if not any(r and g for r, g in zip(read_yes, gold_yes)):
                # No true positive: the script divides by TP+FP, TP+FN or precision+recall = 0 and has no score.
                with pytest.raises(ZeroDivisionError):
                    printed(ref.eval_pope, [{"text": p} for _, p in rows], str(labels))
                continue
            text = printed(ref.eval_pope, [{"text": p} for _, p in rows], str(labels))
            assert mine["accuracy"] == pytest.approx(printed_value(text, "Accuracy"))
            assert mine["precision"] == pytest.approx(printed_value(text, "Precision"))
            assert mine["recall"] == pytest.approx(printed_value(text, "Recall"))
            assert mine["f1"] == pytest.approx(printed_value(text, "F1 score"))
            assert mine["yes_ratio"] == pytest.approx(printed_value(text, "Yes ratio"))


def test_scienceqa_llava_parity(tmp_path, monkeypatch):
    """``eval_science_qa.py`` run as a script over ``problems.json``, ``pid_splits.json`` and an answer file."""
    bench = get_benchmark("scienceqa-img", data_dir=str(FIXTURES / "scienceqa"), answer_reading="llava")
    samples = bench.load("test")
    letters = "ABCDE"
    problems = {s.id: {"choices": list(s.choices), "answer": letters.index(s.answer)} for s in samples}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": [s.id for s in samples]}))
    script = EVAL / "eval_science_qa.py"
    for k, preds in enumerate(prediction_sets(len(samples))):
        answers = tmp_path / f"answers{k}.jsonl"
        # "<image>" in the prompt marks a multimodal question, which every ScienceQA-IMG question is.
        answers.write_text(
            "".join(
                json.dumps({"question_id": s.id, "prompt": "<image>\n" + s.question, "text": p}) + "\n"
                for s, p in zip(samples, preds)
            )
        )
        result = tmp_path / f"result{k}.json"
        monkeypatch.setattr(
            sys,
            "argv",
            [
                str(script),
                "--base-dir",
                str(tmp_path),
                "--result-file",
                str(answers),
                "--output-file",
                str(tmp_path / f"out{k}.json"),
                "--output-result",
                str(result),
            ],
        )
        printed(runpy.run_path, str(script), None, "__main__")
        reference = json.loads(result.read_text())
        correct = {pid: idx == problems[pid]["answer"] for pid, idx in reference["results"].items()}
        assert {s.id: bench.is_correct(p, s) for s, p in zip(samples, preds)} == correct
        assert 100 * ours(bench, samples, preds)["accuracy"] == pytest.approx(reference["acc"])


def test_textvqa_llava_parity(tmp_path):
    """``eval_textvqa.eval_single``: LLaVA's prompt parsing (our llava prompt, OCR line included) and
    ``m4c_evaluator``."""
    ref = llava_module("eval_textvqa")
    bench = get_benchmark("textvqa", data_dir=str(FIXTURES / "textvqa"), answer_reading="llava")
    samples = bench.load("validation")
    docs = [json.loads(line) for line in open(FIXTURES / "textvqa" / "validation.jsonl") if line.strip()]
    # LLaVA keys annotations by (image_id, question) and its answer files' question_id by the image id;
    # the question id stands in for it here, which keeps two questions on one image apart.
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    annotations.write_text(
        json.dumps(
            {
                "data": [
                    {"image_id": str(d["question_id"]), "question": d["question"], "answers": d["answers"]}
                    for d in docs
                ]
            }
        )
    )
    for k, preds in enumerate(prediction_sets(len(samples)) + [[d["answers"][0].upper() + "!" for d in docs]]):
        answers = tmp_path / f"answers{k}.jsonl"
        answers.write_text(
            "".join(
                json.dumps({"question_id": s.id, "prompt": s.question, "text": p}) + "\n"
                for s, p in zip(samples, preds)
            )
        )
        text = printed(ref.eval_single, str(annotations), str(answers))
        printed_accuracy = float(text.split("Accuracy: ")[1].split("%")[0])  # two decimals
        exact = ref.TextVQAAccuracyEvaluator().eval_pred_list(
            [{"pred_answer": p, "gt_answers": d["answers"]} for d, p in zip(docs, preds)]
        )
        mine = ours(bench, samples, preds)["accuracy"]
        assert mine == pytest.approx(exact) and 100 * mine == pytest.approx(printed_accuracy, abs=5e-3)
