"""InternVL3: the engine equals transformers' own model with and without dropping, tiles of mixed counts batched.

Every reference is transformers' ``InternVLForConditionalGeneration`` itself (its ``generate``, its forward,
its eager attention), observed or masked through hooks on its decoder layers (``tests/reference_helpers.py``,
family-agnostic). The tiny batch holds 1, 2 + thumbnail and 3 + thumbnail tiles. Batch == alone and keep-all ==
the model for every scorer are in ``tests/test_scorer_contract.py`` (every family).
"""

import pytest
import torch
from reference_helpers import (
    check_attention_scorer_keeps_eager_top,
    masked_transformers_generate,
    transformers_generate,
)
from test_scorer_contract import SCORERS, kept, method, refuses

from v2drop import Method, Schedule, load
from v2drop.testing import batch_for, build_real, photo, prompt_for, reference_processor

FAMILY = "internvl"


def test_tiles_of_mixed_counts_in_one_batch(tiny):
    """1, 3 and 4 tiles (thumbnails last) of 16 tokens each: pixel_values concatenates them, grids are per tile."""
    lvlm = tiny(FAMILY)
    inputs = lvlm.prepare(*batch_for(lvlm, 3, FAMILY))
    assert inputs["pixel_values"].shape == (1 + 3 + 4, 3, 32, 32)
    assert lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist() == [16, 48, 64]
    assert lvlm.adapter.image_grids(inputs) == [(1, 4, 4)] * 8
    coords = lvlm.adapter.vision_coords(inputs, lvlm.adapter.vision_mask(inputs["input_ids"]))
    assert coords[2][coords[2, :, 0] >= 0][:, 0].unique().tolist() == [0, 1, 2, 3]  # sample 2's four tiles


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_no_drop_matches_transformers(tiny, attn, batch):
    lvlm = tiny(FAMILY, attn)
    inputs = lvlm.prepare(*batch_for(lvlm, batch, FAMILY))
    if batch > 1:
        assert (inputs["attention_mask"] == 0).any(), "the batch should exercise padding"
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=6, stop_at_eos=False)
    ref_logits, ref_tokens = transformers_generate(lvlm, inputs, 6)
    assert out.generated_ids == ref_tokens
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layers", [[1], [2, 4]], ids=["one-stage", "two-stage"])
def test_v2drop_equals_transformers_with_dropped_keys_masked(tiny, attn, layers):
    """Kept sets (top-k of the variation of the inputs transformers' layers receive), first logits and greedy
    tokens equal transformers' eager model with the dropped tokens masked as keys from their layer on."""
    lvlm, eager = tiny(FAMILY, attn), tiny(FAMILY, "eager")
    inputs = lvlm.prepare(*batch_for(lvlm, 3, FAMILY))
    schedule = Schedule.progressive(layers, [0.5] * len(layers))
    out = lvlm.generate_from_inputs(inputs, Method("v2drop", schedule=schedule), max_new_tokens=5, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, schedule, 5)
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    assert all(len(k) == len(layers) and all(k) for k in ref_kept)
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens


@pytest.mark.parametrize("kind", ["fastv", "pdrop"])
def test_attention_scorers_keep_the_top_of_transformers_eager_attention(tiny, kind):
    lvlm, eager = tiny(FAMILY, "sdpa"), tiny(FAMILY, "eager")
    check_attention_scorer_keeps_eager_top(
        lvlm, eager, lvlm.prepare(*batch_for(lvlm, 3, FAMILY)), kind, drop_layer=2, keep=5
    )


@pytest.mark.parametrize("scorer", ["v2drop", "fastv", "random"])
def test_batch_equals_alone(tiny, scorer):
    lvlm = tiny(FAMILY)
    prompts, images = batch_for(lvlm, 3, FAMILY)
    drop = Method(scorer, schedule=Schedule.progressive([1, 4], [0.4, 0.5]))
    batch = lvlm.generate(prompts, images, method=drop, max_new_tokens=5, stop_at_eos=False)
    for i in range(3):
        alone = lvlm.generate([prompts[i]], [images[i]], method=drop, max_new_tokens=5, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)


def test_bad_tile_token_count_is_refused(tiny):
    lvlm = tiny(FAMILY)
    inputs = lvlm.prepare(*batch_for(lvlm, 1, FAMILY))
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == lvlm.adapter.image_token_id).nonzero()[0, 0]] = 0
    with pytest.raises(ValueError, match="whole number of 4x4-token tiles"):
        lvlm.adapter.image_grids({**inputs, "input_ids": ids})


# -- every registered scorer (batch == alone and keep-all == the model: tests/test_scorer_contract.py, every family) -
@pytest.mark.parametrize("name", [n for n in SCORERS if not refuses(n, FAMILY)])
def test_every_scorer_keeps_the_same_under_eager_and_sdpa(tiny, name):
    prompts, images = batch_for(tiny(FAMILY), 3, FAMILY)
    eager = tiny(FAMILY, "eager").generate(prompts, images, method=method(name), max_new_tokens=1)
    sdpa = tiny(FAMILY, "sdpa").generate(prompts, images, method=method(name), max_new_tokens=1)
    assert kept(eager) == kept(sdpa)


# -- real geometry: InternVL3-8B-hf's preprocessing (448-pixel tiles, patch 14, 256 tokens a tile), tiny weights -----
_REAL: dict = {}


def real(attn: str = "sdpa"):
    """A cached real-geometry InternVL3 (same weights for every attention implementation)."""
    if attn not in _REAL:
        _REAL[attn] = build_real(FAMILY, attn)
    return _REAL[attn]


