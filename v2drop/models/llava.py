"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: Llama/Qwen2 decoders with 1-D RoPE."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from v2drop.models.base import Adapter, register_family


@register_family("llava")
class LlavaAdapter(Adapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one square token grid per image; video = frames as images."""

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """The CLIP tower's [CLS] attention, keys and projected [CLS] at ``vision_feature_layer`` (see ``Adapter``)."""
        cfg = self.model.config
        feature_layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        if not isinstance(feature_layer, int) or strategy != "default":
            raise ValueError(
                f"The [CLS] attention is served for vision_feature_layer an int and vision_feature_select_strategy "
                f"'default' (LLaVA-1.5); this model has {feature_layer!r} and {strategy!r}"
            )
        tower = self.inner.vision_tower
        layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers
        selected = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer  # index into hidden_states
        if selected < 1:
            raise ValueError(f"vision_feature_layer {feature_layer} selects the patch embeddings, which have no attention")
        pixels = inputs["pixel_values"].to(self.inner.device, tower.dtype)
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        layer = layers[selected - 1]  # the encoder layer whose output the projector receives
        attn = layer.self_attn
        x = layer.layer_norm1(hidden[selected - 1])  # that layer's input, through its own norm
        n, t, _ = x.shape
        heads = attn.num_heads
        q = attn.q_proj(x[:, :1]).float().view(n, 1, heads, -1).transpose(1, 2)  # (N, H, 1, hd) the [CLS] query
        k = attn.k_proj(x).float().view(n, t, heads, -1).transpose(1, 2)  # (N, H, T, hd)
        probs = torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1)[:, :, 0]  # (N, H, T)
        cls_attention = probs[:, :, 1:].sum(1)  # heads summed, patches only (as VisionZip does)
        input_ids = inputs["input_ids"]
        placeholder = (input_ids == self.image_token_id) & inputs["attention_mask"].bool()
        if int(placeholder.sum()) != n * (t - 1):
            raise ValueError(f"The prompts hold {int(placeholder.sum())} image placeholders but the images give {n * (t - 1)} patch tokens")
        out = {"cls_attention": torch.zeros(placeholder.shape, device=x.device).masked_scatter(placeholder, cls_attention.reshape(-1)),
               "keys": None, "cls_embeds": None}
        if request.keys:
            keys = k.mean(1)[:, 1:]  # heads averaged, as VisionZip's similarity key
            out["keys"] = torch.zeros(*placeholder.shape, keys.shape[-1], device=x.device).masked_scatter(placeholder[..., None], keys.reshape(-1))
        if request.cls_embeds:
            projected = self.inner.multi_modal_projector(hidden[selected][:, :1]).flatten(0, 1)  # (N, D)
            per_sample = (placeholder.sum(1) // (t - 1)).tolist()
            out["cls_embeds"] = list(projected.split(per_sample))
        return out


@register_family("llava_next")
class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: anyres tiles plus newline tokens, all of them image placeholders."""

    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """No grids: the anyres layout falls back to a near-square raster per image."""
        return []

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """Refused: anyres tiles (one [CLS] per tile, plus newline tokens) are not mapped to [CLS] attention yet."""
        raise ValueError(
            f"Model family {self.model.config.model_type!r}: its anyres images are several tiles, each with its own [CLS], "
            "plus newline tokens; serving the [CLS] attention for them is not implemented, so a scorer with a "
            "vision_request() (VisionZip) runs only on llava (LLaVA-1.5) for now"
        )


@register_family("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: anyres images and pooled video frames (``pixel_values_videos``)."""

    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    video_inputs = ("pixel_values_videos", "video_frames")  # video_frames: set by collation when clips were padded in frames

    def video_features(self, pixel_values_videos: torch.Tensor, video_frames: torch.Tensor | None = None, **kwargs):
        """Each clip's features from its own frames: a batch padded in frames (``video_frames`` = true counts) runs clip by clip.

        OneVision pools every frame it is given and appends one newline per clip, so padded frames
        cannot go through the tower with the rest; each clip alone is exactly its unbatched result.
        """
        if video_frames is None:
            return self.inner.get_video_features(pixel_values_videos=pixel_values_videos, **kwargs)
        pooled = [self.inner.get_video_features(pixel_values_videos=clip[None, :n], **kwargs).pooler_output[0]
                  for clip, n in zip(pixel_values_videos, video_frames.tolist())]
        return BaseModelOutputWithPooling(pooler_output=pooled)
