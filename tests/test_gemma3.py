"""Gemma 3: the engine equals transformers' own model with and without dropping, pan-and-scan crops included.

Every reference is transformers' ``Gemma3ForConditionalGeneration`` itself (its ``generate``, its eager attention,
its masks built from ``token_type_ids``), observed or masked through hooks on its decoder layers. The tiny model's
local layers (0, 1, 3, 4) have a window of 12 positions, shorter than a prompt and than one 16-token image block, so
the sliding window, the bidirectional image blocks and the local layers' truncated KV caches all act.
"""

import pytest
import torch
from reference_helpers import (
    check_attention_scorer_keeps_eager_top,
    masked_transformers_generate,
    transformers_generate,
)
from test_scorer_contract import FAMILY_SUPPORT, SCHEDULE, SCORERS, kept, method, refuses
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from v2drop import Method, Schedule, load
from v2drop.lvlm import _collate
from v2drop.testing import batch_for, build_real, photo, prompt_for

FAMILY = "gemma3"


QUESTIONS = ("how many ?", "what is the digit ?", "what is the colour ?")


def pan_and_scan_batch(lvlm, sizes, first: int = 0):
    """One prompt per (width, height) image (sample j: image seed and question ``first + j``), each processed alone
    with pan-and-scan asked for at call time (crops of at least 8 pixels on the tiny model), then left-padded
    together as ``LVLM.prepare`` does."""
    min_crop = 8 if lvlm.model.config.vision_config.image_size < 256 else 256
    samples = [
        dict(
            lvlm.processor(
                text=prompt_for(lvlm, QUESTIONS[(first + j) % 3]),
                images=[photo(first + j, w, h)],
                return_tensors="pt",
                do_pan_and_scan=True,
                pan_and_scan_min_crop_size=min_crop,
            )
        )
        for j, (w, h) in enumerate(sizes)
    ]
    return _collate(samples, 0, lvlm.device, lvlm.model.dtype)


TINY_CROPS = [(96, 32), (32, 64), (32, 32)]  # 3 crops + the image, 2 crops + the image, the image alone


def tiny_inputs(lvlm, n: int, crops: bool) -> dict:
    """``n`` padded prompts of one image each, with pan-and-scan crops (4, 3 and 1 image blocks) or without."""
    if crops:
        return pan_and_scan_batch(lvlm, TINY_CROPS[:n])
    return lvlm.prepare(*batch_for(lvlm, n, FAMILY))


# -- layout and masks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
def test_blocks_and_prefill_masks_are_transformers(tiny, crops):
    """Image blocks number as ``get_block_sequence_ids_for_mask``'s; before any drop the engine's masks allow exactly
    the keys of transformers' ``create_masks_for_vision_model`` (global and local) for every real query."""
    lvlm = tiny(FAMILY, "eager")
    inputs = tiny_inputs(lvlm, 3, crops)
    a = lvlm.adapter
    pad = inputs["attention_mask"].bool()
    ref_blocks = get_block_sequence_ids_for_mask(inputs["token_type_ids"])
    assert torch.equal(a.attention_blocks(inputs), ref_blocks.masked_fill(~pad, -1))
    assert int(ref_blocks.max()) + 1 == (4 if crops else 1)
    assert a.image_grids(inputs) == [(1, 4, 4)] * (8 if crops else 3)
    hidden = a.embed(inputs)
    ref = create_masks_for_vision_model(
        config=a.text_config,
        inputs_embeds=hidden,
        attention_mask=inputs["attention_mask"],
        past_key_values=None,
        position_ids=None,
        block_sequence_ids=ref_blocks,
    )
    from transformers import DynamicCache

    index = (pad.long().cumsum(1) - 1).masked_fill(~pad, -1)
    for kind in ("full_attention", "sliding_attention"):
        layer = a.text_config.layer_types.index(kind)
        ours = a.attention_mask(
            kind,
            layer,
            hidden,
            inputs["attention_mask"],
            DynamicCache(config=a.text_config),
            index,
            a.attention_blocks(inputs),
        )
        rows = pad[:, None, :, None].expand_as(ours)
        assert torch.equal((ours == 0)[rows], (ref[kind] == 0)[rows]), kind
    rows = pad[:, None, :, None].expand_as(ref["full_attention"])
    future = torch.ones_like(rows[0, 0], dtype=torch.bool).triu(1)
    assert bool(((ref["full_attention"] == 0) & future)[rows].any()), "image blocks see ahead"
    assert bool(((ref["full_attention"] == 0) & (ref["sliding_attention"] != 0))[rows].any()), "windows hide keys"


