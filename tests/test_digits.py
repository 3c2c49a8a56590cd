"""The digits world: deterministic, disjoint splits, evidence that covers the objects, balanced questions, metric."""

import numpy as np
import pytest

from v2drop.benchmarks import Sample, get_benchmark, list_benchmarks, normalize_answer
from v2drop.benchmarks.digits import PATCH, PATCHES, Digits, _digit_images, split_indices


def test_registry():
    assert {"digits", "digits-video"} <= set(list_benchmarks())
    with pytest.raises(ValueError, match=r"Unknown benchmark 'nope'.*digits, digits-video"):
        get_benchmark("nope")


def test_deterministic_and_seeded():
    a = get_benchmark("digits").load("test", 10)
    b = get_benchmark("digits").load("test", 10)
    c = get_benchmark("digits", seed=1).load("test", 10)
    assert [(s.question, s.answer, s.evidence) for s in a] == [(s.question, s.answer, s.evidence) for s in b]
    assert np.array_equal(np.asarray(a[0].images[0]), np.asarray(b[0].images[0]))
    assert not np.array_equal(np.asarray(a[0].images[0]), np.asarray(c[0].images[0]))


def test_splits_are_declared_and_checked():
    bench = get_benchmark("digits")
    assert bench.splits == ("train", "validation", "test") and bench.default_split == "test"
    assert [s.id for s in bench.load(limit=5)] == [s.id for s in bench.load("test", 5)]
    assert bench.load("validation", 1)[0].id == "validation-0-exist"
    with pytest.raises(
        ValueError, match=r"Benchmark 'digits' has no split 'dev'; valid splits: train, validation, test"
    ):
        bench.load("dev")
    with pytest.raises(ValueError, match=r"limit must be a positive whole number of samples or None, got 0"):
        get_benchmark("digits-video").load("test", 0)


def test_splits_use_disjoint_digit_images():
    sets = [set(split_indices(s).tolist()) for s in ("train", "validation", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == len(_digit_images()[1]) == 1797
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        split_indices("dev")


def test_evidence_covers_the_digit_pixels():
    bench = Digits()
    for scene in range(5):
        image, objects, _ = bench.scene("test", scene)
        pixels = np.asarray(image).astype(float)
        for o in objects:
            ev = set(o.evidence())
            covered = np.zeros_like(o.mask)
            for k in ev:
                r, c = divmod(k, PATCHES)
                covered[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = True
            assert o.mask.any() and (covered | ~o.mask).all()  # every digit pixel lies in an evidence patch
            assert pixels[o.mask].mean() > pixels[~covered].mean() + 40  # and those pixels are the bright object
            assert len(ev) < 40  # a few tokens out of 256


def test_questions_balanced_and_answers_match_the_scene():
    samples = get_benchmark("digits").load("test")
    assert len(samples) == 600 and {s.family for s in samples} == {"exist", "ident", "count", "mc", "colour"}
    exist = [s.answer for s in samples if s.family == "exist"]
    assert 0.35 < exist.count("yes") / len(exist) < 0.65
    bench = Digits()
    image, objects, _ = bench.scene("test", 0)
    count = next(s for s in samples if s.id == "test-0-count")
    assert count.answer == str(len(objects))
    mc = next(s for s in samples if s.id == "test-0-mc")
    labels = {str(o.label) for o in objects}
    assert sum(c in labels for c in mc.choices) == 1 and mc.choices["ABCD".index(mc.answer)] in labels


def test_video_samples():
    samples = get_benchmark("digits-video").load("test", 6)
    assert all(len(s.images) == 8 for s in samples)
    assert all(0 <= k < 8 * 256 for s in samples for k in s.evidence)
    assert {s.family for s in samples} <= {"frame", "first", "frames"}


def test_metric_and_aggregate():
    bench = get_benchmark("digits")
    sample = Sample("x", "q", "A", "mc", ())
    assert bench.is_correct("A.", sample) and bench.is_correct(" a ", sample) and not bench.is_correct("B", sample)
    assert normalize_answer("Yes, it is.") == "yes"
    agg = bench.aggregate(
        [{"family": "mc", "correct": True}, {"family": "mc", "correct": False}, {"family": "count", "correct": True}]
    )
    assert agg["accuracy"] == pytest.approx(2 / 3) and agg["per_family"] == {"count": 1.0, "mc": 0.5}


def test_visible_answers_as_if_only_the_visible_objects_were_there():
    """``image_questions(visible=...)``: the same kind of questions, answered against the visible objects only."""
    import random

    from v2drop.benchmarks.digits import image_questions

    bench = Digits()
    scene = next(i for i in range(50) if len(bench.scene("train", i)[1]) >= 3)
    _, objects, _ = bench.scene("train", scene)
    visible = {objects[0].label}
    colour = {o.label: o.colour for o in objects}
    counts = {"dropped-yes": 0, "dropped-ident": 0, "dropped-colour": 0, "dropped-option": 0}
    for seed in range(60):
        full = image_questions(random.Random(seed), objects)
        qa = {fam: (q, a, choices) for fam, q, a, _, choices in image_questions(random.Random(seed), objects, visible)}
        assert [q for _, q, *_ in full][:3] == [
            qa[f][0] for f in ("exist", "ident", "count")
        ]  # same questions where they can be
        digit = int(qa["exist"][0].split()[3])
        assert qa["exist"][1] == ("yes" if digit in visible else "no")
        counts["dropped-yes"] += digit in colour and digit not in visible
        answer = qa["ident"][1]
        assert answer in ("none", str(objects[0].label))
        counts["dropped-ident"] += answer == "none" and "none" != next(a for f, _, a, *_ in full if f == "ident")
        assert qa["count"][1] == "1"
        options, letter = qa["mc"][2], qa["mc"][1]
        assert options["ABCD".index(letter)] == str(objects[0].label) and len(set(options)) == 4
        counts["dropped-option"] += any(int(d) in colour and int(d) not in visible for d in options)
        colour_digit = int(qa["colour"][0].split()[-1].rstrip("?"))
        assert qa["colour"][1] == (colour[colour_digit] if colour_digit in visible else "none")
        counts["dropped-colour"] += colour_digit not in visible
    assert min(counts.values()) > 5  # questions about dropped objects are common
