"""A Qwen2-VL / Qwen2.5-VL processor stand-in for machines without torchvision (images and videos)."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from v2drop.models.frames import (
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
    returns ``second_per_grid_ts = temporal_patch_size / video_fps`` per video (``video_fps`` defaults
    to 24, what transformers assumes for frames given without metadata; pass the rate the frames
    were sampled at, e.g. 2 for qwen-vl-utils' default, to match the reference). Frames are resized
    with PIL bicubic instead of torchvision's, so video pixel values differ slightly from the real
    processor's (not their shape or token count).
    """

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(
        self,
        image_processor,
        tokenizer,
        chat_template: str | None = None,
        video_size: dict | None = None,
        second_per_grid: bool = False,
        video_fps: float = 24.0,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        # transformers' video processor falls back to the image processor's settings when a checkpoint has no video
        # config
        self.video_size = dict(video_size or image_processor.size)
        self.second_per_grid = second_per_grid
        self.video_fps = video_fps

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
        )

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template applied to ``messages``."""
        if self.chat_template is not None:
            kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )

    def video_inputs(self, videos) -> dict:
        """``pixel_values_videos`` (patches, patch_dim) and ``video_grid_thw`` (videos, 3) for a list of videos."""
        proc = self.image_processor
        patch, merge, temporal = proc.patch_size, proc.merge_size, proc.temporal_patch_size
        patches, grids = [], []
        for clip in split_videos(videos):
            h, w = clip[0].shape[:2]
            if any(f.shape[:2] != (h, w) for f in clip):
                raise ValueError(f"The frames of one video must all have the same size (first frame {h}x{w})")
            height, width = smart_resize(
                h,
                w,
                factor=patch * merge,
                min_pixels=self.video_size["shortest_edge"],
                max_pixels=self.video_size["longest_edge"],
            )
            frames = np.stack(
                [resize_normalize(f, height, width, proc.image_mean, proc.image_std, proc.rescale_factor) for f in clip]
            )
            if pad := -len(frames) % temporal:
                frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
            flat, grid = _patchify(frames, patch, merge, temporal)
            patches.append(flat)
            grids.append(grid)
        return {"pixel_values_videos": torch.from_numpy(np.concatenate(patches)), "video_grid_thw": torch.tensor(grids)}

    def __call__(self, text: str, images=None, videos=None, return_tensors: str = "pt") -> dict:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the vision inputs for one prompt."""
        if not isinstance(text, str):
            raise ValueError(f"{type(self).__name__} processes one prompt at a time (got {type(text).__name__})")
        out: dict = {}
        merge = self.image_processor.merge_size**2
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            text = _expand(text, self.image_token, [int(g.prod()) // merge for g in vision["image_grid_thw"]])
        if videos is not None and len(videos):
            video = self.video_inputs(videos)
            out.update(video)
            text = _expand(text, self.video_token, [int(g.prod()) // merge for g in video["video_grid_thw"]])
            if self.second_per_grid:
                out["second_per_grid_ts"] = torch.full(
                    (len(video["video_grid_thw"]),), self.image_processor.temporal_patch_size / self.video_fps
                )
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        types = torch.zeros_like(ids, dtype=torch.int)
        types[ids == self.tokenizer.convert_tokens_to_ids(self.image_token)] = 1
        types[ids == self.tokenizer.convert_tokens_to_ids(self.video_token)] = 2
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
        out["mm_token_type_ids"] = types
        return out

    def save_pretrained(self, path) -> None:
        """Save the image processor, the tokenizer and the video settings side by side."""
        path = save_image_and_text_parts(path, self.image_processor, self.tokenizer)
        video = {"video_processor_type": "Qwen2VLVideoProcessor", "size": self.video_size}
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)


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
    """``text`` with its n-th ``token`` repeated ``counts[n]`` times; the numbers of placeholders and inputs must
    match."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(
            f"The prompt has {len(pieces) - 1} {token!r} placeholder(s) but {len(counts)} input(s) of that kind were "
            "given; "
            f"put one placeholder per image or video in the prompt"
        )
    return pieces[0] + "".join(token * n + p for n, p in zip(counts, pieces[1:]))
