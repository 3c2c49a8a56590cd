"""Real-benchmark video clips: ``decode_video`` gives a ``Clip`` whose metadata (frame rate, sampled source frames)
sets Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's timestamps as the real processors compute them."""

import pytest
import torch

from v2drop.benchmarks.media import MediaRef, decode_video, video_clip
from v2drop.models.frames import Clip, presampled
from v2drop.testing import build_real, reference_processor, video_frames

PROMPT = "USER: <|vision_start|><|video_pad|><|vision_end|>\nhow many ? ASSISTANT:"
_REAL: dict = {}


def real(family: str):
    """A cached real-geometry tiny model."""
    if family not in _REAL:
        _REAL[family] = build_real(family)
    return _REAL[family]


def sampled_clip(height: int = 320, frames: int = 8, window: int = 240, fps: float = 30.0, first: int = 60) -> Clip:
    """``frames`` frames of 448 x ``height`` picked uniformly from a window of ``window`` source frames starting at
    ``first``, as ``decode_video`` picks and labels them (sizes the processor keeps, so pixels compare exactly)."""
    indices = [first + round(i * (window - 1) / (frames - 1)) for i in range(frames)]
    return video_clip(video_frames(3, frames, 448, height), indices, window, first + window + 30, fps)


def test_video_clip_metadata_is_the_source_window():
    clip = sampled_clip()
    assert len(clip) == 8 and list(clip) == list(clip.frames) and clip[0] is clip.frames[0]  # a sequence of frames
    meta = clip.metadata
    assert meta["fps"] == 30.0 and meta["total_num_frames"] == 240 and meta["frames_indices"][0] == 60
    assert meta["duration"] == pytest.approx(330 / 30.0) and (meta["width"], meta["height"]) == (448, 320)
    assert presampled(meta, len(clip))
    assert not presampled({"total_num_frames": 8, "fps": 2.0}, 8)  # a whole video: the processor may sample it
    assert not presampled(None, 8)
    with pytest.raises(ValueError, match="one index per frame"):
        video_clip(clip.frames, [0, 1], 240, 300, 30.0)


def test_qwen2_5_vl_seconds_per_grid_come_from_the_clip():
    """8 of 240 frames at 30 fps: sampled at 1 frame a second, so 2 s a grid step (not 2 / 24 without metadata)."""
    lvlm = real("qwen2_5_vl")
    clip = sampled_clip(height=336)  # Qwen2.5-VL: sides multiples of 28
    expected = reference_processor(lvlm)(
        text=PROMPT, videos=[list(clip)], video_metadata=[clip.metadata], return_tensors="pt"
    )
    ours = lvlm.prepare([PROMPT], videos=[clip])
    assert expected["second_per_grid_ts"].tolist() == [2.0]
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    bare = lvlm.prepare([PROMPT], videos=[list(clip)])
    assert bare["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])


def test_qwen3_vl_timestamps_come_from_the_clip_which_is_not_sampled_again():
    """Qwen3-VL samples 2 frames a second by default; a clip sampled already keeps its 8 frames and their times
    (what transformers' processor gives with ``do_sample_frames=False``; sampling it again would fail there)."""
    lvlm = real("qwen3_vl")
    clip = sampled_clip()
    ref = reference_processor(lvlm)
    expected = ref(
        text=PROMPT, videos=[list(clip)], video_metadata=[clip.metadata], do_sample_frames=False, return_tensors="pt"
    )
    ours = lvlm.prepare([PROMPT], videos=[clip])
    assert sorted(ours) == sorted(expected)
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    assert int(ours["video_grid_thw"][0, 0]) == 4  # 8 frames, 2 a temporal patch
    text = lvlm.tokenizer.decode(ours["input_ids"][0])
    # each temporal patch's time: the mean of its two frames' source times (frame 60 is second 2.0)
    seconds = [
        (a + b) / 2 / 30.0 for a, b in zip(clip.metadata["frames_indices"][::2], clip.metadata["frames_indices"][1::2])
    ]
    assert seconds[0] == pytest.approx((60 + 94) / 2 / 30)
    assert [f"{s:.1f}" for s in seconds] == ["2.6", "4.8", "7.1", "9.4"]
    for s in seconds:  # the tiny tokenizer reads "<2.6 seconds>" as <unk> 2 . 6 <unk>
        assert f"<unk>{s:.1f}<unk>" in text.replace(" ", "")


def test_decode_video_without_pyav_is_a_clear_error(tmp_path):
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs PyAV"):
            decode_video(tmp_path / "clip.mp4", 4)
    else:
        pytest.skip("PyAV is installed")


def test_decode_video_reads_a_synthetic_video(tmp_path):
    """A 10 fps, 40-frame video whose frame i has brightness 6 * i: the picked frames are the named ones, and the
    clip (through ``MediaRef``) carries their indices and the frame rate."""
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 6 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    clip = decode_video(path, 4, bounds=(1.0, 3.0))
    assert clip.metadata["fps"] == 10.0 and clip.metadata["frames_indices"] == [10, 17, 23, 30]
    assert clip.metadata["total_num_frames"] == 21  # frames 10..30
    for index, frame in zip(clip.metadata["frames_indices"], clip):
        assert abs(float(np.asarray(frame).mean()) - 6 * index) < 4
    ref = MediaRef("video", str(path), 4, (1.0, 3.0), max_side=32)
    decoded = ref.decode()
    assert isinstance(decoded, Clip) and decoded.metadata == clip.metadata and max(decoded[0].size) == 32
