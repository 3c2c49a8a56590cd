"""Real token counts (the real checkpoints' preprocessing, tiny weights): any mix of image sizes batches,
collated as the family's own processor pads it, and every sample gets exactly its alone result."""

import pytest
import torch
from reference_helpers import reference_generate
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from v2drop import Method
from v2drop.models.frames import Clip
from v2drop.testing import FAMILIES, build_real, photo, prompt_for, reference_processor, video_frames

_REAL: dict = {}
# (width, height) of the two images of each family's mixed batch: different crop counts / grids
SIZES = {
    "llava": [(1000, 700), (640, 480)],
    "llava_next": [(1000, 700), (1000, 300)],
    "llava_onevision": [(1300, 900), (640, 480)],
    "qwen2_vl": [(1000, 700), (640, 480)],
    "qwen2_5_vl": [(1000, 700), (640, 480)],
    "qwen3_vl": [(1000, 700), (640, 480)],
    "internvl": [(1000, 700), (300, 300)],  # 6 tiles + thumbnail beside one tile
    "gemma3": [(1000, 700), (640, 480)],  # 256 tokens each (pan-and-scan is off unless asked: tests/test_gemma3.py)
    "qwen3_vl_moe": [(1000, 700), (640, 480)],
}
QUESTIONS = ["how many ?", "what is the colour of the digit in row 2 column 3 ?"]
QWEN3_PIXELS = dict(min_pixels=65536, max_pixels=16777216, patch_size=16)  # Qwen3-VL-8B's and Qwen3-VL-30B-A3B's
QWEN_PIXELS = {"qwen3_vl": QWEN3_PIXELS, "qwen3_vl_moe": QWEN3_PIXELS}
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
        ("qwen3_vl", (1000, 700), 682, None),  # 704x992 in 16-pixel patches, merged 2x2
        ("qwen3_vl", (200, 150), 70, None),  # enlarged to 320x224, over min_pixels 65536
        ("qwen3_vl_moe", (1000, 700), 682, None),  # the same vision geometry as Qwen3-VL-8B
        ("internvl", (1000, 700), 7 * 256, None),  # 3x2 tiles of 448 + thumbnail, 256 tokens each
        ("internvl", (2000, 1500), 13 * 256, None),  # 4x3 tiles (the most: 12) + thumbnail
        ("internvl", (300, 300), 256, None),  # one tile, no thumbnail
        ("gemma3", (1000, 700), 256, None),  # resized to 896x896, 64x64 patches pooled 4x4
        ("gemma3", (200, 1500), 256, None),  # any shape: no pan-and-scan unless asked at call time
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
        bounds = QWEN_PIXELS.get(family, dict(min_pixels=3136, max_pixels=12845056, patch_size=14))
        patches = Qwen2VLImageProcessorPil(**bounds).get_number_of_image_patches(size[1], size[0])
        assert patches // 4 == tokens
    if family == "internvl":
        # an independent count: the image processor's own tile arithmetic, 256 tokens a tile
        tiles = lvlm.processor.image_processor.get_number_of_image_patches(size[1], size[0], {})
        assert inputs["pixel_values"].shape == (tiles, 3, 448, 448) and 256 * tiles == tokens
    if family == "gemma3":
        # an independent count: the tower's patch grid, average-pooled to mm_tokens_per_image
        vision = lvlm.model.config.vision_config
        assert (
            inputs["pixel_values"].shape == (1, 3, 896, 896) and (vision.image_size // vision.patch_size) ** 2 == 4096
        )
        assert lvlm.model.config.mm_tokens_per_image == tokens


@pytest.mark.parametrize(
    "family",
    ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "qwen3_vl_moe"],
)
def test_collation_matches_the_processors_own_batch(family):
    """Samples processed alone then collated carry the vision inputs of the image processor run on the whole batch."""
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
    "family",
    [pytest.param(f, marks=pytest.mark.slow) if f in SLOW | {"llava_next", "internvl"} else f for f in FAMILIES],
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


