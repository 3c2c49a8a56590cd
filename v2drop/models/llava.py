"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: Llama/Qwen2 decoders with 1-D RoPE."""

from __future__ import annotations

from v2drop.models.base import Adapter, register_family


@register_family("llava")
class LlavaAdapter(Adapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one square token grid per image; video = frames as images."""


@register_family("llava_next")
class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: anyres tiles plus newline tokens, all of them image placeholders."""

    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """No grids: the anyres layout falls back to a near-square raster per image."""
        return []


@register_family("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: anyres images and pooled video frames (``pixel_values_videos``)."""

    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    video_inputs = ("pixel_values_videos",)
