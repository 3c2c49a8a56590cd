"""Qwen2-VL and Qwen2.5-VL: 3-D M-RoPE position ids, token grids from ``*_grid_thw``."""

from __future__ import annotations

import itertools

import torch

from v2drop.models.base import Adapter, register_family


@register_family("qwen2_vl", "qwen2_5_vl")
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: M-RoPE ids from the model's own ``get_rope_index``.

    ``mm_token_type_ids`` (0 text, 1 image, 2 video) is required whenever grids are given; it is
    derived from the placeholder ids when the processor did not return it.
    """

    image_inputs = ("pixel_values", "image_grid_thw")
    video_inputs = ("pixel_values_videos", "video_grid_thw")
    mrope = True

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int: 0 text, 1 image, 2 video."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            types[input_ids == self.video_token_id] = 2
        return types

    def position_ids(self, inputs: dict) -> torch.Tensor:
        """(3, B, L) M-RoPE positions from the model's own ``get_rope_index``."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            pos = super().position_ids(inputs)  # text only: plain positions on all three rows
            return pos[None].expand(3, -1, -1)
        kwargs = {}
        if inputs.get("second_per_grid_ts") is not None:
            kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        types = inputs.get("mm_token_type_ids")
        pos, _ = self.inner.get_rope_index(
            input_ids,
            mm_token_type_ids=types if types is not None else self.token_types(input_ids),
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=mask,
            **kwargs,
        )
        return pos

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """Refused: Qwen2-VL's vision tower has no [CLS] token, so there is no [CLS] attention to serve."""
        raise ValueError(
            f"Model family {self.model.config.model_type!r}: the Qwen2-VL vision tower has no [CLS] token (patches are "
            "merged 2x2 and windowed, with no class token), so a scorer that reads the [CLS] attention (VisionZip, "
            "vision_request()) cannot run on it; use a family with a CLIP-like tower (llava), or a scorer that reads "
            "the projected features (divprune)"
        )

    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """(frames, rows, columns) of every image and video, in prompt order, after spatial merging."""
        merge = self.model.config.vision_config.spatial_merge_size
        grids = {
            1: iter(inputs["image_grid_thw"].tolist()) if inputs.get("image_grid_thw") is not None else iter(()),
            2: iter(inputs["video_grid_thw"].tolist()) if inputs.get("video_grid_thw") is not None else iter(()),
        }
        out = []
        for row in self.token_types(inputs["input_ids"]).tolist():
            for kind, _ in itertools.groupby(row):
                if kind:
                    t, h, w = next(grids[kind])
                    out.append((t, h // merge, w // merge))
        return out