@torch.no_grad()
def test_image_blocks_and_unscaled_image_features_change_the_result(tiny):
    """The references are sensitive: transformers without ``token_type_ids`` (causal image tokens) gives other
    logits; the image features enter unscaled, the text embeddings scaled by sqrt(hidden)."""
    lvlm = tiny(FAMILY)
    inputs = tiny_inputs(lvlm, 2, crops=False)
    with_blocks = lvlm.generate_from_inputs(inputs, None, max_new_tokens=1).first_logits
    causal = lvlm.model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[:, -1].float()
    assert (with_blocks - causal).abs().max() > 1e-3
    a = lvlm.adapter
    embeds = a.embed(inputs)
    image = inputs["input_ids"] == a.image_token_id
    features = lvlm.model.model.get_image_features(inputs["pixel_values"]).pooler_output.flatten(0, 1)
    torch.testing.assert_close(embeds[image], features, atol=0, rtol=0)
    text = inputs["attention_mask"].bool() & ~image
    raw = lvlm.model.model.language_model.embed_tokens.weight[inputs["input_ids"][text]]
    torch.testing.assert_close(embeds[text], raw * 64**0.5)


# -- no dropping: transformers' generate ----------------------------------------------------------------------------
@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_no_drop_matches_transformers(tiny, attn, batch, crops):
    lvlm = tiny(FAMILY, attn)
    inputs = tiny_inputs(lvlm, batch, crops)
    if batch > 1:
        assert (inputs["attention_mask"] == 0).any(), "the batch should exercise padding"
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=6, stop_at_eos=False)
    ref_logits, ref_tokens = transformers_generate(lvlm, inputs, 6)
    assert out.generated_ids == ref_tokens
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)


# -- dropping: transformers' eager model with the dropped tokens masked as keys ----------------------------------------
@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layers", [[1], [2, 4]], ids=["one-stage", "two-stage"])
def test_v2drop_equals_transformers_with_dropped_keys_masked(tiny, attn, layers, crops):
    """Kept sets (top-k of the variation of the inputs transformers' layers receive), first logits and greedy
    tokens (8 of them: decoding past the window) equal transformers' eager model with the dropped tokens masked
    as keys from their layer on."""
    lvlm, eager = tiny(FAMILY, attn), tiny(FAMILY, "eager")
    inputs = tiny_inputs(lvlm, 3, crops)
    schedule = Schedule.progressive(layers, [0.5] * len(layers))
    out = lvlm.generate_from_inputs(inputs, Method("v2drop", schedule=schedule), max_new_tokens=8, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, schedule, 8)
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    assert all(len(k) == len(layers) and all(k) for k in ref_kept)
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens


def test_dropping_changes_the_result_the_reference_reproduces(tiny):
    """The masked reference is not the unmasked model: a two-stage drop changes the logits."""
    lvlm = tiny(FAMILY, "eager")
    inputs = tiny_inputs(lvlm, 3, crops=True)
    schedule = Schedule.progressive([2, 4], [0.25, 0.5])
    ref_logits, _, _ = masked_transformers_generate(lvlm, inputs, schedule, 1)
    plain_logits, _ = transformers_generate(lvlm, inputs, 1)
    assert (ref_logits - plain_logits).abs().max() > 1e-3


@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
@pytest.mark.parametrize(("kind", "drop_layer"), [("fastv", 2), ("fastv", 3), ("pdrop", 2), ("pdrop", 3)])
def test_attention_scorers_keep_the_top_of_transformers_eager_attention(tiny, kind, drop_layer, crops):
    """From a local layer (FastV at 2: layer 1; PDrop at 3) or a global one (FastV at 3, PDrop at 2)."""
    lvlm, eager = tiny(FAMILY, "sdpa"), tiny(FAMILY, "eager")
    check_attention_scorer_keeps_eager_top(
        lvlm, eager, tiny_inputs(lvlm, 3, crops), kind, drop_layer=drop_layer, keep=5
    )


@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
@pytest.mark.parametrize("scorer", ["v2drop", "fastv", "random"])
def test_batch_equals_alone(tiny, scorer, crops):
    lvlm = tiny(FAMILY)
    drop = Method(scorer, schedule=Schedule.progressive([1, 4], [0.4, 0.5]))
    batch = lvlm.generate_from_inputs(tiny_inputs(lvlm, 3, crops), drop, max_new_tokens=6, stop_at_eos=False)
    for i in range(3):
        if crops:
            alone_inputs = pan_and_scan_batch(lvlm, TINY_CROPS[i : i + 1], first=i)
        else:
            prompts, images = batch_for(lvlm, 3, FAMILY)
            alone_inputs = lvlm.prepare([prompts[i]], [images[i]])
        alone = lvlm.generate_from_inputs(alone_inputs, drop, max_new_tokens=6, stop_at_eos=False)
        assert alone.prompt_ids[0] == batch.prompt_ids[i]
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)


