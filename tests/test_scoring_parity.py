"""Scoring parity: in ``answer_reading=lmms-eval`` every real benchmark scores as lmms-eval 0.6.1's own functions.

The references are imported from the installed ``lmms_eval`` package (its ``.py`` files). What is
stubbed, and why it cannot change a score:

- ``lmms_eval.tasks`` is registered as a bare package, so its ``__init__`` (the task registry, which
  imports ``datasets`` and the whole API) does not run; the task modules are imported from their files.
- The task YAMLs are not in the wheel; the three modules that read one at import (``mmbench/en_utils``,
  ``mvbench/utils``, ``videomme/utils``) are served the keys they read (``metadata.sys_prompt``,
  ``dataset_kwargs.cache_dir``) with lmms-eval v0.6.1's values.
- ``cv2`` and ``datasets`` (``videomme/utils``: video decoding and a type annotation), ``sacrebleu`` and
  ``lmms_eval.api.registry`` (``api/metrics``: BLEU and the metric registry decorators) are empty modules:
  the scoring functions never call them.
- MMBench's LLM judge (a network call for answers its ``can_infer`` cannot read) is replaced by one that
  reads no option; ``docs/benchmarks.md`` lists this as the one remaining difference.

``PROMPT_KWARGS`` are the ``lmms_eval_specific_kwargs`` defaults of the v0.6.1 task YAMLs.
"""

from __future__ import annotations

import base64
import builtins
import copy
import importlib
import io
import json
import os
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from v2drop.benchmarks import get_benchmark, list_benchmarks

lmms_eval = pytest.importorskip("lmms_eval")
ROOT = Path(lmms_eval.__file__).parent
FIXTURES = Path(__file__).parent / "fixtures" / "realbench"

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
PROMPT_KWARGS = {  # lmms_eval_specific_kwargs["default"] in the v0.6.1 YAMLs
    "pope": {"pre_prompt": "", "post_prompt": SHORT},
    "mme": {"pre_prompt": "", "post_prompt": SHORT},
    "gqa": {"pre_prompt": "", "post_prompt": SHORT},
    "scienceqa": {"format": "default", "pre_prompt": "", "post_prompt": LETTER},
    "textvqa": {"pre_prompt": "", "post_prompt": SHORT, "ocr": False},
    "mmbench": {"pre_prompt": "", "post_prompt": LETTER},
    "mvbench": {"post_prompt": "Only give the best option.\n"},
    "videomme": {"pre_prompt": "", "post_prompt": LETTER},
}
YAML_TEXT = {  # what the modules read from their YAML at import, with v0.6.1's values
    "mmbench.yaml": 'metadata:\n  version: 0.0\n  sys_prompt: "There are several options:"\n',
    "_default_template_yaml": "dataset_kwargs:\n  cache_dir: mvbench_video\n",
    "videomme.yaml": "dataset_kwargs:\n  cache_dir: videomme\n",
}

# Predictions that tell readings apart: casing, punctuation, "Yes," prefixes, letters in parentheses,
# option text, empty answers, number words, long answers.
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
    "y",
    "n",
    "",
    "A",
    "(B)",
    "B.",
    "b",
    "c",
    "C. cat",
    "D) dog",
    "The answer is D.",
    "The best answer is (A).",
    "Answer: C",
    "I think A is right",
    "Option B",
    "cat",
    "dog",
    "bird",
    "left",
    "two",
    "2",
    "none",
    "Two.",
    "red one",
    "The red one.",
    "t-shirt",
    "T Shirt",
    "don't",
    "dont",
    "3",
    "three apples",
    "E",
    "A. left",
    "The correct answer is B",
    "It is not C but D",
    "Sat on the bed.",
    "(C) Took the cup.",
    "only at the start",
    "a",
    "A.",
    "a. left",
    "no!",
    "Left!",
    "(yes)",
    "Man?",
    "  C  ",
]


# -- importing lmms-eval's task modules -------------------------------------------------------------------------


def _stub(name: str, added: list, **attrs) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        added.append(name)


