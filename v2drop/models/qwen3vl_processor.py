"""A Qwen3-VL processor stand-in for machines without torchvision (images and videos)."""

from __future__ import annotations

import numpy as np
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as clip_smart_resize
from transformers.video_utils import VideoMetadata

from v2drop.models.qwen2vl_processor import QwenProcessorLite, _expand

# Qwen3-VL-8B-Instruct's video_preprocessor_config.json: pixel bounds of a whole clip, 2 frames a second
VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


class Qwen3ProcessorLite(QwenProcessorLite):
    """Tokenizer + ``Qwen2VLImageProcessorPil`` + a PIL/numpy video path, as ``Qwen3VLProcessor`` lays prompts out.

    Images are Qwen2-VL's (patch 16, merge 2, mean and std 0.5 in the checkpoint's image processor).
    A video is laid out one temporal patch at a time: ``<t seconds>`` (text: the mean time of the
    patch's two frames, from ``frames_indices`` and the metadata's ``fps``, 24 without one), then
    ``<|vision_start|>``, that frame's ``<|video_pad|>`` tokens and ``<|vision_end|>``, as
    ``Qwen3VLProcessor.replace_video_token`` writes it. Frames are sampled as
    ``Qwen3VLVideoProcessor.sample_frames`` does (by default, ``fps`` 2 frames a second, at least
    ``min_frames``) and resized to the size Qwen3-VL's clip-level ``smart_resize`` gives (the pixel
    bounds hold for the whole clip; the per-frame cap of ``cap_pixels_per_frame`` is not applied, as
    transformers does not by default). Resizing is PIL bicubic, so a resized frame's pixel values
    differ slightly from torchvision's (not its shape or token count); frames that need no resizing
    equal the real processor's.
    """

    video_processor_type = "Qwen3VLVideoProcessor"

    def __init__(self, image_processor, tokenizer, chat_template=None, video_size=None, **sampling):
        sampling = {"do_sample_frames": True, "fps": 2, **sampling}
        super().__init__(image_processor, tokenizer, chat_template, video_size or VIDEO_SIZE, **sampling)

    @classmethod
    def from_pretrained(cls, path: str, second_per_grid: bool = False) -> Qwen3ProcessorLite:
        """The stand-in for a saved Qwen3-VL checkpoint (``second_per_grid`` is Qwen2.5-VL's and must stay False)."""
        if second_per_grid:
            raise ValueError("Qwen3-VL places frames by timestamps, not seconds per grid: leave second_per_grid False")
        return super().from_pretrained(path)

    def frame_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) of every frame: ``Qwen3VLVideoProcessor``'s ``smart_resize`` over the whole clip."""
        proc = self.image_processor
        return clip_smart_resize(
            frames,
            height,
            width,
            temporal_factor=proc.temporal_patch_size,
            factor=proc.patch_size * proc.merge_size,
            min_pixels=self.video_size["shortest_edge"],
            max_pixels=self.video_size["longest_edge"],
        )

    def sample_frames(self, metadata: VideoMetadata, fps: float | None = None, num_frames: int | None = None):
        """Indices of the frames to keep, as ``Qwen3VLVideoProcessor.sample_frames`` picks them."""
        # the real video processor fills unset arguments from its own settings (fps 2) before this check
        fps = fps if fps is not None else self.fps
        num_frames = num_frames if num_frames is not None else self.num_frames
        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        total = metadata.total_num_frames
        if num_frames is None and fps is not None:
            if metadata.fps is None:
                metadata.fps = 24  # as the real processor assumes (its timestamps then use it too)
            num_frames = int(total / metadata.fps * fps)
            num_frames = min(max(num_frames, self.min_frames), self.max_frames, total)
        if num_frames is None:
            num_frames = min(max(total, self.min_frames), self.max_frames)
        return np.linspace(0, total - 1, num_frames).round().astype(int)

    def __call__(self, text: str, images=None, videos=None, video_metadata=None, **sampling) -> dict:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the vision inputs for one prompt.

        The keys, dtypes and values are those of ``Qwen3VLProcessor`` called with the same arguments.
        """
        if videos is None or not len(videos):
            return super().__call__(text, images=images, **sampling)
        return_tensors = sampling.pop("return_tensors", "pt")
        video = self.video_inputs(videos, video_metadata, **sampling)
        merge = self.image_processor.merge_size**2
        placeholders = []
        for (t, h, w), meta in zip(video["video_grid_thw"].tolist(), video.pop("video_metadata")):
            frame = "<|vision_start|>" + self.video_token * (h * w // merge) + "<|vision_end|>"
            placeholders.append("".join(f"<{s:.1f} seconds>" + frame for s in self.timestamps(meta)[:t]))
        pieces = text.split(self.video_token)
        _expand(text, self.video_token, [1] * len(placeholders))  # one placeholder per video, or a clear error
        text = pieces[0] + "".join(p + rest for p, rest in zip(placeholders, pieces[1:]))
        out = super().__call__(text, images=images, return_tensors=return_tensors)
        out.update(video)
        return out

    def timestamps(self, metadata: VideoMetadata) -> list[float]:
        """Seconds of each temporal patch: the mean time of its frames (``Qwen3VLProcessor._calculate_timestamps``)."""
        temporal = self.image_processor.temporal_patch_size
        indices = list(np.asarray(metadata.frames_indices).tolist())
        indices += [indices[-1]] * (-len(indices) % temporal)
        fps = metadata.fps if metadata.fps is not None else 24
        seconds = [i / fps for i in indices]
        return [(seconds[i] + seconds[i + temporal - 1]) / 2 for i in range(0, len(seconds), temporal)]
