"""Streaming evaluation: light samples decoded on demand through a bounded cache, batches prepared in loader workers."""

import shutil
from pathlib import Path

import pytest
from PIL import Image

from v2drop import Method
from v2drop.benchmarks import Sample, get_benchmark
from v2drop.benchmarks.media import MEDIA_CACHE, MediaCache, MediaRef
from v2drop.evaluation import EvalConfig, evaluate
from v2drop.evaluation.harness import check_sample
from v2drop.testing import image, textvqa_copy

FIXTURES = Path(__file__).parent / "fixtures" / "realbench"
KEYS = ("id", "prediction", "correct", "reference", "prompt_tokens", "vision_tokens")


def config(**kw):
    return EvalConfig(model="tiny", max_new_tokens=2, warmup=0, progress=False, memory_batches=0, **kw)


@pytest.fixture(autouse=True)
def fresh_cache():
    MEDIA_CACHE.clear()
    yield
    MEDIA_CACHE.clear()


def _files(tmp_path, n):
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"{i}.png")
        image(i, 8).save(paths[-1])
    return paths


def test_cache_is_bounded_and_hits_repeated_images(tmp_path):
    cache = MediaCache(max_entries=3)
    refs = [MediaRef("image", str(p)) for p in _files(tmp_path, 5)]
    for ref in refs:
        cache.get(ref)
    assert len(cache) == 3 and cache.misses == 5 and cache.hits == 0
    assert refs[0].key not in cache and refs[4].key in cache  # the least recently used went first
    again = MediaRef("image", str(tmp_path / "4.png"))  # another reference to the same file: same identity
    assert cache.get(again) is cache.get(refs[4]) and cache.hits == 2 and len(cache) == 3
    one = 8 * 8 * 3
    small = MediaCache(max_entries=10, max_bytes=2 * one)  # the byte bound holds too
    for ref in refs:
        small.get(ref)
    assert len(small) == 2 and small.nbytes == 2 * one


def test_loading_decodes_nothing(tmp_path):
    data = textvqa_copy(tmp_path / "copy", 200, 16, 12)
    samples = get_benchmark("textvqa", data_dir=str(data)).load()
    assert len(samples) == 200 and all(s.lazy for s in samples)
    assert len(MEDIA_CACHE) == 0 and MEDIA_CACHE.misses == 0  # no image was decoded by load
    for s in samples:
        check_sample(s, get_benchmark("textvqa"))  # the pre-load check reads headers only
    assert len(MEDIA_CACHE) == 0
    assert samples[3].images[0].size == (16, 12) and len(MEDIA_CACHE) == 1
    for s in samples:
        _ = s.images
    assert len(MEDIA_CACHE) == MEDIA_CACHE.max_entries < 200  # bounded, not one entry per sample


def test_pope_questions_share_one_decode():
    samples = get_benchmark("pope", data_dir=str(FIXTURES / "pope")).load()
    by_image = {}
    for s in samples:
        by_image.setdefault(s.media[0].key, []).append(s)
    shared = next(group for group in by_image.values() if len(group) > 1)
    assert shared[0].images[0] is shared[1].images[0] and MEDIA_CACHE.hits >= 1


def test_digits_samples_keep_their_pixels_in_memory():
    sample = get_benchmark("digits").load("validation", 1)[0]
    assert not sample.lazy and sample.refs() == () and isinstance(sample.images[0], Image.Image)


@pytest.mark.parametrize("name", ["textvqa", "pope", "digits"])
def test_workers_give_the_same_records_in_order(tiny, tmp_path, name):
    import json

    lvlm = tiny("llava")
    data_dir = str(FIXTURES / name) if name != "digits" else None
    records, results = [], []
    for workers in (0, 2):
        path = tmp_path / f"w{workers}.jsonl"
        bench = get_benchmark(name, data_dir=data_dir)
        results.append(
            evaluate(
                lvlm,
                bench,
                Method.from_preset("v2drop-llava15-128"),
                config(benchmark=name, limit=7, batch_size=3, workers=workers),
                path,
            )
        )
        records.append([json.loads(line) for line in path.read_text().splitlines()])
    assert [[r[k] for k in KEYS] for r in records[0]] == [[r[k] for k in KEYS] for r in records[1]]
    assert [r["id"] for r in records[1]] == [s.id for s in get_benchmark(name, data_dir=data_dir).load(None, 7)]
    assert all(r["data_wait_seconds"] >= 0 and r["step_seconds"] > 0 for r in records[1])
    assert results[0].metrics["accuracy"] == results[1].metrics["accuracy"]
    assert all(0 <= r.metrics["data_wait_share"] < 1 for r in results)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_names_the_sample(tiny, tmp_path, workers):
    data = tmp_path / "pope"
    shutil.copytree(FIXTURES / "pope", data)
    victim = sorted((data / "images").iterdir())[-1]
    victim.write_bytes(victim.read_bytes()[:-30])  # header intact (the pre-load check passes), pixels cut short
    bench = get_benchmark("pope", data_dir=str(data))
    samples = bench.load()
    bad = next(s for s in samples if Path(s.media[0].source).name == victim.name)
    check_sample(bad, bench)
    with pytest.raises(ValueError, match=f"Sample {bad.id!r}: image file .*{victim.name} cannot be decoded"):
        evaluate(tiny("llava"), bench, Method.none(), config(benchmark="pope", workers=workers))


def test_missing_media_fails_the_cheap_check(tmp_path):
    bench = get_benchmark("textvqa")
    gone = Sample("q7", "q", "a", "textvqa", (MediaRef("image", str(tmp_path / "gone.png")),))
    with pytest.raises(ValueError, match="'q7': medium 0 cannot be read"):
        check_sample(gone, bench)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="'q7': medium 0 cannot be read .*cannot be read"):
        check_sample(Sample("q7", "q", "a", "textvqa", (MediaRef("image", str(tmp_path / "text.png")),)), bench)
