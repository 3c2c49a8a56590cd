"""Real benchmarks: fixtures in each benchmark's schema, scores worked out by hand, one end-to-end run per modality."""

import json

import numpy as np
import pytest
from PIL import Image

from v2drop import Method
from v2drop.benchmarks import get_benchmark, list_benchmarks
from v2drop.evaluation import EvalConfig, evaluate
from v2drop.realbench.common import normalize_vqa, parse_option
from v2drop.realbench.image import vqa_accuracy


def write(tmp_path, split, rows, images=(), size=32):
    """``split``.jsonl plus solid-colour PNGs named in ``images`` (value i*20 for image i)."""
    for i, name in enumerate(images):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size, 3), i * 20, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path)


def records(bench, samples, predictions):
    return [{"id": s.id, "family": s.family, "prediction": p, "reference": s.answer, "correct": bench.is_correct(p, s)}
            for s, p in zip(samples, predictions)]


def test_every_real_benchmark_is_registered():
    assert {"pope", "mme", "gqa", "mmbench", "scienceqa-img", "textvqa", "mvbench", "videomme"} <= set(list_benchmarks())


@pytest.fixture
def pope_dir(tmp_path):
    rows = [
        {"question_id": "1", "question": "Is there a dog?", "answer": "yes", "image": "a.png", "category": "adversarial"},
        {"question_id": "2", "question": "Is there a cat?", "answer": "no", "image": "a.png", "category": "adversarial"},
        {"question_id": "3", "question": "Is there a car?", "answer": "yes", "image": "b.png", "category": "random"},
        {"question_id": "4", "question": "Is there a bus?", "answer": "no", "image": "b.png", "category": "random"},
    ]
    (tmp_path / "pope").mkdir()
    return write(tmp_path / "pope", "test", rows, ["a.png", "b.png"])


def test_pope_metrics_by_hand(pope_dir):
    bench = get_benchmark("pope", data_dir=pope_dir)
    samples = bench.load("test")
    assert samples[0].question == "Is there a dog?\nAnswer the question using a single word or phrase."
    preds = ["Yes.", "No, there is not.", "There is no car", "yes"]  # right, right, wrong (no), wrong (yes)
    out = bench.aggregate(records(bench, samples, preds))
    # predicted yes: 1, 4; gold yes: 1, 3 -> tp 1, fp 1, fn 1
    assert out["accuracy"] == 0.5 and out["precision"] == 0.5 and out["recall"] == 0.5 and out["f1"] == 0.5
    assert out["yes_ratio"] == 0.5
    assert out["per_split"]["adversarial"]["f1"] == 1.0 and out["per_split"]["random"]["accuracy"] == 0.0


