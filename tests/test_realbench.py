"""Real benchmarks: fixtures in each benchmark's schema, scores worked out by hand, one end-to-end run per modality."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from v2drop import Method
from v2drop.benchmarks import DataError, get_benchmark, list_benchmarks
from v2drop.benchmarks.media import frame_indices
from v2drop.benchmarks.vqa import normalize_vqa, vqa_accuracy
from v2drop.evaluation import EvalConfig, evaluate

FIXTURES = Path(__file__).parent / "fixtures" / "realbench"
ALL = ("pope", "mme", "gqa", "mmbench", "scienceqa-img", "textvqa", "mvbench", "videomme")


def bench(name, folder=None, **kw):
    return get_benchmark(name, data_dir=str(FIXTURES / (folder or name)), **kw)


def records(b, samples, predictions):
    """What the harness records, with hand-written predictions."""
    assert len(samples) == len(predictions)
    return [
        {"id": s.id, "family": s.family, "prediction": p, "reference": s.answer, "correct": b.is_correct(p, s)}
        for s, p in zip(samples, predictions)
    ]


def frame_ids(images):
    """(video, frame) of fixture frames, whose colour is (40 video, 20 frame, 100)."""
    return [(int(np.asarray(im)[0, 0, 0]) // 40, int(np.asarray(im)[0, 0, 1]) // 20) for im in images]


def test_every_real_benchmark_is_registered():
    assert set(ALL) <= set(list_benchmarks())


def _run(code):
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_registration_finds_every_benchmark_and_touches_no_data():
    code = """