# -- videos: every processor output equals transformers' own processor's --------------------------------------------
VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]
# case -> (videos as (seed, frames, width, height), video_metadata, sampling kwargs). Qwen frames have sides that are
# multiples of 28 and OneVision's are 384x384, so no frame is resized (resizing is torchvision's) and pixels are exact.
VIDEO_CASES = {
    "no-metadata": ([(1, 8, 448, 336)], None, {}),
    "fps": ([(1, 8, 448, 336)], [{"total_num_frames": 8, "fps": 2.0}], {}),
    "frames-indices": (
        [(1, 8, 448, 336)],
        [{"total_num_frames": 64, "fps": 30.0, "frames_indices": [*range(0, 64, 8)]}],
        {},
    ),
    "sample-fps": ([(2, 24, 448, 336)], [{"total_num_frames": 24, "fps": 12.0}], {"do_sample_frames": True, "fps": 2}),
    "sample-num-frames": ([(2, 12, 448, 336)], None, {"do_sample_frames": True, "num_frames": 5}),
    "two-videos": (
        [(1, 5, 448, 336), (3, 5, 280, 560)],
        [{"total_num_frames": 5}, {"total_num_frames": 5, "fps": 1.0}],
        {},
    ),
}
# Qwen2.5-VL's second_per_grid_ts for each case: temporal_patch_size (2) / VideoMetadata.sampled_fps, where
# sampled_fps = len(frames_indices) / total_num_frames * fps, or fps, or 24 without a frame rate
# (transformers.video_utils.VideoMetadata.sampled_fps, Qwen2_5_VLProcessor._process_videos)
SECONDS_PER_GRID = {
    "no-metadata": [2 / 24],
    "fps": [2 / 2.0],
    "frames-indices": [2 / (8 / 64 * 30.0)],
    "sample-fps": [2 / (4 / 24 * 12.0)],  # Qwen2VLVideoProcessor.sample_frames: 24 / 12 * 2 = 4 frames of 24
    "sample-num-frames": [2 / 24],  # sampled frames without a frame rate: 24
    "two-videos": [2 / 24, 2 / 1.0],
}
# frames kept by sampling: Qwen2VLVideoProcessor.sample_frames rounds to the temporal patch (5 -> 4) and takes
# 24 / 12 fps * 2 fps = 4 frames; BaseVideoProcessor.sample_frames (default_sample_indices_fn) takes 5 and 4
SAMPLED_FRAMES = {
    "sample-fps": {"qwen": 4, "llava_onevision": 4},
    "sample-num-frames": {"qwen": 4, "llava_onevision": 5},
}


def video_prompt(lvlm, n_videos: int = 1, question: str = "how many ?") -> str:
    """A prompt with ``n_videos`` video placeholders in the family's format."""
    token = "<|vision_start|><|video_pad|><|vision_end|>" if lvlm.image_token == "<|image_pad|>" else "<video>"
    return "USER: " + token * n_videos + "\n" + question + " ASSISTANT:"


def case_videos(family: str, case: str):
    """The case's videos (OneVision's frames at its 384x384 video size) and metadata."""
    specs, metadata, kwargs = VIDEO_CASES[case]
    videos = [
        video_frames(seed, n, *((384, 384) if family == "llava_onevision" else (w, h))) for seed, n, w, h in specs
    ]
    return videos, metadata, kwargs


