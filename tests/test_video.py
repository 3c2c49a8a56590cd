"""Video inputs (Qwen2-VL / Qwen2.5-VL grids, LLaVA-OneVision frames): exact without dropping, traced with it."""

import numpy as np
import pytest
import torch

from v2drop import Method, Schedule
from v2drop.models.frames import Clip
from v2drop.models.qwen2vl_processor import QwenProcessorLite
from v2drop.testing import build_real, photo, prompt_for, video_frames


def qwen_video_inputs(lvlm, frames=4, side=8):
    """Raw Qwen video inputs: ``frames`` frames of side x side patches (temporal patch 2, merge 2)."""
    tok = lvlm.tokenizer
    torch.manual_seed(0)
    grid = torch.tensor([[frames // 2, side, side]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 8 * 8)
    n = int(grid.prod()) // 4
    text = "USER: <|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>\nhow many ? ASSISTANT:"
    ids = tok(text, return_tensors="pt")["input_ids"]
    types = (ids == tok.convert_tokens_to_ids("<|video_pad|>")).int() * 2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": types,
        "pixel_values_videos": pixels,
        "video_grid_thw": grid,
    }


def onevision_video_inputs(lvlm, frames=4):
    tok = lvlm.tokenizer
    torch.manual_seed(0)
    pixels = torch.randn(1, frames, 3, 32, 32)
    with torch.no_grad():
        n = lvlm.model.model.get_video_features(pixel_values_videos=pixels).pooler_output.reshape(-1, 64).shape[0]
    text = "USER: " + "<video>" * n + "\nhow many ? ASSISTANT:"
    ids = tok(text, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_video_no_drop_exact_and_drop_traced(tiny, family):
    lvlm = tiny(family)
    inputs = onevision_video_inputs(lvlm) if family == "llava_onevision" else qwen_video_inputs(lvlm)
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=4, stop_at_eos=False)
    with torch.no_grad():
        ref = lvlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits = lvlm.model(**inputs).logits[:, -1].float()
    assert out.generated_ids == ref[:, inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(out.first_logits, logits, atol=1e-5, rtol=0)

    n_video = int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())
    schedule = Schedule.progressive([1, 3], [0.5, 0.5])
    dropped = lvlm.generate_from_inputs(
        inputs, Method("uniform", schedule=schedule), max_new_tokens=4, stop_at_eos=False
    )
    assert dropped.traces[0].vision_tokens_per_layer == schedule.tokens_per_layer(lvlm.depth, n_video)
    if family != "llava_onevision":
        # Qwen grids are known: uniform keeps an even share of every frame.
        frames = lvlm.adapter.vision_coords(inputs, lvlm.adapter.vision_mask(inputs["input_ids"]))[0, :, 0]
        kept = torch.tensor(dropped.traces[0].stages[0]["kept"])
        per_frame = torch.bincount(frames[kept], minlength=2)
        assert per_frame.tolist() == [n_video // 4, n_video // 4]


# -- videos through the processors (PIL/numpy, no torchvision), batched -------------------------------
def video_prompt(lvlm, question="how many ?"):
    token = "<|vision_start|><|video_pad|><|vision_end|>" if lvlm.image_token == "<|image_pad|>" else "<video>"
    return "USER: " + token + "\n" + question + " ASSISTANT:"


def test_qwen_video_patches_follow_the_processor_layout(tiny):
    """Two identical frames flatten exactly as the image processor flattens the frame (which repeats it in time)."""
    proc = tiny("qwen2_vl").processor
    frame = photo(0, 56, 40)
    video = proc.video_inputs([[frame, frame]])
    ref = proc.image_processor(images=[frame], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(video["pixel_values_videos"], ref["pixel_values"], atol=1e-6, rtol=0)
    # an odd frame count is padded to the temporal patch by repeating the last frame
    assert proc.video_inputs([[frame] * 3])["video_grid_thw"][0, 0].item() == 2
    # a (frames, H, W, 3) uint8 array is the same video as its list of frames
    array = np.stack([np.asarray(frame)] * 2)
    torch.testing.assert_close(
        proc.video_inputs(array)["pixel_values_videos"], video["pixel_values_videos"], atol=0, rtol=0
    )
    with pytest.raises(ValueError, match="Video 0 is not a list of frames"):
        proc.video_inputs([["not a frame"]])


def test_qwen_video_sampling_settings_are_saved_and_used(tiny, tmp_path):
    """A checkpoint's video sampling settings (``fps`` frames a second) load back and apply to clips with metadata."""
    lvlm = tiny("qwen2_5_vl")
    lite, prompt = lvlm.processor, video_prompt(lvlm)
    proc = QwenProcessorLite(lite.image_processor, lite.tokenizer, second_per_grid=True, do_sample_frames=True, fps=2.0)
    proc.save_pretrained(tmp_path)
    again = QwenProcessorLite.from_pretrained(tmp_path, second_per_grid=True)
    assert (again.do_sample_frames, again.fps, again.num_frames) == (True, 2.0, None)
    clip = Clip(video_frames(1, 24, 32, 32), {"total_num_frames": 24, "fps": 12.0})
    sampled = again(prompt, videos=[clip])
    # 24 frames at 12 fps sampled at 2 fps: 4 frames (2 grid steps) of 2 fps, 2 / 2 = 1 s a grid step
    assert sampled["video_grid_thw"][0, 0].item() == 2 and sampled["second_per_grid_ts"].tolist() == [1.0]
    # not sampled: all 24 frames (12 grid steps) at the clip's 12 fps
    whole = lite(prompt, videos=[clip])
    assert whole["video_grid_thw"][0, 0].item() == 12
    assert whole["second_per_grid_ts"].tolist() == torch.tensor([2 / 12]).tolist()
    with pytest.raises(ValueError, match="no metadata with its frame rate"):
        again(prompt, videos=[clip.frames])
    with pytest.raises(ValueError, match="Received 1 videos but 2 video_metadata entries"):
        lite(prompt, videos=[clip.frames], video_metadata=[None, None])
    with pytest.raises(ValueError, match="The metadata of video 0 has no total_num_frames"):
        lite(prompt, videos=[Clip(clip.frames, {"fps": 12.0})])


@pytest.mark.parametrize("dropping", [False, True], ids=["none", "v2drop"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_videos_of_different_lengths_and_sizes_batch_as_alone(tiny, family, dropping):
    lvlm = tiny(family)
    method = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.5, 0.25])) if dropping else Method.none()
    prompts = [
        video_prompt(lvlm),
        video_prompt(lvlm, "what is the colour of the digit ?"),
        prompt_for(lvlm, "how many ?"),
    ]
    videos = [video_frames(1, 4, 32, 32), video_frames(2, 6, 48, 40), None]
    images = [None, None, photo(3, 40, 48)]
    inputs = lvlm.prepare(prompts, images, videos)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4], [3, 4, 6]]  # 6 frames of 48x40 -> 3 x (32x48)/8
    assert ("second_per_grid_ts" in inputs) == (family == "qwen2_5_vl")
    batch = lvlm.generate_from_inputs(inputs, method, max_new_tokens=4, stop_at_eos=False)
    for i in range(3):
        alone = lvlm.generate(
            [prompts[i]], [images[i]], [videos[i]], method=method, max_new_tokens=4, stop_at_eos=False
        )
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
    if not dropping:
        with torch.no_grad():
            ref = lvlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert batch.generated_ids == ref[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("dropping", [False, True], ids=["none", "v2drop"])
def test_onevision_videos_of_different_sizes_batch_as_alone(dropping):
    lvlm = real_onevision()
    method = Method.from_preset("v2drop-llava15-128", depth=lvlm.depth) if dropping else None
    prompts = [video_prompt(lvlm), video_prompt(lvlm, "what is the colour of the digit ?")]
    videos = [video_frames(1, 4, 640, 480), video_frames(2, 4, 320, 200)]
    inputs = lvlm.prepare(prompts, videos=videos)
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, 384, 384)
    assert (
        lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist() == [4 * 196 + 1] * 2
    )  # 27x27 patches pooled to 14x14, + newline
    batch = lvlm.generate_from_inputs(inputs, method, max_new_tokens=3, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate([prompts[i]], videos=[videos[i]], method=method, max_new_tokens=3, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
    if not dropping:
        with torch.no_grad():
            ref = lvlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert batch.generated_ids == ref[:, inputs["input_ids"].shape[1] :].tolist()


def test_onevision_video_beside_an_image_sample_batches_as_alone():
    lvlm = real_onevision()
    method = Method.from_preset("v2drop-llava15-128", depth=lvlm.depth)
    prompts = [video_prompt(lvlm), prompt_for(lvlm, "what is the colour of the digit ?")]
    videos, images = [video_frames(1, 4, 320, 240), None], [None, photo(3, 640, 480)]
    batch = lvlm.generate(prompts, images, videos, method=method, max_new_tokens=3, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate(
            [prompts[i]], [images[i]], [videos[i]], method=method, max_new_tokens=3, stop_at_eos=False
        )
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
    assert [t.vision_tokens_per_layer[0] for t in batch.traces] == [4 * 196 + 1, 2929]


@pytest.mark.parametrize("dropping", [False, True], ids=["none", "v2drop"])
def test_onevision_videos_of_different_frame_counts_batch_as_alone(dropping):
    """Clips of 4 and 2 frames: padded in frames, each clip through the tower at its own length."""
    lvlm = real_onevision()
    method = Method.from_preset("v2drop-llava15-128", depth=lvlm.depth) if dropping else None
    prompts = [video_prompt(lvlm), video_prompt(lvlm, "what is the colour of the digit ?")]
    videos = [video_frames(1, 4, 64, 64), video_frames(2, 2, 64, 64)]
    inputs = lvlm.prepare(prompts, videos=videos)
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, 384, 384) and inputs["video_frames"].tolist() == [4, 2]
    assert not inputs["pixel_values_videos"][1, 2:].any()  # zero frames, never seen by the tower
    assert lvlm.adapter.vision_mask(inputs["input_ids"]).sum(1).tolist() == [4 * 196 + 1, 2 * 196 + 1]
    batch = lvlm.generate_from_inputs(inputs, method, max_new_tokens=3, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate([prompts[i]], videos=[videos[i]], method=method, max_new_tokens=3, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
        assert torch.allclose(alone.first_logits[0], batch.first_logits[i], atol=1e-4)


def test_video_frames_of_different_sizes_do_not_batch():
    from v2drop.lvlm import _collate

    samples = [
        {
            "input_ids": torch.ones(1, 3, dtype=torch.long),
            "attention_mask": torch.ones(1, 3, dtype=torch.long),
            "pixel_values_videos": torch.zeros(1, n, 3, side, side),
        }
        for n, side in ((4, 32), (2, 16))
    ]
    with pytest.raises(
        ValueError, match=r"Cannot batch video frames of different sizes.*\(4, 3, 32, 32\), \(2, 3, 16, 16\)"
    ):
        _collate(samples, 0, "cpu", torch.float32)


_ONEVISION: list = []


def real_onevision():
    """The realistic-geometry OneVision (SigLIP 384px/14, 729 patches a frame), built once."""
    if not _ONEVISION:
        _ONEVISION.append(build_real("llava_onevision"))
    return _ONEVISION[0]
