"""Qwen3-VL and Qwen3-VL-MoE: the engine equals transformers' own model, DeepStack additions included, with and
without dropping.

Every model test runs on both families (``family``: the MoE one differs only in its decoder MLP, a top-2 routed
mixture of experts). Every reference here is transformers' ``Qwen3VLForConditionalGeneration`` (or
``Qwen3VLMoeForConditionalGeneration``) itself (its ``generate``, its
forward, its eager attention), observed or masked through hooks on its decoder layers, so DeepStack,
the interleaved M-RoPE and ``get_rope_index`` are transformers' and not re-implemented.
"""

import pytest
import torch
from reference_helpers import check_attention_scorer_keeps_eager_top, masked_transformers_generate

from v2drop import Method, Schedule, load
from v2drop.lvlm import _collate
from v2drop.models.frames import Clip
from v2drop.testing import batch_for, build_real, photo, prompt_for, reference_processor, video_frames
from v2drop.vision_cache import VisionCache


@pytest.fixture(params=["qwen3_vl", "qwen3_vl_moe"])
def family(request):
    """The Qwen3-VL family under test: dense or mixture-of-experts decoder."""
    return request.param


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_no_drop_matches_transformers(tiny, attn, batch, family):
    lvlm = tiny(family, attn)
    prompts, images = batch_for(lvlm, batch, family)
    inputs = lvlm.prepare(prompts, images)
    if batch > 1:
        assert (inputs["attention_mask"] == 0).any(), "the batch should exercise padding"
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=6, stop_at_eos=False)
    with torch.no_grad():
        ref_tokens = lvlm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        ref_logits = lvlm.model(**inputs).logits[:, -1].float()
    assert out.generated_ids == ref_tokens[:, inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)


def test_deepstack_changes_the_result(tiny, monkeypatch, family):
    """The additions are real: without them the engine is no longer transformers' model."""
    lvlm = tiny(family)
    inputs = lvlm.prepare(*batch_for(lvlm, 2, family))
    additions = lvlm.adapter.layer_additions(inputs)
    assert sorted(additions) == [0, 1, 2]  # one per DeepStack tower layer, added after decoder layers 0-2
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])
    for extra in additions.values():
        assert bool((extra[vision] != 0).any(-1).all()) and bool((extra[~vision] == 0).all())
    with torch.no_grad():
        ref_logits = lvlm.model(**inputs).logits[:, -1].float()
    monkeypatch.setattr(lvlm.adapter, "layer_additions", lambda inputs: {})
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=1)
    assert (out.first_logits - ref_logits).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layers", [[1], [2, 4]], ids=["one-stage", "two-stage"])
def test_v2drop_equals_transformers_with_dropped_keys_masked(tiny, attn, layers, family):
    """Kept sets, first logits and greedy tokens equal the masked eager model's (DeepStack inside layers 0-2)."""
    lvlm, eager = tiny(family, attn), tiny(family, "eager")
    inputs = lvlm.prepare(*batch_for(lvlm, 3, family))
    schedule = Schedule.progressive(layers, [0.5] * len(layers))
    out = lvlm.generate_from_inputs(inputs, Method("v2drop", schedule=schedule), max_new_tokens=5, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, schedule, 5)
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    assert all(len(k) == len(layers) and all(k) for k in ref_kept)
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens


