"""Real token counts (the real checkpoints' preprocessing, tiny weights): any mix of image sizes batches,
collated as the family's own processor pads it, and every sample gets exactly its alone result."""

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from v2drop import Method
from v2drop.testing import FAMILIES, build_real, photo, prompt_for, video_frames

_REAL: dict = {}
# (width, height) of the two images of each family's mixed batch: different crop counts / grids
SIZES = {
    "llava": [(1000, 700), (640, 480)],
    "llava_next": [(1000, 700), (1000, 300)],
    "llava_onevision": [(1300, 900), (640, 480)],
    "qwen2_vl": [(1000, 700), (640, 480)],
    "qwen2_5_vl": [(1000, 700), (640, 480)],
}
QUESTIONS = ["how many ?", "what is the colour of the digit in row 2 column 3 ?"]
SLOW = {"llava_onevision"}  # 7,295 + 2,929 vision tokens: ~10 s a test on CPU


def real(family: str):
    """A cached realistic-geometry tiny model."""
    if family not in _REAL:
        _REAL[family] = build_real(family)
    return _REAL[family]


def batch_params():
    """(family, dropping) rows; OneVision's and the no-drop rows (which also run transformers' generate) are slow."""
    return [
        pytest.param(f, d, marks=pytest.mark.slow, id=f"{f}-{'v2drop' if d else 'none'}")
        if f in SLOW or not d
        else pytest.param(f, d, id=f"{f}-v2drop")
        for f in FAMILIES
        for d in (False, True)
    ]


def mixed_batch(lvlm, family):
    prompts = [prompt_for(lvlm, q) for q in QUESTIONS]
    images = [photo(i, w, h) for i, (w, h) in enumerate(SIZES[family])]
    return prompts, images


@pytest.mark.parametrize(
    "family, size, tokens, crops",
    [
        ("llava", (1000, 700), 576, None),
        ("llava_next", (1000, 700), 2242, 5),
        ("llava_next", (1000, 300), 2182, 4),
        ("llava_onevision", (1300, 900), 7295, 13),
        ("llava_onevision", (640, 480), 2929, 5),
        ("qwen2_vl", (1000, 700), 900, None),
        ("qwen2_5_vl", (640, 480), 391, None),
    ],
)
def test_real_token_counts(family, size, tokens, crops):
    lvlm = real(family)
    inputs = lvlm.prepare([prompt_for(lvlm, "how many ?")], [photo(0, *size)])
    assert int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum()) == tokens
    if crops is not None:
        assert inputs["pixel_values"].shape[:2] == (1, crops)
    if family.startswith("qwen"):
        # an independent count: the image processor's own patch arithmetic, merged 2x2
        patches = Qwen2VLImageProcessorPil(
            min_pixels=3136, max_pixels=12845056, patch_size=14
        ).get_number_of_image_patches(size[1], size[0])
        assert patches // 4 == tokens


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_collation_matches_the_processors_own_batch(family):
    """Samples processed alone then collated carry the same vision inputs as the image processor run on the whole
    batch."""
    lvlm = real(family)
    prompts, images = mixed_batch(lvlm, family)
    inputs = lvlm.prepare(prompts, images)
    alone = [lvlm.prepare([p], [i]) for p, i in zip(prompts, images)]
    if family == "llava_next":
        # transformers' own LlavaNextProcessor, fed both prompts at once, left-padded
        side, lvlm.processor.tokenizer.padding_side = lvlm.processor.tokenizer.padding_side, "left"
        try:
            ref = lvlm.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        finally:
            lvlm.processor.tokenizer.padding_side = side
        assert torch.equal(inputs["input_ids"], ref["input_ids"]) and torch.equal(
            inputs["attention_mask"], ref["attention_mask"]
        )
    else:
        ref = lvlm.processor.image_processor(images=images, return_tensors="pt")
    for key in ref:
        if key.startswith("pixel") or key in ("image_sizes", "image_grid_thw", "batch_num_images"):
            torch.testing.assert_close(inputs[key], ref[key], atol=0, rtol=0, msg=key)
    if "image_sizes" in inputs:
        assert [a["pixel_values"].shape[1] for a in alone] != [inputs["pixel_values"].shape[1]] * 2, (
            "crop counts should differ"
        )
    assert (inputs["attention_mask"] == 0).any(), "the batch should exercise token padding"


@pytest.mark.parametrize("family, dropping", batch_params())
def test_mixed_sizes_batch_equals_alone(family, dropping):
    lvlm = real(family)
    method = Method.from_preset("v2drop-llava15-128", depth=lvlm.depth) if dropping else None
    prompts, images = mixed_batch(lvlm, family)
    inputs = lvlm.prepare(prompts, images)
    assert (inputs["attention_mask"] == 0).any(), "the batch should exercise token padding"
    batch = lvlm.generate_from_inputs(inputs, method, max_new_tokens=3, stop_at_eos=False)
    for i in range(len(prompts)):
        alone = lvlm.generate([prompts[i]], [images[i]], method=method, max_new_tokens=3, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
        assert alone.traces[0].vision_tokens_per_layer == batch.traces[i].vision_tokens_per_layer
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)
    if dropping:
        assert all(t.stages and len(t.stages[-1]["kept"]) < t.vision_tokens_per_layer[0] for t in batch.traces)
    elif family not in SLOW:  # transformers' generate materialises a 10k x 10k mask per head for OneVision's batch
        with torch.no_grad():
            ref = lvlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert batch.generated_ids == ref[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_real_size_videos_batch_as_alone(family):
    """Clips of different lengths and frame sizes at real resolution (thousands of video tokens), under V2Drop."""
    lvlm = real(family)
    method = Method.from_preset("v2drop-llava15-128", depth=lvlm.depth)
    token = "<|vision_start|><|video_pad|><|vision_end|>"
    prompts = [f"USER: {token}\n{q} ASSISTANT:" for q in QUESTIONS]
    videos = [video_frames(1, 8, 640, 480), video_frames(2, 5, 320, 240)]
    inputs = lvlm.prepare(prompts, videos=videos)
    assert inputs["video_grid_thw"].tolist() == [
        [4, 34, 46],
        [3, 18, 22],
    ]  # 640x480 -> 644x476, 320x240 -> 308x252 (multiples of 28)
    assert lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist() == [4 * 17 * 23, 3 * 9 * 11]
    batch = lvlm.generate_from_inputs(inputs, method, max_new_tokens=3, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate([prompts[i]], videos=[videos[i]], method=method, max_new_tokens=3, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW | {"llava_next"} else f for f in FAMILIES]
)
def test_multi_image_and_single_image_samples_batch_as_alone(family):
    """A two-image prompt (OneVision: not tiled, ``batch_num_images`` 2) beside a one-image prompt, under V2Drop."""
    lvlm = real(family)
    method = Method.from_preset("v2drop-llava15-128", depth=lvlm.depth)
    prompts = [prompt_for(lvlm, "how many ?", n_images=2), prompt_for(lvlm, QUESTIONS[1])]
    images = [[photo(0, 640, 480), photo(1, 300, 400)], [photo(2, 800, 600)]]
    inputs = lvlm.prepare(prompts, images)
    if family == "llava_onevision":
        assert inputs["batch_num_images"].tolist() == [2, 1]
        assert lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist()[0] == 2 * 730  # 27x27 + newline, untiled
    batch = lvlm.generate_from_inputs(inputs, method, max_new_tokens=3, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate([prompts[i]], [images[i]], method=method, max_new_tokens=3, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