def test_pan_and_scan_asked_for_at_call_time_is_the_hand_collated_path(tiny):
    """``generate(..., processor_kwargs=...)`` builds the same inputs as the processor called by hand with pan-and-scan
    and collated (``pan_and_scan_batch``): same tokens and first logits, and more image blocks than without."""
    lvlm = tiny(FAMILY)
    prompts = [prompt_for(lvlm, QUESTIONS[j]) for j in range(len(TINY_CROPS))]
    images = [photo(j, w, h) for j, (w, h) in enumerate(TINY_CROPS)]
    options = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}
    drop = Method("v2drop", schedule=SCHEDULE)
    ours = lvlm.generate(prompts, images, method=drop, max_new_tokens=4, stop_at_eos=False, processor_kwargs=options)
    hand = lvlm.generate_from_inputs(pan_and_scan_batch(lvlm, TINY_CROPS), drop, max_new_tokens=4, stop_at_eos=False)
    plain = lvlm.prepare(prompts, images)
    assert ours.prompt_ids == hand.prompt_ids and ours.generated_ids == hand.generated_ids
    assert [t.stages for t in ours.traces] == [t.stages for t in hand.traces]
    torch.testing.assert_close(ours.first_logits, hand.first_logits, atol=0, rtol=0)
    assert len(lvlm.prepare(prompts, images, processor_kwargs=options)["pixel_values"]) == 4 + 3 + 1
    assert len(plain["pixel_values"]) == 3


@pytest.mark.parametrize("workers", [0, 1], ids=["main-process", "loader-worker"])
def test_pan_and_scan_in_an_evaluation_is_generate_with_it(tiny, tmp_path, workers):
    """``EvalConfig.processor_args`` reaches the processor wherever the batches are prepared (the main process or a
    loader worker): each record's vision tokens and answer are ``generate``'s with the same options."""
    from v2drop.evaluation import EvalConfig, evaluate, read_records
    from v2drop.testing import EchoBench, Item

    lvlm = tiny(FAMILY)
    bench = EchoBench(2)
    bench.items = [Item(f"s{j}", QUESTIONS[j], "?", "a", (photo(j, w, h),)) for j, (w, h) in enumerate(TINY_CROPS[:2])]
    options = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}
    config = EvalConfig(model="tiny", warmup=0, max_new_tokens=3, progress=False, workers=workers)
    drop = Method("v2drop", schedule=SCHEDULE)
    evaluate(lvlm, bench, drop, config, records_path=tmp_path / "plain.jsonl")
    config.processor_args = options
    evaluate(lvlm, bench, drop, config, records_path=tmp_path / "crops.jsonl")
    plain, crops = read_records(tmp_path / "plain.jsonl"), read_records(tmp_path / "crops.jsonl")
    assert [r["vision_tokens"] for r in plain] == [16, 16] and [r["vision_tokens"] for r in crops] == [64, 48]
    for item, record in zip(bench.items, crops):
        prompt = lvlm.format_prompt(item.question)
        out = lvlm.generate([prompt], [list(item.images)], method=drop, max_new_tokens=3, processor_kwargs=options)
        assert record["prediction"] == out.texts[0] and record["vision_tokens"] == out.traces[0].vision_tokens


def test_pan_and_scan_with_a_cache_is_another_entry(tiny):
    """An attached vision cache keys prepared inputs by the processor options too: plain and pan-and-scan never
    share an entry."""
    from v2drop.vision_cache import VisionCache

    lvlm = tiny(FAMILY)
    prompts, images = [prompt_for(lvlm, QUESTIONS[0])], [photo(0, 96, 32)]
    options = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}
    with VisionCache().attached(lvlm) as cache:
        plain = lvlm.prepare(prompts, images)
        crops = lvlm.prepare(prompts, images, processor_kwargs=options)
        again = lvlm.prepare(prompts, images, processor_kwargs=options)
    assert len(plain["pixel_values"]) == 1 and len(crops["pixel_values"]) == 4
    assert again["pixel_values"] is crops["pixel_values"] and (cache.misses, cache.hits) == (2, 1)