def lmms_module(relative: str):
    """``lmms_eval.tasks.<relative>`` imported from its file, with only the stubs the module docstring lists."""
    if "lmms_eval.tasks" not in sys.modules or not hasattr(sys.modules["lmms_eval.tasks"], "__path__"):
        pkg = types.ModuleType("lmms_eval.tasks")
        pkg.__path__ = [str(ROOT / "tasks")]
        sys.modules["lmms_eval.tasks"] = pkg
    parts = [p for p in ("tasks/" + relative).split("/")]
    if relative.startswith("../"):
        parts = relative[3:].split("/")
    for i in range(2, len(parts)):
        name = "lmms_eval." + ".".join(parts[:i])
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(ROOT.joinpath(*parts[:i]))]
            sys.modules[name] = pkg
    # Stubs live only while the module imports, so no other test sees a fake ``datasets``.
    added: list[str] = []
    _stub("cv2", added)
    _stub("datasets", added, Dataset=object, load_dataset=None)
    _stub("sacrebleu", added)
    _stub(
        "lmms_eval.api.registry",
        added,
        register_metric=lambda **kw: lambda f: f,
        register_aggregation=lambda name: lambda f: f,
    )
    real_open = builtins.open

    def serve_yaml(file, *args, **kwargs):
        path = Path(str(file))
        if path.name in YAML_TEXT and not path.exists() and ROOT in path.parents:
            return io.StringIO(YAML_TEXT[path.name])
        return real_open(file, *args, **kwargs)

    builtins.open = serve_yaml
    try:
        return importlib.import_module("lmms_eval." + ".".join(parts))
    finally:
        builtins.open = real_open
        for name in added:
            sys.modules.pop(name, None)


# -- helpers ------------------------------------------------------------------------------------------------------


def rows_of(folder: str, split: str) -> list[dict]:
    """The fixture's rows, as lmms-eval's docs (the local schema is the dataset's)."""
    return [json.loads(line) for line in open(FIXTURES / folder / f"{split}.jsonl") if line.strip()]


def prediction_sets(n: int, shifts: int = len(ADVERSARIAL)):
    """Every adversarial prediction at every position: ``shifts`` lists of ``n`` predictions."""
    return [[ADVERSARIAL[(i + s) % len(ADVERSARIAL)] for i in range(n)] for s in range(shifts)]


def ours(bench, samples, preds) -> dict:
    """Our aggregate over hand-written predictions, as the harness records them."""
    return bench.aggregate([{"id": s.id, "family": s.family, "prediction": p} for s, p in zip(samples, preds)])


