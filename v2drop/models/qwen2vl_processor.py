"""A Qwen2-VL / Qwen2.5-VL processor stand-in for machines without torchvision (images and videos)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.video_utils import VideoMetadata

from v2drop.models.frames import (
    clip_metadata,
    metadata_per_clip,
    presampled,
    read_chat_template,
    read_optional_json,
    resize_normalize,
    save_image_and_text_parts,
    split_videos,
)


class QwenProcessorLite:
    """Tokenizer + ``Qwen2VLImageProcessorPil`` + a PIL/numpy video path.

    ``Qwen2VLProcessor`` needs torchvision for its video processor; this does its job for one
    prompt: images through the real PIL image processor, videos resized per frame with
    ``smart_resize`` (the video size bounds), padded to a multiple of the temporal patch by
    repeating the last frame and flattened in the video processor's patch order. Each
    ``<|image_pad|>`` / ``<|video_pad|>`` expands to ``grid_thw.prod() // merge_size**2`` tokens and
    ``mm_token_type_ids`` marks them (1 image, 2 video). With ``second_per_grid`` (Qwen2.5-VL) it
    returns ``second_per_grid_ts`` as ``Qwen2_5_VLProcessor._process_videos`` computes it:
    ``temporal_patch_size / sampled_fps`` per video, the sampled frame rate read from the video's
    metadata (``VideoMetadata.sampled_fps``: ``len(frames_indices) / total_num_frames * fps``, or
    ``fps``, or 24 when the frames come without metadata). Metadata comes as the ``video_metadata``
    argument or with each video as a ``v2drop.models.frames.Clip``; ``do_sample_frames`` with
    ``fps`` or ``num_frames`` samples frames as ``Qwen2VLVideoProcessor.sample_frames`` does, except
    for a clip sampled from its source already (``frames.presampled``: ``decode_video``'s clips), which
    is used as it is (the real processor needs ``do_sample_frames=False`` for it).
    Frames are resized with PIL bicubic instead of torchvision's, so video pixel values differ
    slightly from the real processor's when a frame is resized (not their shape or token count;
    frames whose sides are already multiples of ``patch_size * merge_size`` within the pixel bounds
    are not resized, and their pixel values equal the real processor's).
    """

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    video_processor_type = "Qwen2VLVideoProcessor"  # the real video processor this one stands in for (saved)

    def __init__(
        self,
        image_processor,
        tokenizer,
        chat_template: str | None = None,
        video_size: dict | None = None,
        second_per_grid: bool = False,
        do_sample_frames: bool = False,
        fps: float | None = None,
        num_frames: int | None = None,
        min_frames: int = 4,
        max_frames: int = 768,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        # transformers' video processor falls back to the image processor's settings when a checkpoint has no
        # video config
        self.video_size = dict(video_size or image_processor.size)
        self.second_per_grid = second_per_grid
        # the video processor's sampling defaults (a checkpoint's video config may set them)
        self.do_sample_frames, self.fps, self.num_frames = do_sample_frames, fps, num_frames
        self.min_frames, self.max_frames = min_frames, max_frames

    @classmethod
    def from_pretrained(cls, path: str, second_per_grid: bool = False) -> QwenProcessorLite:
        """The stand-in for a saved checkpoint (image processor, optional video processor config, tokenizer)."""
        video = read_optional_json(path, "video_preprocessor_config.json")
        size = video.get("size")
        if size is None and ("min_pixels" in video or "max_pixels" in video):
            size = {"shortest_edge": video.get("min_pixels"), "longest_edge": video.get("max_pixels")}
        return cls(
            Qwen2VLImageProcessorPil.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            chat_template=read_chat_template(path),
            video_size=size,
            second_per_grid=second_per_grid,
            **{k: video[k] for k in _SAMPLING if video.get(k) is not None},
        )

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template applied to ``messages``."""
        if self.chat_template is not None:
            kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )

    def video_inputs(
        self,
        videos,
        video_metadata=None,
        do_sample_frames: bool | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
    ) -> dict:
        """``pixel_values_videos`` (patches, patch_dim), ``video_grid_thw`` (videos, 3) and ``video_metadata``
        (one ``VideoMetadata`` per video, ``frames_indices`` set to the frames used) for a list of videos.

        Sampling arguments left None take the processor's defaults, as the real video processor's do."""
        if do_sample_frames is None:
            do_sample_frames = self.do_sample_frames
        proc = self.image_processor
        patch, merge, temporal = proc.patch_size, proc.merge_size, proc.temporal_patch_size
        clips = split_videos(videos)
        metadata = metadata_per_clip(clips, video_metadata if video_metadata is not None else clip_metadata(videos))
        patches, grids = [], []
        for clip, meta in zip(clips, metadata):
            if do_sample_frames and not presampled(meta, len(clip)):
                indices = self.sample_frames(meta, fps=fps, num_frames=num_frames)
                meta.frames_indices = indices
                clip = [clip[i] for i in indices.tolist()]
            h, w = clip[0].shape[:2]
            if any(f.shape[:2] != (h, w) for f in clip):
                raise ValueError(f"The frames of one video must all have the same size (first frame {h}x{w})")
            height, width = self.frame_size(len(clip), h, w)
            frames = np.stack(
                [resize_normalize(f, height, width, proc.image_mean, proc.image_std, proc.rescale_factor) for f in clip]
            )
            if pad := -len(frames) % temporal:
                frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
            flat, grid = _patchify(frames, patch, merge, temporal)
            patches.append(flat)
            grids.append(grid)
        return {
            "pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
            "video_grid_thw": torch.tensor(grids),
            "video_metadata": metadata,
        }

    def frame_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame of a ``frames``-frame clip is resized to (``smart_resize`` per frame)."""
        proc = self.image_processor
        return smart_resize(
            height,
            width,
            factor=proc.patch_size * proc.merge_size,
            min_pixels=self.video_size["shortest_edge"],
            max_pixels=self.video_size["longest_edge"],
        )

    def sample_frames(self, metadata: VideoMetadata, fps: float | None = None, num_frames: int | None = None):
        """Indices of the frames to keep, as ``Qwen2VLVideoProcessor.sample_frames`` picks them.

        ``num_frames`` (rounded to the temporal patch) frames, or ``fps`` frames a second of the
        source (needs ``metadata.fps``; at least ``min_frames``, at most ``max_frames``), spread uniformly.
        """
        # the real video processor fills unset arguments from its own settings before this check
        num_frames = num_frames if num_frames is not None else self.num_frames
        fps = fps if fps is not None else self.fps
        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        temporal = self.image_processor.temporal_patch_size
        total = metadata.total_num_frames
        if num_frames is not None:
            num_frames = round(num_frames / temporal) * temporal
        elif fps is not None:
            if metadata.fps is None:
                raise ValueError(
                    "Asked to sample `fps` frames per second but the video has no metadata with its frame rate; give "
                    "`video_metadata` (or a Clip with metadata) or a fixed `num_frames`"
                )
            max_frames = math.floor(min(self.max_frames, total) / temporal) * temporal
            num_frames = total / metadata.fps * fps
            num_frames = min(max(num_frames, self.min_frames), max_frames, total)
            num_frames = math.floor(num_frames / temporal) * temporal
        if num_frames is not None and num_frames > total:
            raise ValueError(
                f"Video can't be sampled. The inferred `num_frames={num_frames}` exceeds `total_num_frames={total}`. "
                "Decrease `num_frames` or `fps` for sampling."
            )
        if num_frames is None:
            return torch.arange(0, total).int()
        return torch.arange(0, total, total / num_frames).int()

    def __call__(
        self,
        text: str,
        images=None,
        videos=None,
        video_metadata=None,
        do_sample_frames: bool | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
        return_tensors: str = "pt",
    ) -> dict:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the vision inputs for one prompt.

        The keys, dtypes and values are those of ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` called
        with the same arguments (``video_metadata``, ``do_sample_frames``, ``fps``, ``num_frames`` as
        the real video processor takes them).
        """
        if not isinstance(text, str):
            raise ValueError(f"{type(self).__name__} processes one prompt at a time (got {type(text).__name__})")
        out: dict = {}
        merge = self.image_processor.merge_size**2
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            text = _expand(text, self.image_token, [int(g.prod()) // merge for g in vision["image_grid_thw"]])
        if videos is not None and len(videos):
            video = self.video_inputs(videos, video_metadata, do_sample_frames, fps, num_frames)
            metadata = video.pop("video_metadata")
            out.update(video)
            text = _expand(text, self.video_token, [int(g.prod()) // merge for g in video["video_grid_thw"]])
            if self.second_per_grid:
                # Qwen2_5_VLProcessor._process_videos: temporal_patch_size / the sampled frame rate, per video
                temporal = self.image_processor.temporal_patch_size
                out["second_per_grid_ts"] = torch.tensor([temporal / m.sampled_fps for m in metadata])
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        types = torch.zeros_like(ids)  # int64, as ProcessorMixin.create_mm_token_type_ids returns it
        types[ids == self.tokenizer.convert_tokens_to_ids(self.image_token)] = 1
        types[ids == self.tokenizer.convert_tokens_to_ids(self.video_token)] = 2
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
        out["mm_token_type_ids"] = types
        return out

    def save_pretrained(self, path) -> None:
        """Save the image processor, the tokenizer and the video settings side by side."""
        path = save_image_and_text_parts(path, self.image_processor, self.tokenizer)
        video = {"video_processor_type": self.video_processor_type, "size": self.video_size}
        video.update({k: getattr(self, k) for k in _SAMPLING})
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)


_SAMPLING = ("do_sample_frames", "fps", "num_frames", "min_frames", "max_frames")  # video config keys for sampling


def _patchify(frames: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, list[int]]:
    """(T, C, H, W) -> (grid_t * grid_h * grid_w, C * temporal * patch * patch) in Qwen2VLVideoProcessor's order."""
    t, c, h, w = frames.shape
    grid_t, grid_h, grid_w = t // temporal, h // patch, w // patch
    x = frames.reshape(grid_t, temporal, c, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(grid_t * grid_h * grid_w, c * temporal * patch * patch), [
        grid_t,
        grid_h,
        grid_w,
    ]


def _expand(text: str, token: str, counts: list[int]) -> str:
    """``text`` with its n-th ``token`` repeated ``counts[n]`` times (as many placeholders as inputs)."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(
            f"The prompt has {len(pieces) - 1} {token!r} placeholder(s) but {len(counts)} input(s) of that kind were "
            f"given; put one placeholder per image or video in the prompt"
        )
    return pieces[0] + "".join(token * n + p for n, p in zip(counts, pieces[1:]))
