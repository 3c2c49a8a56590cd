"""The sweep's per-sample vision cache: a trial with it gives the same records as one without; it is bounded and keyed
by content.
"""

import contextlib

import pytest
import torch

from v2drop import Method
from v2drop.evaluation import EvalConfig, evaluate
from v2drop.evaluation.records import read_records
from v2drop.testing import EchoBench, batch_for, image
from v2drop.vision_cache import VisionCache

TIMINGS = {
    "prefill_seconds",
    "vision_seconds",
    "generate_seconds",
    "decode_seconds",
    "ttft_seconds",
    "scoring_seconds",
    "peak_memory_bytes",
    "data_wait_seconds",
    "step_seconds",
}
# one scorer per way of reading the model: hidden states, attention rows, the vision tower's [CLS] attention, pre-LLM
# diversity
METHODS = [
    "none",
    "v2drop-llava15-128",
    "fastv-llava15-64",
    "visionzip-llava15-64",
    "divprune-llava15-128",
    "composite-v2drop-fastv-llava15-128",
]


def run(lvlm, method, path, cache=None):
    """The records of one trial (evaluate's JSONL file at ``path``), timings left out."""
    config = EvalConfig(limit=5, batch_size=2, max_new_tokens=3, warmup=1, measure_memory=False, progress=False)
    with cache.attached(lvlm) if cache is not None else contextlib.nullcontext():
        evaluate(lvlm, EchoBench(5), Method.resolve(method, depth=lvlm.depth), config, records_path=path)
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in sorted(read_records(path), key=lambda r: r["id"])]


@pytest.mark.parametrize("method", METHODS)
def test_a_cached_trial_gives_bit_identical_records(tiny, method, tmp_path):
    lvlm = tiny("llava")
    plain = run(lvlm, method, tmp_path / "plain.jsonl")
    cache = VisionCache()
    run(lvlm, "v2drop-llava15-64", tmp_path / "fill.jsonl", cache)  # another trial fills the cache
    assert cache.misses and not cache.hits
    cached = run(lvlm, method, tmp_path / "cached.jsonl", cache)
    assert cache.hits > 0
    assert len(cached) == 5 and cached == plain  # predictions, kept sets, merged tokens, vision tokens per layer, FLOPs
    assert lvlm.vision_cache is None  # detached after the block


def test_cached_logits_and_tower_state_are_bit_identical(tiny):
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 3, "llava")
    method = Method.resolve("visionzip-llava15-64", depth=lvlm.depth)
    plain = lvlm.generate_from_inputs(lvlm.prepare(prompts, images), method, 4)
    cache = VisionCache()
    with cache.attached(lvlm):
        for _ in range(2):
            out = lvlm.generate_from_inputs(lvlm.prepare(prompts, images), method, 4)
            assert torch.equal(out.first_logits, plain.first_logits)
            assert [t.stages for t in out.traces] == [t.stages for t in plain.traces]
    # the second round hit prepare, embed and the tower state
    assert cache.hits == 3 and cache.misses == 3


def test_keys_are_the_pixels_and_prompts(tiny):
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 2, "llava")
    cache = VisionCache()
    with cache.attached(lvlm):
        a = lvlm.prepare(prompts, images)
        same = lvlm.prepare(list(prompts), [img.copy() for img in images])  # equal pixels, other objects: a hit
        other = lvlm.prepare(prompts, [images[0], image(99)])  # one image differs: a miss
    assert cache.hits == 1 and cache.misses == 2
    assert all(same[k] is a[k] for k in a)
    assert not torch.equal(other["pixel_values"], a["pixel_values"])


def test_the_cache_is_bounded(tiny):
    lvlm = tiny("llava")
    batches = [batch_for(lvlm, n, "llava") for n in (1, 2, 3)]
    with VisionCache().attached(lvlm) as big:
        for prompts, images in batches:
            lvlm.generate_from_inputs(lvlm.prepare(prompts, images), None, 1)
    one_batch = big.bytes // 3  # a bound that holds about one batch's entries
    small = VisionCache(one_batch)
    with small.attached(lvlm):
        for prompts, images in batches:
            out = lvlm.generate_from_inputs(lvlm.prepare(prompts, images), None, 1)
            assert small.bytes <= one_batch
    assert 0 < len(small) < len(big)
    nothing = VisionCache(0)
    with nothing.attached(lvlm):
        again = lvlm.generate_from_inputs(lvlm.prepare(*batches[2]), None, 1)
    assert len(nothing) == 0 and torch.equal(again.first_logits, out.first_logits)
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        VisionCache(-1)