def test_mme_scores_by_hand(tmp_path):
    rows = []
    for img, cat, answers in [("e1.png", "existence", ["yes", "no"]), ("e2.png", "existence", ["yes", "no"]),
                              ("o1.png", "OCR", ["yes", "no"]), ("c1.png", "code_reasoning", ["no", "yes"])]:
        rows += [{"question_id": img, "image": img, "question": f"Q{a}? Please answer yes or no.", "answer": a.capitalize(),
                  "category": cat} for a in answers]
    bench = get_benchmark("mme", data_dir=write(tmp_path, "test", rows, ["e1.png", "e2.png", "o1.png", "c1.png"]))
    samples = bench.load("test")
    preds = ["Yes", "No", "Yes", "Maybe",  # existence: image e2 has one wrong ("other") -> acc 3/4, acc+ 1/2
             "yes, it is", "no", "yes", "no"]  # OCR all right; code reasoning both wrong
    out = bench.aggregate(records(bench, samples, preds))
    assert out["subtasks"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert out["subtasks"]["OCR"]["score"] == 200.0 and out["subtasks"]["code_reasoning"]["score"] == 0.0
    assert out["perception"] == 325.0 and out["cognition"] == 0.0


def test_gqa_exact_match_after_normalisation(tmp_path):
    rows = [{"id": "g1", "question": "Which one?", "answer": "the red one", "imageId": "x", "image": "x.png"},
            {"id": "g2", "question": "How many?", "answer": "two", "imageId": "x", "image": "x.png"},
            {"id": "g3", "question": "Where?", "answer": "left", "imageId": "x", "image": "x.png"}]
    bench = get_benchmark("gqa", data_dir=write(tmp_path, "testdev", rows, ["x.png"]))
    samples = bench.load("test")  # the harness's "test" maps to GQA's testdev
    assert [bench.is_correct(p, s) for s, p in zip(samples, ["Red one.", "2", "right"])] == [True, True, False]
    assert normalize_vqa("The cat's toy, isnt it?") == "cat's toy isn't it"


def test_mmbench_plain_and_circular(tmp_path):
    rows = [{"index": 1, "question": "Q1", "hint": None, "A": "w", "B": "x", "C": "y", "D": "z", "answer": "B", "category": "attr",
             "image": "m.png"},
            {"index": 2, "question": "Q2", "hint": "look", "A": "p", "B": "q", "C": "r", "D": float("nan"), "answer": "A",
             "category": "logic", "image": "m.png"}]
    data_dir = write(tmp_path, "dev", rows, ["m.png"])
    plain = get_benchmark("mmbench", data_dir=data_dir)
    samples = plain.load("test")
    assert samples[1].question == "look\nQ2\nA. p\nB. q\nC. r\nAnswer with the option's letter from the given choices directly."
    assert plain.aggregate(records(plain, samples, ["(B)", "Answer: A"]))["accuracy"] == 1.0
    circular = get_benchmark("mmbench", data_dir=data_dir, circular=True)
    samples = circular.load("test")
    # q1 rotations put x at B, A, D, C; q2 rotations put p at A, C, B
    assert [s.answer for s in samples] == ["B", "A", "D", "C", "A", "C", "B"]
    preds = ["B", "A. x", "D", "The answer is (C).", "A", "C", "A"]  # q2's last rotation fails
    out = circular.aggregate(records(circular, samples, preds))
    assert out["accuracy"] == 0.5 and out["per_family"] == {"attr": 1.0, "logic": 0.0}


def test_scienceqa_letters(tmp_path):
    rows = [{"question": "Which is a mammal?", "choices": ["crow", "dog", "eel"], "answer": 1, "hint": "Animals.", "image": "s.png",
             "subject": "natural science"}]
    bench = get_benchmark("scienceqa-img", data_dir=write(tmp_path, "test", rows, ["s.png"]))
    (sample,) = bench.load("test")
    assert sample.answer == "B" and sample.question.startswith("Context: Animals.\nWhich is a mammal?\nA. crow\nB. dog\nC. eel")
    assert bench.is_correct("B", sample) and not bench.is_correct("C. eel", sample)


def test_textvqa_soft_accuracy_by_hand(tmp_path):
    answers = ["2", "2", "two"] + ["three"] * 7  # normalised: "2" x3, "3" x7
    rows = [{"question_id": i, "question": "How many?", "answers": answers, "image": "t.png"} for i in range(3)]
    bench = get_benchmark("textvqa", data_dir=write(tmp_path, "validation", rows, ["t.png"]))
    samples = bench.load("test")
    # "two": leaving out one of the three "2"s leaves 2 matches (2/3), otherwise 3 (1) -> (3*2/3 + 7) / 10
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Three.", answers) == 1.0 and vqa_accuracy("the tree", answers) == 0.0
    out = bench.aggregate(records(bench, samples, ["two", "Three.", "the tree"]))
    assert out["vqa_accuracy"] == pytest.approx(1.9 / 3) and out["full_credit"] == pytest.approx(1 / 3)


@pytest.fixture
def mvbench_dir(tmp_path):
    frames = [f"v/{i}.png" for i in range(10)]
    rows = [{"video": frames, "question": "Where does it move?", "candidates": ["left", "right", "up"], "answer": "right",
             "task": "action"},
            {"video": frames, "question": "Which way?", "candidates": ["left", "right", "up"], "answer": "up", "task": "direction"}]
    (tmp_path / "mvbench").mkdir()
    return write(tmp_path / "mvbench", "train", rows, frames)


def test_mvbench_frames_and_letters(mvbench_dir):
    bench = get_benchmark("mvbench", data_dir=mvbench_dir, num_frames=4)
    samples = bench.load("test")
    # frames 0, 3, 6, 9 of ten (np.linspace rounded); frame i is filled with value 20 i
    assert [np.asarray(f)[0, 0, 0] for f in samples[0].images] == [0, 60, 120, 180]
    assert samples[0].question.endswith("(A) left\n(B) right\n(C) up\nAnswer with the option's letter from the given choices directly.")
    out = bench.aggregate(records(bench, samples, ["(B) right", "Answer: A"]))
    assert out["accuracy"] == 0.5 and out["per_family"] == {"action": 1.0, "direction": 0.0}


def test_videomme_per_duration(tmp_path):
    frames = [f"f{i}.png" for i in range(3)]
    rows = [{"question_id": "q1", "videoID": "vid1", "frames": frames, "question": "What colour?", "duration": "short",
             "task_type": "Attribute Perception", "options": ["A. red", "B. blue", "C. green", "D. black"], "answer": "C"},
            {"question_id": "q2", "videoID": "vid2", "frames": frames, "question": "How many?", "duration": "long",
             "task_type": "Counting Problem", "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "A"}]
    bench = get_benchmark("videomme", data_dir=write(tmp_path, "test", rows, frames))
    samples = bench.load("test")
    assert len(samples[0].images) == 3  # fewer frames than requested: all of them
    out = bench.aggregate(records(bench, samples, ["C", "The answer is (D)."]))
    assert out["per_duration"] == {"long": 0.0, "short": 1.0} and out["accuracy"] == 0.5


def test_option_parsing_cases():
    assert [parse_option(t) for t in ["B", "(C) cat", "D. dog", "Answer: A", "The answer is (B).", "I think B is right", "none"]] == \
        ["B", "C", "D", "A", "B", "B", ""]


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        get_benchmark("pope", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no test.jsonl"):
        get_benchmark("pope", data_dir=str(tmp_path)).load("test")
    (tmp_path / "test.jsonl").write_text('{"question_id": "1", "question": "q", "answer": "yes", "category": "random"}\n')
    with pytest.raises(ValueError, match=r"pope: row 0 cannot be read \(KeyError"):
        get_benchmark("pope", data_dir=str(tmp_path)).load("test")
    with pytest.raises(ValueError, match="does not take"):
        get_benchmark("digits", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["pope", "mvbench"])
def test_end_to_end_with_a_tiny_model(tiny, name, pope_dir, mvbench_dir):
    bench = get_benchmark(name, data_dir=pope_dir if name == "pope" else mvbench_dir, **({"num_frames": 2} if name == "mvbench" else {}))
    config = EvalConfig(model="tiny", benchmark=name, warmup=0, max_new_tokens=3, progress=False)
    result = evaluate(tiny("llava"), bench, Method.from_preset("v2drop-llava15-128"), config)
    assert result.metrics["n"] == (4 if name == "pope" else 2)
    assert ("f1" in result.metrics) if name == "pope" else (set(result.per_family) == {"action", "direction"})