def test_pan_and_scan_bad_option_is_refused(tiny):
    """An option the processor does not take is one clear error naming what it accepts; llava takes none."""
    lvlm = tiny(FAMILY)
    prompts, images = [prompt_for(lvlm, QUESTIONS[0])], [photo(0, 96, 32)]
    with pytest.raises(
        ValueError, match=r"\['do_pan'\] not supported by Gemma3Processor; it accepts \['do_pan_and_scan'"
    ):
        lvlm.prepare(prompts, images, processor_kwargs={"do_pan": True})
    with pytest.raises(TypeError, match="must be a dict"):
        lvlm.prepare(prompts, images, processor_kwargs="do_pan_and_scan")
    llava = tiny("llava")
    with pytest.raises(ValueError, match="not supported by LlavaProcessor; it accepts no call-time options"):
        llava.generate(*batch_for(llava, 1, "llava"), processor_kwargs={"do_pan_and_scan": True})


def test_bad_image_token_count_is_refused(tiny):
    lvlm = tiny(FAMILY)
    inputs = lvlm.prepare(*batch_for(lvlm, 1, FAMILY))
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == lvlm.adapter.image_token_id).nonzero()[0, 0]] = 0
    with pytest.raises(ValueError, match="whole number of 16-token image blocks"):
        lvlm.adapter.image_grids({**inputs, "input_ids": ids})


@torch.no_grad()
def test_keys_recomputed_for_a_local_layer_equal_what_it_caches(tiny):
    """DART reads the keys of the layer before its stage; a local layer's cache keeps only its last 11, so they are
    recomputed from the layer's input (``layer_keys``): equal to what the layer caches when it keeps them all."""
    from transformers import DynamicCache

    from v2drop.attention import layer_keys

    lvlm = tiny(FAMILY)
    a = lvlm.adapter
    inputs = tiny_inputs(lvlm, 2, crops=False)
    hidden = a.embed(inputs)
    rope = a.layer_rope(a.rope(hidden, a.position_ids(inputs)), 0)
    assert a.layer_type(0) == "sliding_attention"
    cache = DynamicCache()  # no config: every layer keeps all its keys
    mask = a.attention_mask(
        "sliding_attention", 0, hidden, inputs["attention_mask"], cache, *_index_and_blocks(a, inputs)
    )
    a.layers[0](hidden, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(layer_keys(a.layers[0], hidden, rope), cache.layers[0].keys, atol=0, rtol=0)


def _index_and_blocks(adapter, inputs):
    """Prompt indices and attention blocks of the layer-0 tokens."""
    pad = inputs["attention_mask"].bool()
    return (pad.long().cumsum(1) - 1).masked_fill(~pad, -1), adapter.attention_blocks(inputs)


# -- every registered scorer runs on Gemma 3 or refuses with its reason (the contract suite's rules) ------------------
@pytest.mark.parametrize("name", SCORERS)
def test_every_scorer_batches_as_alone_or_refuses(tiny, name):
    lvlm = tiny(FAMILY)
    prompts, images = batch_for(lvlm, 3, FAMILY)
    if refuses(name, FAMILY):
        with pytest.raises(ValueError, match=FAMILY_SUPPORT[name][1]):
            lvlm.generate(prompts, images, method=method(name), max_new_tokens=1)
        return
    batch = lvlm.generate(prompts, images, method=method(name), max_new_tokens=2, stop_at_eos=False)
    assert all(len(t.stages) == len(SCHEDULE.stages) for t in batch.traces)
    for i in range(3):
        alone = lvlm.generate(prompts[i : i + 1], images[i : i + 1], method=method(name), max_new_tokens=2)
        assert kept(alone)[0] == kept(batch)[i]
        assert alone.generated_ids[0] == batch.generated_ids[i]


@pytest.mark.parametrize("name", [n for n in SCORERS if not refuses(n, FAMILY)])
def test_every_scorer_keeping_everything_is_the_model(tiny, name):
    lvlm = tiny(FAMILY)
    inputs = lvlm.prepare(*batch_for(lvlm, 2, FAMILY))
    base = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=3, stop_at_eos=False)
    out = lvlm.generate_from_inputs(
        inputs, method(name, Schedule.progressive([2, 4], [1.0, 1.0])), max_new_tokens=3, stop_at_eos=False
    )
    assert out.generated_ids == base.generated_ids
    assert torch.equal(out.first_logits, base.first_logits)


@pytest.mark.parametrize("name", [n for n in SCORERS if not refuses(n, FAMILY)])
def test_every_scorer_keeps_the_same_under_eager_and_sdpa(tiny, name):
    prompts, images = batch_for(tiny(FAMILY), 3, FAMILY)
    eager = tiny(FAMILY, "eager").generate(prompts, images, method=method(name), max_new_tokens=1)
    sdpa = tiny(FAMILY, "sdpa").generate(prompts, images, method=method(name), max_new_tokens=1)
    assert kept(eager) == kept(sdpa)