def real_batch(lvlm):
    """1000x700 (6 tiles + thumbnail: 1792 tokens) beside 300x300 (one tile: 256 tokens), padded."""
    prompts = [prompt_for(lvlm, q) for q in ("how many ?", "what is the colour of the digit in row 2 column 3 ?")]
    return lvlm.prepare(prompts, [photo(0, 1000, 700), photo(1, 300, 300)])


# (width, height) -> tiles (the thumbnail included): InternVL's closest aspect ratio among 1..12 tiles
TILES = {(1000, 700): 7, (300, 300): 1, (448, 448): 1, (1344, 448): 4, (2000, 1500): 13, (500, 2000): 5}


def test_real_processor_outputs_equal_transformers_processor():
    """The stand-in's outputs equal transformers' own ``InternVLProcessor``'s on every key, one and two images."""
    lvlm = real()
    ref = reference_processor(lvlm)
    assert type(ref).__mro__[1].__name__ == "InternVLProcessor"
    sizes = list(TILES)
    cases = [([s], prompt_for(lvlm, "how many ?")) for s in sizes] + [
        ([sizes[0], sizes[3]], prompt_for(lvlm, "how many ?", n_images=2))
    ]
    for i, (image_sizes, prompt) in enumerate(cases):
        images = [photo(i, w, h) for w, h in image_sizes]
        ours, expected = lvlm.processor(prompt, images=images), ref(text=prompt, images=images, return_tensors="pt")
        assert sorted(ours) == sorted(expected)
        for key in expected:
            assert ours[key].dtype == expected[key].dtype and torch.equal(ours[key], expected[key]), key
        tiles = sum(TILES[s] for s in image_sizes)
        assert ours["pixel_values"].shape == (tiles, 3, 448, 448)
        assert int((ours["input_ids"] == lvlm.adapter.image_token_id).sum()) == 256 * tiles


def test_real_tiles_are_16x16_grids():
    lvlm = real()
    inputs = real_batch(lvlm)
    assert lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist() == [7 * 256, 256]
    assert lvlm.adapter.image_grids(inputs) == [(1, 16, 16)] * 8


@pytest.mark.slow
def test_real_no_drop_matches_transformers():
    lvlm = real()
    inputs = real_batch(lvlm)
    assert (inputs["attention_mask"] == 0).any()
    out = lvlm.generate_from_inputs(inputs, None, max_new_tokens=3, stop_at_eos=False)
    ref_logits, ref_tokens = transformers_generate(lvlm, inputs, 3)
    assert out.generated_ids == ref_tokens
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_v2drop_equals_transformers_with_dropped_keys_masked():
    """Two stages at layers 1 and 2 on 1792 + 256 vision tokens (7 and 1 tiles), padded batch."""
    lvlm, eager = real(), real("eager")
    inputs = real_batch(lvlm)
    schedule = Schedule.progressive([1, 2], [0.25, 0.5])
    out = lvlm.generate_from_inputs(inputs, Method("v2drop", schedule=schedule), max_new_tokens=3, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, schedule, 3)
    assert [[len(k) for k in kept] for kept in ref_kept] == [[448, 224], [64, 32]]
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fastv", "pdrop"])
def test_real_attention_scorers_keep_the_top_of_transformers_eager_attention(kind):
    lvlm, eager = real(), real("eager")
    check_attention_scorer_keeps_eager_top(lvlm, eager, real_batch(lvlm), kind, drop_layer=2, keep=64)


@pytest.mark.slow
def test_real_batch_equals_alone():
    lvlm = real()
    prompts = [prompt_for(lvlm, "how many ?"), prompt_for(lvlm, "what is the digit ?")]
    images = [photo(0, 1000, 700), photo(1, 300, 300)]
    drop = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.3, 0.5]))
    batch = lvlm.generate(prompts, images, method=drop, max_new_tokens=3, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate([prompts[i]], [images[i]], method=drop, max_new_tokens=3, stop_at_eos=False)
        assert alone.traces[0].stages == batch.traces[i].stages
        assert alone.generated_ids[0] == batch.generated_ids[i]
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)


@pytest.mark.integration
def test_real_checkpoint_round_trip_loads_the_stand_in(tmp_path):
    """A saved real-geometry checkpoint loads through ``v2drop.load`` with the stand-in (transformers'
    ``InternVLProcessor`` needs torchvision for its video processor) and gives the same prompts and tokens."""
    lvlm = real()
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load(str(tmp_path))
    assert type(again.processor).__name__ == "InternVLProcessorLite"
    assert again.processor.image_seq_length == 256 and again.processor.image_token == "<IMG_CONTEXT>"
    prompts, images = [prompt_for(lvlm, "how many ?")], [photo(0, 1000, 700)]
    a = lvlm.generate(prompts, images, max_new_tokens=3, stop_at_eos=False)
    b = again.generate(prompts, images, max_new_tokens=3, stop_at_eos=False)
    assert a.prompt_ids == b.prompt_ids and a.generated_ids == b.generated_ids


def test_stand_in_refuses_videos_and_a_placeholder_count_mismatch(tiny):
    lvlm = tiny(FAMILY)
    prompt = prompt_for(lvlm, "how many ?")
    with pytest.raises(ValueError, match="images only"):
        lvlm.processor(prompt, videos=[[photo(0, 32, 32)]])
    with pytest.raises(ValueError, match="1 '<IMG_CONTEXT>' placeholder\\(s\\) but 2"):
        lvlm.processor(prompt, images=[photo(0, 32, 32), photo(1, 32, 32)])