def assert_same_outputs(ours: dict, ref: dict) -> None:
    """The same keys, and every value the same tensor: dtype, shape and every element."""
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype, key
        assert ours[key].shape == ref[key].shape, key
        assert torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize("case", VIDEO_CASES)
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_processor_outputs_equal_the_reference(family, case):
    """The stand-in processor, given videos with metadata as an argument or as ``Clip``s (and ``LVLM.prepare`` given
    ``Clip``s), returns exactly the real processor's outputs: ids, token types, pixels, grids, seconds per grid."""
    lvlm = real(family)
    videos, metadata, kwargs = case_videos(family, case)
    prompt = video_prompt(lvlm, len(videos))
    given = {"video_metadata": metadata} if metadata is not None else {}
    ref = reference_processor(lvlm)(text=prompt, videos=videos, return_tensors="pt", **given, **kwargs)
    # a video whose metadata holds nothing but its length is the same as its bare frames
    clips = [
        v if m in (None, {"total_num_frames": len(v)}) else Clip(v, m)
        for v, m in zip(videos, metadata or [None] * len(videos))
    ]
    assert_same_outputs(lvlm.processor(prompt, videos=videos, **given, **kwargs), ref)
    assert_same_outputs(lvlm.processor(prompt, videos=clips, **kwargs), ref)
    if not kwargs:
        assert_same_outputs(lvlm.prepare([prompt], videos=[clips]), ref)
    if family == "qwen2_5_vl":
        torch.testing.assert_close(ref["second_per_grid_ts"], torch.tensor(SECONDS_PER_GRID[case]), atol=0, rtol=0)
    if case in SAMPLED_FRAMES:
        frames = ref["pixel_values_videos"].shape[1] if family == "llava_onevision" else 2 * ref["video_grid_thw"][0, 0]
        assert frames == SAMPLED_FRAMES[case][family if family == "llava_onevision" else "qwen"]


@pytest.mark.slow
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_generation_equals_transformers_on_the_reference_inputs(family):
    """An 8-frame clip with its frame rate: no-drop greedy tokens equal transformers' ``generate`` on the real
    processor's inputs, and V2Drop's kept sets and tokens equal the mask-based reference on those inputs."""
    lvlm = real(family)
    size = (384, 384) if family == "llava_onevision" else (448, 336)
    clip, metadata = video_frames(1, 8, *size), {"total_num_frames": 8, "fps": 2.0}
    prompt = video_prompt(lvlm)
    ref = dict(reference_processor(lvlm)(text=prompt, videos=[clip], video_metadata=[metadata], return_tensors="pt"))
    inputs = lvlm.prepare([prompt], videos=[Clip(clip, metadata)])
    assert_same_outputs(inputs, ref)
    if family == "qwen2_5_vl":  # the clip's frame rate moves the temporal positions (2 / 24 s a grid step without it)
        assert ref["second_per_grid_ts"].tolist() == [1.0]
        without = dict(inputs, second_per_grid_ts=torch.tensor([2 / 24]))
        assert not torch.equal(lvlm.adapter.position_ids(inputs), lvlm.adapter.position_ids(without))
    out = lvlm.generate_from_inputs(inputs, None, max_new_tokens=3, stop_at_eos=False)
    with torch.no_grad():
        expected = lvlm.model.generate(**ref, max_new_tokens=3, do_sample=False)
    assert out.generated_ids == expected[:, ref["input_ids"].shape[1] :].tolist()

    method = Method.from_preset("v2drop-llava15-128", depth=lvlm.depth)
    dropped = lvlm.generate_from_inputs(inputs, method, max_new_tokens=3, stop_at_eos=False)
    first_logits, tokens, kept = reference_generate(lvlm, ref, method.schedule, 3)
    assert [[s["kept"] for s in t.stages] for t in dropped.traces] == kept
    assert dropped.generated_ids == tokens
    torch.testing.assert_close(dropped.first_logits, first_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_image_and_video_prompt_outputs_equal_the_reference(family):
    """One prompt with an image and a video: token types 1 and 2, both grids, every key as the real processor's."""
    lvlm = real(family)
    prompt = prompt_for(lvlm, "how many ?").replace(" ASSISTANT:", "") + video_prompt(lvlm).removeprefix("USER: ")
    image, clip, metadata = photo(4, 640, 480), video_frames(5, 6, 336, 448), {"total_num_frames": 30, "fps": 5.0}
    ref = reference_processor(lvlm)
    expected = ref(text=prompt, images=[image], videos=[clip], video_metadata=[metadata], return_tensors="pt")
    ours = lvlm.processor(prompt, images=[image], videos=[Clip(clip, metadata)])
    assert_same_outputs(ours, expected)
    assert set(ours["mm_token_type_ids"].unique().tolist()) == {0, 1, 2}