import sys
import v2drop.benchmarks
first = v2drop.benchmarks.BENCHMARKS.names()
assert first == v2drop.benchmarks.list_benchmarks(), first
import v2drop.evaluation, v2drop.integrations
assert "datasets" not in sys.modules and "pandas" not in sys.modules  # no data is touched at import
print(",".join(first))
"""
    assert set(_run(code).strip().split(",")) == {"digits", "digits-video", *ALL}


@pytest.mark.parametrize("name", list_benchmarks())
def test_every_benchmark_declares_its_splits(name):
    b = get_benchmark(name)
    assert b.splits and b.default_split in b.splits
    assert b.resolve_split(None) == b.default_split and all(b.resolve_split(s) == s for s in b.splits)
    with pytest.raises(
        ValueError, match=rf"Benchmark '{name}' has no split 'nosplit'; valid splits: {', '.join(b.splits)}"
    ):
        b.load("nosplit")  # before any data is looked for
    for bad in (0, -2, 1.5, "3"):
        with pytest.raises(ValueError, match=rf"limit must be a positive whole number.*got {bad!r}"):
            b.load(limit=bad)


@pytest.mark.parametrize(
    "name, folder, other_names",
    [
        ("gqa", "gqa", ("test",)),
        ("textvqa", "textvqa", ("test",)),
        ("mmbench", "mmbench", ("test",)),
        ("mvbench", "mvbench", ("train",)),
        ("pope", "pope", ()),
    ],
)
def test_default_split_and_its_other_names_read_the_same_questions(name, folder, other_names):
    b = bench(name, folder)
    ids = [s.id for s in b.load()]
    assert ids and all([s.id for s in bench(name, folder).load(n)] == ids for n in (b.default_split, *other_names))


# -- answer normalisation ------------------------------------------------------------------------


def test_vqa_normalisation():
    assert normalize_vqa("The red one.") == normalize_vqa("red one") == "red 1"
    assert normalize_vqa("T-shirt") == normalize_vqa("t shirt") == "t shirt"  # a joining hyphen becomes a space
    assert (
        normalize_vqa("Coca-Cola!") == "coca cola" and normalize_vqa("x - y") == "x y"
    )  # marks touching spaces vanish
    assert normalize_vqa("dont") == "don't" and normalize_vqa("3.5") == "3.5" and normalize_vqa("1,000") == "1000"
    assert normalize_vqa("well") == "well" and normalize_vqa("Two.") == "2"
    # ten annotators: leaving out one of the three "2"s leaves two matches (2/3), otherwise three (1)
    assert vqa_accuracy("two", ["2", "2", "two"] + ["three"] * 7) == pytest.approx(0.9)


def test_uniform_frame_indices():
    assert frame_indices(6, 4) == [0, 2, 3, 5]  # np.linspace(0, 5, 4) = 0, 1.67, 3.33, 5, rounded
    assert frame_indices(10, 4) == [0, 3, 6, 9] and frame_indices(3, 16) == [0, 1, 2]  # never repeats frames
    with pytest.raises(DataError, match="no frames"):
        frame_indices(0, 4)


def test_llava_readings_by_hand():
    """LLaVA-1.5's scripts, case by case.

    eval_pope.py, MME's calculation.py, convert_gqa_for_eval.py, eval_science_qa.py.
    """
    from v2drop.benchmarks.reading import gqa_llava, mme_llava, pope_llava, scienceqa_llava

    pope = {
        "No, there is not.": "no",
        "NO": "yes",
        "no!": "yes",
        "Not sure": "yes",
        "There is not a cat. Yes.": "no",
        "Yes. not": "yes",
        "I see no dog": "no",
        "": "yes",
        "no,": "no",
    }
    assert {t: pope_llava(t) for t in pope} == pope
    mme = {
        "Yes": "yes",
        "No.": "no",
        "y": "other",
        " yes": "yes",
        "   no": "other",
        "The answer is no": "other",
        "Nope": "no",
    }
    assert {t: mme_llava(t) for t in mme} == mme
    gqa = {
        ("Left.", "left"): True,
        ("left..", "left"): True,
        ("The left", "left"): False,
        (" left", "left"): False,
        ("no!", "no"): False,
        ("T-shirt", "t-shirt"): True,
    }
    assert {k: gqa_llava(*k) for k in gqa} == gqa
    sqa = {
        "A": True,
        "A. West Virginia": True,
        "A.": False,
        "a": False,
        "(A)": False,
        "The answer is A.": True,
        "The answer is A. The answer is B.": False,
        "AB": False,
        "": False,
        "E": False,
    }
    assert {t: scienceqa_llava(t, "A", 4) for t in sqa} == sqa
    assert scienceqa_llava("E", "E", 5) and not scienceqa_llava("E", "E", 4)  # a letter beyond the choices is no answer


# -- each benchmark on its fixture ----------------------------------------------------------------------------


def test_pope_metrics_by_hand():
    b = bench("pope")
    assert b.answer_reading == "llava"
    samples = b.load("test")
    assert (
        len(samples) == 9
        and samples[0].question == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    assert samples[0].images[0] is samples[2].images[0]  # one decode per image file
    preds = [
        "Yes, there is a dog in the image.",
        "No, there is not.",
        "Yes",
        "There is not a bench. Yes.",  # adversarial: tp tn fp fn
        "yes",
        "no",
        "Yes, I think so",  # popular: tp tn fp
        "I see a dog. It is not a cat.",
        "NO",
    ]  # random: tp (first sentence only), fp
    # "NO" was read "no" before; LLaVA's eval_pope.py looks for the words "No", "no", "not" case-sensitively,
    # so it reads "NO" as yes (a false positive here).
    out = b.aggregate(records(b, samples, preds))
    assert out["per_split"]["adversarial"] == {
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "yes_ratio": 0.5,
    }
    assert out["per_split"]["popular"] == pytest.approx(
        {"accuracy": 2 / 3, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 2 / 3}
    )
    assert out["per_split"]["random"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
    )
    # overall tp 3, tn 2, fp 3, fn 1
    assert out["accuracy"] == pytest.approx(5 / 9) and out["precision"] == pytest.approx(0.5) and out["recall"] == 0.75
    assert out["f1"] == pytest.approx(0.6) and out["yes_ratio"] == pytest.approx(6 / 9)
    assert out["f1_mean_of_splits"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert out["per_family"] == pytest.approx({"adversarial": 0.5, "popular": 2 / 3, "random": 0.5}) and out["n"] == 9
    assert out["answer_reading"] == "llava"


def test_pope_lmms_eval_reading():
    b = bench("pope", answer_reading="lmms-eval")
    samples = b.load("test")
    preds = ["Yes, there is a dog in the image.", "No", " no ", "no", "YES", "no", "maybe", "yes", "no"]
    out = b.aggregate(records(b, samples, preds))
    # only exact yes/no (after lower/strip) count; "maybe" is neither a false positive nor a false negative
    assert [b.read(p) for p in preds[:3]] == ["yes, there is a dog in the image.", "no", "no"]
    assert out["answer_reading"] == "lmms-eval" and out["yes_ratio"] == pytest.approx(
        4 / 9
    )  # lmms-eval: the share of gold yes


def test_mme_scores_with_acc_plus():
    b = bench("mme")
    samples = b.load("test")
    # LLaVA-1.5 and lmms-eval both replace " Please answer yes or no." by the short-answer line
    assert samples[0].question == "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    preds = [
        "Yes",
        "No.",  # existence/1: both right
        "yes, there is",
        "Yes",  # existence/2: one of two right -> no acc+
        "No",
        "no",  # count/1: one right
        "Yes",
        "The answer is no",
    ]  # code_reasoning/1: "The " holds no yes/no -> other, wrong
    out = b.aggregate(records(b, samples, preds))
    assert out["subtasks"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert out["subtasks"]["count"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0}
    assert out["subtasks"]["code_reasoning"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0}
    assert (out["perception"], out["cognition"], out["total"]) == (175.0, 50.0, 225.0)
    assert out["accuracy"] == 5 / 8 and out["per_family"] == {"code_reasoning": 0.5, "count": 0.5, "existence": 0.75}


def test_gqa_exact_match_as_the_references():
    b = bench("gqa")
    samples = b.load("test")  # the harness's "test" is GQA's testdev
    assert [s.family for s in samples] == ["query", "verify", "query", "choose", "verify", "query"]
    assert samples[0].question == "Which side is the red car on?\nAnswer the question using a single word or phrase."
    assert np.asarray(samples[0].images[0])[0, 0].tolist() == [50, 60, 70]  # images/<imageId>.png when no image column
    assert np.asarray(samples[2].images[0])[0, 0].tolist() == [70, 60, 50]  # the image column when present
    # answers: "red one", "yes", "left", "t-shirt", "no", "man". The old reading (VQA normalisation) also
    # accepted "The red one." and "A man"; neither reference drops articles for GQA.
    preds = ["Red one.", "Yes", "right", "t-shirt", "no!", "A man"]
    # llava: rstrip(".") and lower case, then equal ("no!" keeps its "!")
    assert [r["correct"] for r in records(b, samples, preds)] == [True, True, False, True, False, False]
    out = b.aggregate(records(b, samples, preds))
    assert out["accuracy"] == pytest.approx(3 / 6) and out["per_family"] == pytest.approx(
        {"choose": 1.0, "query": 1 / 3, "verify": 0.5}
    )
    # lmms-eval: lower case and every punctuation mark removed, whole strings equal
    lm = bench("gqa", answer_reading="lmms-eval")
    lm_samples = lm.load("test")
    assert [r["correct"] for r in records(lm, lm_samples, preds)] == [True, True, False, True, True, False]


def test_mmbench_plain():
    b = bench("mmbench")
    samples = b.load("dev")
    assert samples[0].question == (
        "Look at the picture.\nWhere is the cat?\nA. left\nB. right\nC. top\nD. bottom\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert samples[1].question.startswith(
        "What does the sign say?\nA. stop\nB. go\nAnswer"
    )  # no hint; "nan" and null options dropped
    assert samples[2].question.startswith("Which animal is shown?\nA. cat")  # a "nan" hint is no hint
    assert np.asarray(samples[1].images[0])[0, 0].tolist() == [10, 10, 90]  # base64 image
    out = b.aggregate(records(b, samples, ["(B)", "B", "Answer: C"]))
    assert out["accuracy"] == pytest.approx(2 / 3) and out["per_family"] == {
        "attribute_recognition": 1.0,
        "object_localization": 1.0,
        "ocr": 0.0,
    }
    assert out["circular"] is True and out["accuracy_first_copy"] == pytest.approx(2 / 3)  # no copies: one pass
    lm = bench("mmbench", answer_reading="lmms-eval").load("dev")
    assert lm[0].question == (
        "Look at the picture. Where is the cat? There are several options:\nA. left\nB. right\nC. top\n"
        "D. bottom\n\nAnswer with the option's letter from the given choices directly."
    )


def test_mmbench_circular_eval_over_the_dataset_copies():
    b = bench("mmbench", "mmbench-circular")
    samples = b.load("dev")
    # rows are asked as they are (never rotated again); copies share index % 1e6 with their question
    assert [s.id for s in samples] == ["0", "1", "2", "1000000", "1000001", "2000000", "1000002", "3000000", "2000002"]
    assert [s.answer for s in samples] == ["B", "A", "C", "A", "B", "D", "B", "C", "A"]
    assert samples[3].choices == ("right", "top", "bottom", "left")
    preds = [
        "(B)",
        "A",
        "The answer is C",  # the three questions' own rows: all right
        "A.",
        "A",
        "D",  # 1000000 right, 1000001 wrong (question 1 fails), 2000000 right
        "bird",
        "Answer: C",
        "(A) bird",
    ]  # an option's text counts (MMBench's can_infer_text)
    out = b.aggregate(records(b, samples, preds))
    assert out["accuracy"] == pytest.approx(2 / 3) and out["accuracy_first_copy"] == 1.0
    assert out["per_family"] == {"attribute_recognition": 1.0, "object_localization": 1.0, "ocr": 0.0}
    assert out["n"] == 3 and out["n_samples"] == 9 and out["circular"] is True
    single = bench("mmbench", "mmbench-circular", circular=False)
    single_samples = single.load("dev")
    assert single.aggregate(records(single, single_samples, preds))["accuracy"] == 1.0  # the first copies only
    with pytest.raises(
        ValueError, match="own row"
    ):  # copies without their question are not scored, as MMBench's evaluator
        b.aggregate(records(b, samples[3:], preds[3:]))


def test_scienceqa_letters_and_context():
    b = bench("scienceqa-img", "scienceqa")
    samples = b.load("test")
    assert len(samples) == 3  # the row without an image is not part of ScienceQA-IMG
    assert samples[0].question.startswith(
        "Which of these states is farthest north?\nA. West Virginia"
    )  # empty hint: no context
    assert samples[1].question == (
        "Context: Figure: a bald eagle.\nWhich animal's feet are also adapted for grabbing prey?\n"
        "A. eagle\nB. duck\nAnswer with the option's letter from the given choices directly."
    )
    out = b.aggregate(records(b, samples, ["A", "B", "A. 40°C"]))
    assert [s.answer for s in samples] == ["A", "A", "A"]
    assert out["accuracy"] == pytest.approx(2 / 3) and out["per_family"] == {
        "natural science": 0.5,
        "social science": 1.0,
    }


def test_textvqa_soft_accuracy_by_hand():
    b = bench("textvqa")
    samples = b.load("test")  # the harness's "test" is TextVQA's validation
    # llava (default): LLaVA-1.5's question file adds the OCR tokens
    assert samples[0].question == (
        "how many apples are there?\nReference OCR token: 2, apples\nAnswer the question using a single word or phrase."
    )
    assert samples[0].answer == "3"  # the most common normalised answer, for the records
    preds = [
        "Two.",  # "2" from 3 of 10 annotators: (3 x 2/3 + 7 x 1) / 10 = 0.9
        "Coca-Cola!",  # "coca cola" from 2 ("coca-cola", "the coca cola"): (2 x 1/3 + 8 x 2/3) / 10 = 0.6
        "don't",  # 5 wrote "dont": 1.0
        "pepsi",
    ]  # 0
    recs = records(b, samples, preds)
    assert [r["correct"] for r in recs] == [True, False, True, False]
    out = b.aggregate(recs)
    assert out["vqa_accuracy"] == out["accuracy"] == pytest.approx(2.5 / 4) and out["full_credit"] == 0.5
    plain = bench("textvqa", ocr=False).load("validation", limit=1)[0]
    assert plain.question == "how many apples are there?\nAnswer the question using a single word or phrase."
    lm = bench("textvqa", answer_reading="lmms-eval").load("validation", limit=1)[0]  # capitalised, no OCR (ocr: false)
    assert lm.question == "How many apples are there?\nAnswer the question using a single word or phrase."


def test_mvbench_frames_letters_and_tasks():
    b = bench("mvbench", num_frames=4)
    samples = b.load("test")
    assert frame_ids(samples[0].images) == [(1, 0), (1, 2), (1, 3), (1, 5)]  # a frame list: 4 of 6
    assert frame_ids(samples[1].images) == [(2, 0), (2, 3), (2, 6), (2, 9)]  # a frame folder in natural order: 4 of 10
    assert samples[1].images is samples[2].images  # one video, decoded once
    assert samples[0].question == (
        "Question:What did the person do first?\nOption:\n(A) Sat on the bed.\n(B) Opened the door.\n"
        "(C) Took the cup.\nOnly give the best option.\n"
    )  # lmms-eval's mvbench_doc_to_text
    assert [s.answer for s in samples] == ["B", "C", "D"]
    out = b.aggregate(records(b, samples, ["(B) Opened the door.", "A", "Best option: (D)"]))
    assert out["accuracy"] == pytest.approx(2 / 3) and out["per_family"] == {
        "action_sequence": 0.5,
        "object_existence": 1.0,
    }
    assert out["mean_of_tasks"] == 0.75
    assert len(bench("mvbench").load("test", limit=1)[0].images) == 6  # default 8 frames: all 6


def test_videomme_per_task_and_duration():
    b = bench("videomme")
    samples = b.load("test")
    assert frame_ids(samples[0].images) == [(3, 0), (3, 1), (3, 2)]  # frames/<videoID>/, all 3 (fewer than 16)
    assert samples[0].images is samples[1].images and frame_ids(samples[3].images)[0] == (5, 0)  # <videoID>/ folder
    assert samples[0].question == (
        "Select the best answer to the following multiple-choice question based on the video and the "
        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "How many people appear in the video?\nA. One.\nB. Two.\nC. Three.\nD. Four.\n\n"
        "Answer with the option's letter from the given choices directly."
    )  # lmms-eval's videomme_doc_to_text
    out = b.aggregate(records(b, samples, ["B", "The best answer is C.", "D. Five.", "(C)"]))
    assert out["accuracy"] == 0.75
    assert out["per_family"] == {"Counting Problem": 1.0, "OCR Problems": 0.0, "Temporal Reasoning": 1.0}
    assert out["per_duration"] == {"long": 1.0, "medium": 1.0, "short": 0.5}


def test_video_file_frames(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), (0, 12 * k, 100), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    row = {"video": "clip.mp4", "question": "q", "candidates": ["a", "b"], "answer": "a", "task": "action_count"}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "start": 1.0, "end": 1.9}) + "\n")
    whole, clipped = get_benchmark("mvbench", data_dir=str(tmp_path), num_frames=4).load("test")
    greens = lambda s: [round(float(np.asarray(im)[..., 1].mean()) / 12) for im in s.images]  # noqa: E731
    assert greens(whole) == [0, 6, 13, 19] and greens(clipped) == [10, 13, 16, 19]


# -- loading: the hub, offline, bad input ---------------------------------------------------------------------


def test_hub_loading_through_datasets(monkeypatch):
    calls = []
    red = Image.new("RGB", (4, 4), (255, 0, 0))

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        if config == "testdev_balanced_images":  # a column by name, a row by position, as datasets.Dataset
            return {"id": ["n1"], 0: {"id": "n1", "image": red}}
        if config == "testdev_balanced_instructions":
            return [{"id": "q1", "imageId": "n1", "question": "What colour?", "answer": "red"}]
        return [
            {
                "question_id": str(i),
                "question": "Is there a dog?",
                "answer": "no",
                "image": red.copy(),
                "category": "random",
                "image_source": "COCO_val2014_000000000042",
            }
            for i in range(2)
        ]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pope = get_benchmark("pope").load("test")
    assert pope[0].answer == "no" and pope[0].images[0].size == (4, 4)
    assert pope[0].images[0] is pope[1].images[0]  # kept once per image file, not once per question
    (gqa,) = get_benchmark("gqa").load("test")
    assert np.asarray(gqa.images[0])[0, 0].tolist() == [255, 0, 0]
    assert calls == [
        ("lmms-lab/POPE", None, "test"),
        ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
        ("lmms-lab/GQA", "testdev_balanced_images", "testdev"),
    ]
    with pytest.raises(DataError, match="pass video_root"):
        get_benchmark("videomme").load("test")


def test_offline_or_missing_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ValueError,
        match=r"pope reads the Hugging Face dataset lmms-lab/POPE, split test, but the hub is offline.*--data-dir",
    ):
        get_benchmark("pope").load("test")
    with pytest.raises(ValueError, match=r"lmms-lab/MMBench \(configuration en\), split dev"):
        get_benchmark("mmbench").load("test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ValueError, match="pip install datasets"):
        get_benchmark("textvqa").load("test")


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        get_benchmark("pope", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"pope: none of \['test.jsonl', 'test.parquet'\]"):
        get_benchmark("pope", data_dir=str(tmp_path)).load("test")
    with pytest.raises(
        ValueError, match=r"Benchmark 'pope' has no split 'train'; valid splits: test \(default 'test'\)"
    ):
        bench("pope").load("train")
    good = (FIXTURES / "pope" / "test.jsonl").read_text().splitlines()[0]
    cases = [
        (good + "\n{not json\n", r"test.jsonl line 2 is not JSON"),
        (json.dumps({**json.loads(good), "image": None}) + "\n", r"test.jsonl line 1: no image in .None."),
        (
            json.dumps({k: v for k, v in json.loads(good).items() if k != "image"}) + "\n",
            r"line 1 lacks column\(s\) \['image'\]",
        ),
        (
            json.dumps({**json.loads(good), "image": "images/nope.png"}) + "\n",
            r"line 1: image 'images/nope.png' is neither a file",
        ),
        (
            json.dumps({**json.loads(good), "answer": "maybe"}) + "\n",
            r"line 1 cannot be read .*answer must be yes or no",
        ),
        (good + "\n" + good + "\n", r"line 2 repeats sample id 'adversarial-1'"),
    ]
    shutil.copytree(FIXTURES / "pope" / "images", tmp_path / "images")
    for text, message in cases:
        (tmp_path / "test.jsonl").write_text(text)
        with pytest.raises(ValueError, match=message):
            get_benchmark("pope", data_dir=str(tmp_path)).load("test")
    mv = json.loads((FIXTURES / "mvbench" / "test.jsonl").read_text().splitlines()[0])
    (tmp_path / "test.jsonl").write_text(json.dumps({**mv, "answer": "Jumped."}) + "\n")
    with pytest.raises(ValueError, match=r"answer 'Jumped.' is not one of the candidates"):
        get_benchmark("mvbench", data_dir=str(tmp_path)).load("test")
    with pytest.raises(ValueError, match="num_frames must be at least 1"):
        bench("mvbench", num_frames=0)
    with pytest.raises(ValueError, match="does not take"):
        get_benchmark("mme", data_dir=str(tmp_path), circular=True)
    with pytest.raises(ValueError, match="call load"):
        bench("pope").aggregate([{"id": "x", "family": "random", "prediction": "yes", "correct": True}])


# -- end to end through the harness ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pope", "mvbench"])
def test_end_to_end_with_a_tiny_model(tiny, tmp_path, name):
    b = bench(name, **({"num_frames": 2} if name == "mvbench" else {}))
    config = EvalConfig(model="tiny", benchmark=name, limit=3, warmup=0, max_new_tokens=2, progress=False)
    result = evaluate(
        tiny("llava"), b, Method.from_preset("v2drop-llava15-128"), config, records_path=tmp_path / "r.jsonl"
    )
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all({"id", "family", "prediction", "reference", "correct"} <= set(r) for r in recs)
    assert result.metrics["n"] == 3 and 0 <= result.metrics["accuracy"] <= 1
    if name == "pope":
        assert {"f1", "precision", "f1_mean_of_splits"} <= set(result.metrics) and set(result.per_family) <= {
            "adversarial",
            "popular",
            "random",
        }
    else:
        assert recs[0]["vision_tokens"] == 2 * 64 and set(result.per_family) <= {"action_sequence", "object_existence"}