# -- real geometry: gemma-3-4b-it's preprocessing (896 pixels, patch 14, 256 tokens an image, window 1024) -------------
_REAL: dict = {}


def real(attn: str = "sdpa"):
    """A cached real-geometry Gemma 3 (same weights for every attention implementation)."""
    if attn not in _REAL:
        _REAL[attn] = build_real(FAMILY, attn)
    return _REAL[attn]


def real_batch(lvlm, crops: bool = False):
    """A 1600x600 image beside a 640x480 one, padded; with pan-and-scan (transformers' 4b settings: crops of at least
    256 pixels, at most 4) the image and 3 crops (1024 image tokens: more than the window) and the image and 2."""
    if crops:
        return pan_and_scan_batch(lvlm, [(1600, 600), (640, 480)])
    prompts = [prompt_for(lvlm, q) for q in ("how many ?", "what is the colour of the digit in row 2 column 3 ?")]
    return lvlm.prepare(prompts, [photo(0, 1600, 600), photo(1, 640, 480)])


@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
def test_real_images_are_16x16_blocks(crops):
    lvlm = real()
    inputs = real_batch(lvlm, crops)
    blocks = lvlm.adapter.image_grids(inputs)
    assert set(blocks) == {(1, 16, 16)}
    counts = lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist()
    assert counts == ([4 * 256, 3 * 256] if crops else [256, 256])
    assert inputs["pixel_values"].shape[1:] == (3, 896, 896)


@pytest.mark.slow
@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
def test_real_no_drop_matches_transformers(crops):
    lvlm = real()
    inputs = real_batch(lvlm, crops)
    assert (inputs["attention_mask"] == 0).any()
    out = lvlm.generate_from_inputs(inputs, None, max_new_tokens=3, stop_at_eos=False)
    ref_logits, ref_tokens = transformers_generate(lvlm, inputs, 3)
    assert out.generated_ids == ref_tokens
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("crops", [False, True], ids=["plain", "pan-and-scan"])
def test_real_v2drop_equals_transformers_with_dropped_keys_masked(crops):
    """Two stages at layers 1 and 3 (local layers), padded batch; with pan-and-scan the first prompt is longer than
    the window of 1024."""
    lvlm, eager = real(), real("eager")
    inputs = real_batch(lvlm, crops)
    schedule = Schedule.progressive([1, 3], [0.25, 0.5])
    out = lvlm.generate_from_inputs(inputs, Method("v2drop", schedule=schedule), max_new_tokens=3, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, schedule, 3)
    assert [[len(k) for k in kept] for kept in ref_kept] == ([[256, 128], [192, 96]] if crops else [[64, 32]] * 2)
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fastv", "pdrop"])
def test_real_attention_scorers_keep_the_top_of_transformers_eager_attention(kind):
    lvlm, eager = real(), real("eager")
    check_attention_scorer_keeps_eager_top(lvlm, eager, real_batch(lvlm, crops=True), kind, drop_layer=2, keep=64)


@pytest.mark.slow
def test_real_batch_equals_alone():
    lvlm = real()
    drop = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.3, 0.5]))
    sizes = [(1600, 600), (640, 480)]
    batch = lvlm.generate_from_inputs(pan_and_scan_batch(lvlm, sizes), drop, max_new_tokens=3, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate_from_inputs(
            pan_and_scan_batch(lvlm, sizes[i : i + 1], first=i), drop, max_new_tokens=3, stop_at_eos=False
        )
        assert alone.traces[0].stages == batch.traces[i].stages
        assert alone.generated_ids[0] == batch.generated_ids[i]
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)


@pytest.mark.integration
def test_real_checkpoint_round_trip_loads_transformers_processor(tmp_path):
    """A saved real-geometry checkpoint loads through ``v2drop.load`` with transformers' own ``Gemma3Processor``
    (it needs no torchvision) and gives the same prompts and tokens."""
    lvlm = real()
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load(str(tmp_path))
    assert type(again.processor).__name__ == "Gemma3Processor"
    prompts, images = [prompt_for(lvlm, "how many ?")], [photo(0, 1000, 700)]
    a = lvlm.generate(prompts, images, max_new_tokens=3, stop_at_eos=False)
    b = again.generate(prompts, images, max_new_tokens=3, stop_at_eos=False)
    assert a.prompt_ids == b.prompt_ids and a.generated_ids == b.generated_ids
