"""A LLaVA-OneVision processor stand-in for machines without torchvision (images and videos)."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.video_utils import default_sample_indices_fn

from v2drop.models.frames import (
    clip_metadata,
    metadata_per_clip,
    read_chat_template,
    read_optional_json,
    resize_normalize,
    save_image_and_text_parts,
    split_videos,
)


class OnevisionProcessorLite:
    """Tokenizer + ``LlavaOnevisionImageProcessorPil`` + a PIL/numpy video path.

    ``LlavaOnevisionProcessor`` cannot be built without torchvision (its video processor needs
    it). This does the same job for one prompt: anyres images (one image per prompt is tiled,
    several are not, as in the real processor: ``batch_num_images``), videos resized to the video
    size and normalised, and each ``<image>`` / ``<video>`` expanded with the real processor's own
    token-count code, so counts are identical. Videos are lists of frames or ``Clip``s (frames with
    metadata); ``do_sample_frames`` with ``fps`` or ``num_frames`` picks frames as
    ``BaseVideoProcessor.sample_frames`` does. Video frames are resized with PIL bicubic instead of
    torchvision's, so video pixel values differ slightly from the real processor's when a frame is
    resized (not their shape); frames already of the video size give the real processor's values.
    """

    image_token = "<image>"
    video_token = "<video>"
    _get_number_of_features = LlavaOnevisionProcessor._get_number_of_features
    _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features
    replace_image_token = LlavaOnevisionProcessor.replace_image_token
    replace_video_token = LlavaOnevisionProcessor.replace_video_token

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_image_tokens: int = 729,
        vision_feature_select_strategy: str = "full",
        vision_aspect_ratio: str = "anyres_max_9",
        video_size: dict | None = None,
        video_mean=None,
        video_std=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
    ):
        self.image_token, self.video_token = image_token, video_token
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        self.video_size = dict(video_size or {"height": 384, "width": 384})
        self.video_mean = list(video_mean if video_mean is not None else image_processor.image_mean)
        self.video_std = list(video_std if video_std is not None else image_processor.image_std)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path: str) -> OnevisionProcessorLite:
        """The stand-in for a saved OneVision checkpoint (its processor, video processor and tokenizer files)."""
        config = read_optional_json(path, "processor_config.json")
        video = read_optional_json(path, "video_preprocessor_config.json")
        return cls(
            LlavaOnevisionImageProcessorPil.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            num_image_tokens=config.get("num_image_tokens", 729),
            vision_feature_select_strategy=config.get("vision_feature_select_strategy", "full"),
            vision_aspect_ratio=config.get("vision_aspect_ratio", "anyres_max_9"),
            video_size=video.get("size"),
            video_mean=video.get("image_mean"),
            video_std=video.get("image_std"),
            chat_template=read_chat_template(path),
            image_token=config.get("image_token", "<image>"),
            video_token=config.get("video_token", "<video>"),
        )

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template applied to ``messages``."""
        if self.chat_template is None:
            raise ValueError("This processor has no chat template; build prompts with the family's format instead")
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )

    def video_pixels(
        self,
        videos,
        video_metadata=None,
        do_sample_frames: bool = False,
        fps: float | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """(videos, frames, 3, H, W) float32 for videos of equal frame count (frames resized to ``video_size``)."""
        clips = split_videos(videos)
        if do_sample_frames:
            metadata = video_metadata if video_metadata is not None else clip_metadata(videos)
            for i, (clip, meta) in enumerate(zip(clips, metadata_per_clip(clips, metadata))):
                clips[i] = [clip[j] for j in default_sample_indices_fn(meta, num_frames=num_frames, fps=fps)]
        height, width = self.video_size["height"], self.video_size["width"]
        arrays = [
            np.stack([resize_normalize(f, height, width, self.video_mean, self.video_std) for f in clip])
            for clip in clips
        ]
        if len({a.shape[0] for a in arrays}) > 1:
            raise ValueError(
                f"The videos of one prompt have different frame counts ({[a.shape[0] for a in arrays]}); "
                f"LLaVA-OneVision stacks them, so sample the same number of frames from each"
            )
        return torch.from_numpy(np.stack(arrays))

    def __call__(
        self,
        text: str,
        images=None,
        videos=None,
        video_metadata=None,
        do_sample_frames: bool = False,
        fps: float | None = None,
        num_frames: int | None = None,
        return_tensors: str = "pt",
    ) -> dict:
        """``input_ids``, ``attention_mask`` and the vision inputs for one prompt, as ``LlavaOnevisionProcessor``
        returns them for the same arguments."""
        if not isinstance(text, str):
            raise ValueError(f"{type(self).__name__} processes one prompt at a time (got {type(text).__name__})")
        out: dict = {}
        if images:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            # one nested list: several images of one prompt are not tiled (OneVision's multi-image mode)
            vision = self.image_processor(images=[images], return_tensors="pt")
            out.update(
                pixel_values=vision["pixel_values"],
                image_sizes=vision["image_sizes"],
                batch_num_images=vision["batch_num_images"],
            )
            text = _expand(text, self.image_token, [self.replace_image_token(vision, i) for i in range(len(images))])
        if videos is not None and len(videos):
            pixels = self.video_pixels(videos, video_metadata, do_sample_frames, fps, num_frames)
            out["pixel_values_videos"] = pixels
            text = _expand(
                text,
                self.video_token,
                [self.replace_video_token({"pixel_values_videos": pixels}, i) for i in range(len(pixels))],
            )
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
        return out

    def save_pretrained(self, path) -> None:
        """Save in the real processor's layout (a machine with torchvision loads it as ``LlavaOnevisionProcessor``)."""
        path = save_image_and_text_parts(path, self.image_processor, self.tokenizer)
        config = {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": self.num_image_tokens,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_aspect_ratio": self.vision_aspect_ratio,
            "image_token": self.image_token,
            "video_token": self.video_token,
        }
        (path / "processor_config.json").write_text(json.dumps(config, indent=2))
        video = {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": self.video_size,
            "image_mean": self.video_mean,
            "image_std": self.video_std,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        }
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)


def _expand(text: str, token: str, replacements: list[str]) -> str:
    """``text`` with its n-th ``token`` replaced by ``replacements[n]``; the counts must match."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(replacements):
        raise ValueError(
            f"The prompt has {len(pieces) - 1} {token!r} placeholder(s) but {len(replacements)} input(s) of that kind "
            f"were given; put one placeholder per image or video in the prompt"
        )
    return pieces[0] + "".join(r + p for r, p in zip(replacements, pieces[1:]))