@pytest.mark.parametrize("geometry", ["tiny", pytest.param("real", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["fastv", "pdrop"])
def test_attention_scorers_keep_the_top_of_transformers_eager_attention(tiny, kind, geometry, family):
    """A stage at layer 2 keeps the top-k of the eager attention from the last prompt token (head mean) of layer 1
    (FastV) or 2 (PDrop), as transformers' own eager forward computes it (q/k norms, DeepStack of layers 0-1)."""
    if geometry == "tiny":
        lvlm, eager = tiny(family, "sdpa"), tiny(family, "eager")
        inputs = lvlm.prepare(*batch_for(lvlm, 3, family))
    else:
        lvlm, eager = real(family), real(family, "eager")
        inputs = real_batch(lvlm)
    check_attention_scorer_keeps_eager_top(
        lvlm, eager, inputs, kind, drop_layer=2, keep=3 if geometry == "tiny" else 64
    )


@pytest.mark.parametrize("scorer", ["v2drop", "fastv", "random"])
def test_batch_equals_alone(tiny, scorer, family):
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    method = Method(scorer, schedule=Schedule.progressive([1, 4], [0.4, 0.5]))
    batch = lvlm.generate(prompts, images, method=method, max_new_tokens=5, stop_at_eos=False)
    for i in range(3):
        alone = lvlm.generate([prompts[i]], [images[i]], method=method, max_new_tokens=5, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)


# -- real geometry: Qwen3-VL-8B-Instruct's preprocessing (patch 16, 65536..16777216 pixels), tiny weights ------------
_REAL: dict = {}


def real(family: str, attn: str = "sdpa"):
    """A cached real-geometry model of ``family`` (same weights for every attention implementation)."""
    if (family, attn) not in _REAL:
        _REAL[family, attn] = build_real(family, attn)
    return _REAL[family, attn]


def real_batch(lvlm):
    prompts = [prompt_for(lvlm, q) for q in ("how many ?", "what is the colour of the digit in row 2 column 3 ?")]
    return lvlm.prepare(prompts, [photo(0, 1000, 700), photo(1, 640, 480)])


def test_real_processor_outputs_equal_transformers_processor():
    """The stand-in's outputs for image prompts equal transformers' own ``Qwen3VLProcessor``'s on every key."""
    lvlm = real("qwen3_vl")  # the same processor for both families
    ref = reference_processor(lvlm)
    assert type(ref).__mro__[1].__name__ == "Qwen3VLProcessor"
    prompts = [prompt_for(lvlm, "how many ?"), prompt_for(lvlm, "how many ?", n_images=2)]
    for prompt, images in zip(prompts, [[photo(0, 1000, 700)], [photo(1, 640, 480), photo(2, 200, 150)]]):
        ours, expected = lvlm.processor(prompt, images=images), ref(text=prompt, images=images, return_tensors="pt")
        assert sorted(ours) == sorted(expected)
        for key in expected:
            assert ours[key].dtype == expected[key].dtype and torch.equal(ours[key], expected[key]), key


VIDEO_PROMPT = "USER: <|vision_start|><|video_pad|><|vision_end|>\nhow many ? ASSISTANT:"
# videos as (seed, frames, width, height), video_metadata, sampling kwargs; 448x320 frames need no resizing (multiples
# of 32 within the clip's pixel bounds), so pixels are exact. Frames kept: Qwen3VLVideoProcessor.sample_frames with its
# default 2 frames a second (at least 4), the given fps, or every frame without sampling.
VIDEO_CASES = {
    "fps-metadata": ([(1, 8, 448, 320)], [{"total_num_frames": 8, "fps": 2.0}], {}, 8),
    "no-metadata": ([(1, 8, 448, 320)], None, {}, 4),  # 24 fps assumed: 8 / 24 * 2 -> at least 4 frames
    "sample-12-fps": ([(2, 24, 448, 320)], [{"total_num_frames": 24, "fps": 12.0}], {}, 4),
    "sample-1-fps": ([(2, 12, 448, 320)], [{"total_num_frames": 12, "fps": 6.0}], {"fps": 1}, 4),
    "frames-indices": (
        [(3, 6, 448, 320)],
        [{"total_num_frames": 60, "fps": 30.0, "frames_indices": [*range(0, 60, 10)]}],
        {"do_sample_frames": False},
        6,
    ),
    "two-videos": (
        [(1, 8, 448, 320), (4, 6, 320, 448)],
        [{"total_num_frames": 8, "fps": 4.0}, {"total_num_frames": 6, "fps": 3.0}],
        {},
        4 + 4,
    ),
}


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_real_video_processor_outputs_equal_transformers_processor(case):
    """Ids (timestamps included), token types, pixels and grids equal ``Qwen3VLProcessor``'s with transformers' own
    ``Qwen3VLVideoProcessor`` (sampling, clip pixel budget, patchify), given metadata as an argument or in ``Clip``s."""
    lvlm = real("qwen3_vl")  # the same processor for both families
    specs, metadata, kwargs, frames = VIDEO_CASES[case]
    videos = [video_frames(seed, n, w, h) for seed, n, w, h in specs]
    prompt = VIDEO_PROMPT.replace(
        "<|vision_end|>", "<|vision_end|>" + "<|vision_start|><|video_pad|><|vision_end|>" * (len(videos) - 1)
    )
    given = {"video_metadata": metadata} if metadata is not None else {}
    expected = reference_processor(lvlm)(text=prompt, videos=videos, return_tensors="pt", **given, **kwargs)
    clips = [v if m is None else Clip(v, m) for v, m in zip(videos, metadata or [None] * len(videos))]
    for ours in (
        lvlm.processor(prompt, videos=videos, **given, **kwargs),
        lvlm.processor(prompt, videos=clips, **kwargs),
    ):
        assert sorted(ours) == sorted(expected)
        for key in expected:
            assert ours[key].dtype == expected[key].dtype and torch.equal(ours[key], expected[key]), key
    assert 2 * int(expected["video_grid_thw"][:, 0].sum()) == frames
    # each temporal patch opens its own <|vision_start|> after its timestamp, inside the prompt's own one
    starts = int((expected["input_ids"] == lvlm.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum())
    assert starts == len(videos) + int(expected["video_grid_thw"][:, 0].sum())


@pytest.mark.slow
def test_real_no_drop_matches_transformers(family):
    lvlm = real(family)
    inputs = real_batch(lvlm)
    assert (inputs["attention_mask"] == 0).any()
    out = lvlm.generate_from_inputs(inputs, None, max_new_tokens=3, stop_at_eos=False)
    with torch.no_grad():
        ref_tokens = lvlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        ref_logits = lvlm.model(**inputs).logits[:, -1].float()
    assert out.generated_ids == ref_tokens[:, inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_v2drop_equals_transformers_with_dropped_keys_masked(family):
    """Two stages at layers 1 and 2 (inside DeepStack's layers 0-2) on 682 + 300 vision tokens, padded batch."""
    lvlm, eager = real(family), real(family, "eager")
    inputs = real_batch(lvlm)
    schedule = Schedule.progressive([1, 2], [0.25, 0.5])
    out = lvlm.generate_from_inputs(inputs, Method("v2drop", schedule=schedule), max_new_tokens=3, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, schedule, 3)
    assert [[len(k) for k in kept] for kept in ref_kept] == [[170, 85], [75, 37]]
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens


# -- video: one grid per frame after a "<t seconds>" timestamp that stays text ---------------------------------------
def video_sample(lvlm, seed: int, grid: tuple[int, int, int], prefix: dict | None = None) -> dict:
    """One prompt's inputs as ``Qwen3VLProcessor`` lays a video out: per temporal patch ``<t seconds>`` (text), then
    ``<|vision_start|>``, the frame's ``<|video_pad|>`` tokens and ``<|vision_end|>``; pixels are random patches.
    ``prefix`` (processor outputs, e.g. with an image) comes first."""
    tok, cfg = lvlm.processor.tokenizer, lvlm.model.config.vision_config
    t, h, w = grid
    frame = "<|vision_start|>" + "<|video_pad|>" * (h * w // cfg.spatial_merge_size**2) + "<|vision_end|>"
    text = "".join(f"< {0.5 + i:.1f} seconds >" + frame for i in range(t)) + "\nhow many ? ASSISTANT:"
    ids = tok(("" if prefix else "USER: ") + text, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    patch_dim = 3 * cfg.temporal_patch_size * cfg.patch_size**2
    out = dict(prefix or {})
    before = out.get("input_ids", torch.zeros(1, 0, dtype=torch.long))
    out["input_ids"] = torch.cat([before, ids], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    types = torch.zeros_like(out["input_ids"])
    types[out["input_ids"] == lvlm.adapter.image_token_id] = 1
    types[out["input_ids"] == lvlm.adapter.video_token_id] = 2
    out["mm_token_type_ids"] = types
    out["pixel_values_videos"] = torch.randn(t * h * w, patch_dim)
    out["video_grid_thw"] = torch.tensor([[t, h, w]])
    return out


def video_batch(lvlm) -> list[dict]:
    """A 3-frame video alone, and an image followed by a 2-frame video of another size."""
    image_part = lvlm.processor("USER: <|vision_start|><|image_pad|><|vision_end|>", images=[photo(3, 48, 40)])
    image_part.pop("attention_mask"), image_part.pop("mm_token_type_ids")
    return [video_sample(lvlm, 0, (3, 4, 6)), video_sample(lvlm, 1, (2, 6, 4), prefix=image_part)]


def collated(lvlm, samples: list[dict]) -> dict:
    return _collate(samples, 0, lvlm.device, lvlm.model.dtype)


def test_video_layout_follows_transformers_rope_index(tiny, family):
    """Timestamps stay text; every frame is its own grid in ``get_rope_index`` and in the adapter's grids."""
    lvlm = tiny(family)
    inputs = collated(lvlm, video_batch(lvlm))
    types = inputs["mm_token_type_ids"]
    assert (types == 2).sum(1).tolist() == [3 * 6, 2 * 6] and (types == 1).sum(1).tolist() == [0, 6]
    # sample 0: three 2x3 frames; sample 1: a 2x3 image (48x40 -> 48x32 pixels), then two 3x2 frames
    assert lvlm.adapter.image_grids(inputs) == [(1, 2, 3)] * 4 + [(1, 3, 2)] * 2
    pos = lvlm.adapter.position_ids(inputs)
    ref, _ = lvlm.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=types,
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    assert torch.equal(pos, ref)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_video_no_drop_matches_transformers(tiny, attn, family):
    lvlm = tiny(family, attn)
    inputs = collated(lvlm, video_batch(lvlm))
    assert (inputs["attention_mask"] == 0).any()
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=5, stop_at_eos=False)
    with torch.no_grad():
        ref_tokens = lvlm.model.generate(**inputs, max_new_tokens=5, do_sample=False)
        ref_logits = lvlm.model(**inputs).logits[:, -1].float()
    assert out.generated_ids == ref_tokens[:, inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)


def test_video_v2drop_equals_transformers_with_dropped_keys_masked_and_batches_as_alone(tiny, family):
    lvlm, eager = tiny(family), tiny(family, "eager")
    samples = video_batch(lvlm)
    inputs = collated(lvlm, samples)
    method = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.5, 0.5]))
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=4, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, method.schedule, 4)
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens
    for i, sample in enumerate(samples):
        alone = lvlm.generate_from_inputs(collated(lvlm, [sample]), method, max_new_tokens=4, stop_at_eos=False)
        assert alone.traces[0].stages == out.traces[i].stages
        assert alone.generated_ids[0] == out.generated_ids[i]


@pytest.mark.slow
def test_real_video_generation_equals_transformers_on_the_reference_inputs(family):
    """An 8-frame clip at 2 fps (560 video tokens after 4 timestamps) beside a 6-frame one: no drop equals
    transformers' ``generate``; V2Drop equals the masked eager model and each sample alone."""
    lvlm, eager = real(family), real(family, "eager")
    prompts = [VIDEO_PROMPT, VIDEO_PROMPT.replace("how many ?", "what is the digit ?")]
    clips = [Clip(video_frames(1, 8, 448, 320), {"total_num_frames": 8, "fps": 2.0}), video_frames(2, 6, 320, 448)]
    inputs = lvlm.prepare(prompts, videos=[[c] for c in clips])
    ref = reference_processor(lvlm)
    for i, clip in enumerate(clips):
        alone = ref(
            text=prompts[i],
            videos=[clip.frames if isinstance(clip, Clip) else clip],
            video_metadata=[clip.metadata] if isinstance(clip, Clip) else None,
            return_tensors="pt",
        )
        assert torch.equal(alone["input_ids"][0], inputs["input_ids"][i][inputs["attention_mask"][i].bool()])
    assert lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist() == [4 * 140, 2 * 140]
    out = lvlm.generate_from_inputs(inputs, None, max_new_tokens=3, stop_at_eos=False)
    with torch.no_grad():
        expected = lvlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        logits = lvlm.model(**inputs).logits[:, -1].float()
    assert out.generated_ids == expected[:, inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(out.first_logits, logits, atol=1e-5, rtol=0)
    method = Method("v2drop", schedule=Schedule.progressive([1, 2], [0.25, 0.5]))
    dropped = lvlm.generate_from_inputs(inputs, method, max_new_tokens=3, stop_at_eos=False)
    ref_logits, ref_tokens, ref_kept = masked_transformers_generate(eager, inputs, method.schedule, 3)
    assert [[s["kept"] for s in t.stages] for t in dropped.traces] == ref_kept
    torch.testing.assert_close(dropped.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert dropped.generated_ids == ref_tokens
    for i in range(2):
        alone = lvlm.generate([prompts[i]], videos=[[clips[i]]], method=method, max_new_tokens=3, stop_at_eos=False)
        assert alone.traces[0].stages == dropped.traces[i].stages
        assert alone.generated_ids[0] == dropped.generated_ids[i]


@pytest.mark.integration
def test_real_checkpoint_round_trip_loads_the_stand_in(tmp_path, family):
    """A saved real-geometry checkpoint loads through ``v2drop.load`` with the stand-in (torchvision is not installed
    here), its video settings kept, and gives the same prompts and tokens for an image and a video."""
    lvlm = real(family)
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load(str(tmp_path))
    assert type(again.processor).__name__ == "Qwen3ProcessorLite"
    for key in ("video_size", "do_sample_frames", "fps", "num_frames", "min_frames", "max_frames"):
        assert getattr(again.processor, key) == getattr(lvlm.processor, key), key
    image_prompt, clip = [prompt_for(lvlm, "how many ?")], Clip(video_frames(0, 4, 320, 224), {"total_num_frames": 4})
    for kwargs in ({"images": [photo(0, 640, 480)]}, {"videos": [[clip]]}):
        prompts = image_prompt if "images" in kwargs else [VIDEO_PROMPT]
        a = lvlm.generate(prompts, max_new_tokens=3, stop_at_eos=False, **kwargs)
        b = again.generate(prompts, max_new_tokens=3, stop_at_eos=False, **kwargs)
        assert a.prompt_ids == b.prompt_ids and a.generated_ids == b.generated_ids


def test_a_vision_cache_gives_the_same_deepstack_results(tiny, family):
    """With the embeddings served by a vision cache, the DeepStack additions still come (a new vision pass)."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    method = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.5, 0.5]))
    plain = lvlm.generate_from_inputs(lvlm.prepare(prompts, images), method, 4)
    cache = VisionCache()
    with cache.attached(lvlm):
        for _ in range(2):
            out = lvlm.generate_from_inputs(lvlm.prepare(prompts, images), method, 4)
            assert torch.equal(out.first_logits, plain.first_logits)
            assert [t.stages for t in out.traces] == [t.stages for t in plain.traces]
    assert cache.hits == 2 and cache.misses == 2  # the second round's prepare and embed came from the cache


def test_moe_experts_route_only_the_tokens_still_present(tiny):
    """Every MoE decoder MLP is a top-2 of 4 routed block; in prefill its router sees every prompt position without
    dropping, and after a V2Drop stage only the batch compacted to the longest sample's kept tokens, so dropped tokens
    take no expert compute."""
    lvlm = tiny("qwen3_vl_moe")
    layers = lvlm.model.model.language_model.layers
    assert all(type(layer.mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock" for layer in layers)
    assert {(layer.mlp.gate.top_k, layer.mlp.gate.num_experts) for layer in layers} == {(2, 4)}
    inputs = lvlm.prepare(*batch_for(lvlm, 3, "qwen3_vl_moe"))
    batch, length = inputs["input_ids"].shape
    for drop in (False, True):
        method = Method("v2drop", schedule=Schedule.progressive([2], [0.5])) if drop else Method.none()
        rows: dict[int, int] = {}  # layer -> rows its router saw in prefill (its first call)

        def record(i, rows=rows):
            return lambda module, args, out: rows.setdefault(i, args[0].shape[0]) and None

        hooks = [layer.mlp.gate.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
        try:
            out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1)
        finally:
            for hook in hooks:
                hook.remove()
        if not drop:
            assert rows == {i: batch * length for i in range(len(layers))}
            continue
        vision = lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist()
        present = [
            int(n) - v + len(t.stages[0]["kept"])
            for n, v, t in zip(inputs["attention_mask"].sum(1), vision, out.traces)
        ]
        assert max(present) < length
        assert rows == {i: batch * (length if i < 2 else max(present)) for i in range(len(layers))}