def tiny_png() -> str:
    """A base64 8x8 PNG for synthetic rows."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_every_real_benchmark_has_a_parity_test():
    tested = {"pope", "mme", "gqa", "mmbench", "scienceqa-img", "textvqa", "mvbench", "videomme"}
    assert set(list_benchmarks()) - {"digits", "digits-video"} == tested
    for name in tested:
        assert "lmms-eval" in get_benchmark(name).readings


# -- EvalAI's VQA normaliser --------------------------------------------------------------------------------------


def test_evalai_normaliser_key_by_key():
    from v2drop.benchmarks import vqa

    ref = lmms_module("_task_utils/vqa_eval_metric").EvalAIAnswerProcessor
    assert vqa.CONTRACTIONS == ref.CONTRACTIONS  # every key and value
    assert (
        vqa.NUMBER_MAP == ref.NUMBER_MAP
        and list(vqa.ARTICLES) == ref.ARTICLES
        and list(vqa.PUNCTUATIONS) == ref.PUNCTUATIONS
    )
    process = ref()
    words = list(ref.CONTRACTIONS) + list(ref.CONTRACTIONS.values()) + list(ref.NUMBER_MAP) + ADVERSARIAL
    texts = (
        words
        + [f"The {w}!" for w in words]
        + [
            "1,000",
            "3.5",
            ".5",
            "5.",
            "a-b",
            "x - y",
            "(yes)",
            "it's",
            "u.s.a.",
            "Coca-Cola!",
            "10,000 people",
            "well\tdone\n",
            "lets",
            "shes",
            "Im",
        ]
    )
    assert {t: vqa.normalize_vqa(t) for t in texts} == {t: process(t) for t in texts}


# -- image benchmarks ---------------------------------------------------------------------------------------------


def test_pope_parity():
    ref = lmms_module("pope/utils")
    bench = get_benchmark("pope", data_dir=str(FIXTURES / "pope"), answer_reading="lmms-eval")
    samples, docs = bench.load("test"), rows_of("pope", "test")
    for doc, s in zip(docs, samples):
        assert s.question == ref.pope_doc_to_text(doc, PROMPT_KWARGS["pope"])
    for preds in prediction_sets(len(docs)):
        results = [ref.pope_process_results(d, [p])["pope_accuracy"] for d, p in zip(docs, preds)]
        out = ours(bench, samples, preds)
        assert out["accuracy"] == pytest.approx(ref.pope_aggregate_accuracy(results))
        assert out["precision"] == pytest.approx(ref.pope_aggregate_precision(results))
        assert out["recall"] == pytest.approx(ref.pope_aggregate_recall(results))
        assert out["f1"] == pytest.approx(ref.pope_aggregate_f1_score(results))
        assert out["yes_ratio"] == pytest.approx(ref.pope_aggregate_yes_ratio(results))
        assert out["answer_reading"] == "lmms-eval"


def mme_rows() -> list[dict]:
    """Two questions on one image for every MME category (the fixture has three categories)."""
    from v2drop.benchmarks.mme import COGNITION, PERCEPTION

    image = tiny_png()
    return [
        {
            "question_id": f"{cat}/{k}.png",
            "question": f"Is this {cat} {k}-{q}? Please answer yes or no.",
            "answer": "Yes" if (k + q) % 2 else "No",
            "category": cat,
            "image": image,
        }
        for cat in PERCEPTION + COGNITION
        for k in range(2)
        for q in range(2)
    ]


def test_mme_parity_every_category(tmp_path):
    ref = lmms_module("mme/utils")
    docs = mme_rows()
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    bench = get_benchmark("mme", data_dir=str(tmp_path), answer_reading="lmms-eval")
    samples = bench.load("test")
    for doc, s in zip(docs, samples):
        assert s.question == ref.mme_doc_to_text(doc, PROMPT_KWARGS["mme"])
    for preds in prediction_sets(len(docs)):
        per_key: dict[str, list] = {}
        for d, p in zip(docs, preds):
            for key, value in ref.mme_process_results(d, [p]).items():
                per_key.setdefault(key, []).append(value)
        out = ours(bench, samples, preds)
        assert out["perception"] == pytest.approx(ref.mme_aggregate_results(per_key["mme_perception_score"]))
        assert out["cognition"] == pytest.approx(ref.mme_aggregate_results(per_key["mme_cognition_score"]))


def test_gqa_parity():
    ref = _api_metrics()
    utils = lmms_module("gqa/utils")
    bench = get_benchmark("gqa", data_dir=str(FIXTURES / "gqa"), answer_reading="lmms-eval")
    samples, docs = bench.load("test"), rows_of("gqa", "testdev")
    for doc, s in zip(docs, samples):
        assert s.question == utils.gqa_doc_to_text(doc, PROMPT_KWARGS["gqa"])
    for preds in prediction_sets(len(docs)) + [[d["answer"].upper() + "." for d in docs]]:
        expected = ref.exact_match_hf_evaluate(
            preds, [d["answer"] for d in docs], ignore_case=True, ignore_punctuation=True
        )
        assert ours(bench, samples, preds)["accuracy"] == pytest.approx(expected["exact_match"])


def _api_metrics():
    """``lmms_eval.api.metrics`` (``exact_match_hf_evaluate``, the metric GQA's YAML names), with its unused imports
    stubbed.
    """
    return lmms_module("../api/metrics")


def test_scienceqa_parity():
    ref = lmms_module("scienceqa/utils")
    bench = get_benchmark("scienceqa-img", data_dir=str(FIXTURES / "scienceqa"), answer_reading="lmms-eval")
    samples = bench.load("test")
    docs = [d for d in rows_of("scienceqa", "test") if d.get("image")]
    assert len(docs) == len(samples)
    for doc, s in zip(docs, samples):
        assert s.question == ref.sqa_doc_to_text(doc, PROMPT_KWARGS["scienceqa"])
    for preds in prediction_sets(len(docs)):
        expected = [ref.sqa_process_results(d, [p])["exact_match"] for d, p in zip(docs, preds)]
        assert ours(bench, samples, preds)["accuracy"] == pytest.approx(sum(expected) / len(expected))


def test_textvqa_parity():
    ref = lmms_module("textvqa/utils")
    bench = get_benchmark("textvqa", data_dir=str(FIXTURES / "textvqa"), answer_reading="lmms-eval")
    samples, docs = bench.load("validation"), rows_of("textvqa", "validation")
    for doc, s in zip(docs, samples):
        assert s.question == ref.textvqa_doc_to_text(doc, PROMPT_KWARGS["textvqa"])
    for preds in prediction_sets(len(docs)) + [[d["answers"][0].upper() + "!" for d in docs]]:
        expected = [ref.textvqa_process_results(copy.deepcopy(d), [p])["exact_match"] for d, p in zip(docs, preds)]
        assert ours(bench, samples, preds)["accuracy"] == pytest.approx(sum(expected) / len(expected))


def test_mmbench_circular_parity():
    utils = lmms_module("mmbench/en_utils")
    evaluator = utils.mmbench_evaluator
    # The LLM judge (a network call) reads no option: our reading counts such an answer wrong, as this judge does.
    evaluator.extract_answer_from_item = lambda item: ("", "no judge")
    bench = get_benchmark("mmbench", data_dir=str(FIXTURES / "mmbench-circular"), answer_reading="lmms-eval")
    samples, docs = bench.load("dev"), rows_of("mmbench-circular", "dev")
    for doc, s in zip(docs, samples):
        doc = {**doc, "hint": float("nan") if doc.get("hint") is None else doc["hint"]}
        assert s.question == utils.mmbench_doc_to_text(doc, PROMPT_KWARGS["mmbench"])
    letters = [
        ["A"] * 9,
        ["B"] * 9,
        [s.answer for s in samples],
        [f"({s.answer})" for s in samples],
        [s.choices["ABCDE".index(s.answer)] for s in samples],
    ]
    for preds in prediction_sets(len(docs)) + letters:
        results = [
            utils.mmbench_process_results({**d, "hint": d.get("hint")}, [p])["gpt_eval_score"]
            for d, p in zip(docs, preds)
        ]
        overall, per_category, _ = evaluator.eval_result(copy.deepcopy(results), eval_method="openai")
        out = ours(bench, samples, preds)
        assert out["accuracy"] == pytest.approx(overall)
        assert out["per_family"] == pytest.approx(per_category)


# -- video benchmarks ---------------------------------------------------------------------------------------------


def test_mvbench_parity():
    ref = lmms_module("mvbench/utils")
    bench = get_benchmark("mvbench", data_dir=str(FIXTURES / "mvbench"), answer_reading="lmms-eval")
    samples, docs = bench.load("test"), rows_of("mvbench", "test")
    for doc, s in zip(docs, samples):
        assert s.question == ref.mvbench_doc_to_text(doc, PROMPT_KWARGS["mvbench"])
    for preds in prediction_sets(len(docs)) + [["", "", "A"], ["", "", ""]]:
        results = [ref.mvbench_process_results(d, [p])["mvbench_accuracy"] for d, p in zip(docs, preds)]
        out = ours(bench, samples, preds)
        assert 100 * out["accuracy"] == pytest.approx(ref.mvbench_aggregate_results(results))
        for task in {d["task"] for d in docs}:
            task_results = [r for r, d in zip(results, docs) if d["task"] == task]
            assert 100 * out["per_family"][task] == pytest.approx(ref.mvbench_aggregate_results(task_results))


def test_mvbench_ignores_clip_bounds(tmp_path):
    """lmms-eval's ``mvbench_doc_to_visual`` passes the whole file: ``*_segment`` videos are already cut."""
    ref = lmms_module("mvbench/utils")
    assert "start" not in _source(ref.mvbench_doc_to_visual) and 'end"' not in _source(ref.mvbench_doc_to_visual)
    row = rows_of("mvbench", "test")[0]
    with_bounds = {**row, "start": 100.0, "end": 200.0}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(with_bounds) + "\n")
    os.symlink(FIXTURES / "mvbench" / "videos", tmp_path / "videos")
    a, b = get_benchmark("mvbench", data_dir=str(tmp_path), num_frames=4).load("test")
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]


def _source(fn) -> str:
    import inspect

    return inspect.getsource(fn)


def test_videomme_parity():
    ref = lmms_module("videomme/utils")
    bench = get_benchmark("videomme", data_dir=str(FIXTURES / "videomme"), answer_reading="lmms-eval")
    samples, docs = bench.load("test"), rows_of("videomme", "test")
    for doc, s in zip(docs, samples):
        assert s.question == ref.videomme_doc_to_text(doc, PROMPT_KWARGS["videomme"])
    for preds in prediction_sets(len(docs)) + [["The best answer is B", "the answer is c", "", "D"]]:
        results = [ref.videomme_process_results(d, [p])["videomme_perception_score"] for d, p in zip(docs, preds)]
        assert 100 * ours(bench, samples, preds)["accuracy"] == pytest.approx(ref.videomme_aggregate_results(results))
