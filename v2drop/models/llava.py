"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: Llama/Qwen2 decoders with 1-D RoPE."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from v2drop.models.base import Adapter, TowerParts, _run_length, register_family


def _check_cls_tower(config) -> None:
    """Raise unless the tower's [CLS] exists and is the token the model drops (strategy 'default', one int layer)."""
    feature_layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(feature_layer, int) or strategy != "default":
        raise ValueError(
            f"The [CLS] attention is served for vision_feature_layer an int and vision_feature_select_strategy "
            f"'default' (LLaVA-1.5, LLaVA-NeXT); this model has {feature_layer!r} and {strategy!r}"
        )


def _tower_layer(layers, feature_layer: int, layer: int | None) -> int:
    """Index into ``hidden_states`` of the output of encoder layer ``layer`` (see ``VisionRequest.received_layers``)."""
    layer = feature_layer if layer is None else layer
    if isinstance(layer, float):  # a share of the tower's depth
        layer = max(1, round(layer * len(layers)))
    index = layer if layer >= 0 else len(layers) + 1 + layer
    if not 1 <= index <= len(layers):
        raise ValueError(
            f"Vision tower layer {layer} does not exist or has no attention: the tower has {len(layers)} layers "
            f"(1..{len(layers)}, or -1..-{len(layers)} from the end)"
        )
    return index


def _query_keys(layer, x: torch.Tensor, queries: slice):
    """The float32 (N, H, Q, hd) queries of ``x[:, queries]`` and (N, H, T, hd) keys of a CLIP encoder layer."""
    attn = layer.self_attn
    x = layer.layer_norm1(x)  # the layer's input, through its own norm
    n, t, _ = x.shape
    q = attn.q_proj(x[:, queries]).float().view(n, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).float().view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    return q, k


def _clip_attention(layer, x: torch.Tensor, values: bool = False):
    """A CLIP encoder layer's attention on its input ``x`` (n, T, C): probabilities (n, H, T, T) float32, and its value
    vectors (n, H, T, hd) float32 when ``values``."""
    q, k = _query_keys(layer, x, slice(None))
    probs = torch.softmax((q * layer.self_attn.scale) @ k.transpose(-1, -2), dim=-1)
    if not values:
        return probs, None
    attn = layer.self_attn
    v = attn.v_proj(layer.layer_norm1(x)).float()
    return probs, v.view(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)


def _cls_rows(adapter: Adapter, pixels: torch.Tensor, received_layers: tuple = ()):
    """The CLIP tower on ``pixels`` (N, C, H, W) at ``vision_feature_layer``: the [CLS] row and keys of every patch.

    Returns ``(cls_attention (N, P) float32, heads summed; keys (N, P, hd) float32, heads averaged;
    hidden (N, 1 + P, D_tower), the selection layer's output; received, one (N, P) float32 per
    entry of ``received_layers``: the attention each patch receives there, heads and queries averaged)``.
    """
    tower = adapter.inner.vision_tower
    layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers
    feature_layer = adapter.model.config.vision_feature_layer
    if (feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer) < 1:
        raise ValueError(f"vision_feature_layer {feature_layer} selects the patch embeddings, which have no attention")
    selected = _tower_layer(layers, feature_layer, None)
    hidden = tower(pixels.to(adapter.inner.device, tower.dtype), output_hidden_states=True).hidden_states
    layer = layers[selected - 1]  # the encoder layer whose output the projector receives
    q, k = _query_keys(layer, hidden[selected - 1], slice(0, 1))  # the [CLS] query
    probs = torch.softmax((q * layer.self_attn.scale) @ k.transpose(-1, -2), dim=-1)[:, :, 0]  # (N, H, T)
    received = []
    for index in (_tower_layer(layers, feature_layer, x) for x in received_layers):
        q_all, k_all = _query_keys(layers[index - 1], hidden[index - 1], slice(None))
        full = torch.softmax((q_all * layers[index - 1].self_attn.scale) @ k_all.transpose(-1, -2), dim=-1)
        received.append(full.mean(1).mean(1)[:, 1:])  # heads, then queries averaged; patch columns
    # heads summed, patches only (as VisionZip does); keys heads averaged, VisionZip's similarity key
    return probs[:, :, 1:].sum(1), k.mean(1)[:, 1:], hidden[selected], received


@register_family("llava")
class LlavaAdapter(Adapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one square token grid per image; video = frames as images."""

    def tower_parts(self, inputs: dict) -> TowerParts:
        """The CLIP tower for vision-encoder stages: each image's P patch placeholders, in prompt order, are its P
        patches (see ``TowerParts``)."""
        cfg = self.model.config
        try:
            _check_cls_tower(cfg)
        except ValueError as err:
            raise ValueError(f"Vision-encoder stages need the tower's [CLS] token: {err}") from None
        tower = self.inner.vision_tower
        model = tower.vision_model if hasattr(tower, "vision_model") else tower
        layers = model.encoder.layers
        selected = _tower_layer(layers, cfg.vision_feature_layer, None)
        pixels = inputs["pixel_values"].to(self.inner.device, tower.dtype)
        embeddings = model.pre_layrnorm(model.embeddings(pixels))
        n, patches = embeddings.shape[0], embeddings.shape[1] - 1
        placeholder = (inputs["input_ids"] == self.image_token_id) & inputs["attention_mask"].bool()
        if int(placeholder.sum()) != n * patches:
            raise ValueError(
                f"The prompts hold {int(placeholder.sum())} image placeholders but the images give {n * patches} patch "
                "tokens"
            )
        positions = placeholder.nonzero()  # (n * P, 2): sample, position; row-major, so image by image
        side = model.embeddings.num_patches**0.5
        grid = (int(side), int(side)) if int(side) ** 2 == patches else (1, patches)
        projector = self.inner.multi_modal_projector
        return TowerParts(
            embeddings=embeddings,
            layers=layers,
            selection=selected,
            attention=_clip_attention,
            project=lambda features: projector(features),
            sample=positions[::patches, 0].tolist(),
            placeholders=positions[:, 1].view(n, patches),
            grid=grid,
        )

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """The CLIP tower's [CLS] attention, keys and projected [CLS] at ``vision_feature_layer`` (see ``Adapter``)."""
        _check_cls_tower(self.model.config)
        cls_attention, keys, selected, received = _cls_rows(self, inputs["pixel_values"], request.received_layers)
        n, patches = cls_attention.shape
        input_ids = inputs["input_ids"]
        placeholder = (input_ids == self.image_token_id) & inputs["attention_mask"].bool()
        if int(placeholder.sum()) != n * patches:
            raise ValueError(
                f"The prompts hold {int(placeholder.sum())} image placeholders but the images give {n * patches} patch "
                "tokens"
            )
        device = cls_attention.device
        out = {
            "cls_attention": torch.zeros(placeholder.shape, device=device).masked_scatter(
                placeholder, cls_attention.reshape(-1)
            ),
            "keys": None,
            "cls_embeds": None,
            "crops": None,
            "features": None,
            "received": [
                torch.zeros(placeholder.shape, device=device).masked_scatter(placeholder, r.reshape(-1))
                for r in received
            ],
        }
        if request.keys:
            out["keys"] = torch.zeros(*placeholder.shape, keys.shape[-1], device=device).masked_scatter(
                placeholder[..., None], keys.reshape(-1)
            )
        if request.features:
            feats = selected[:, 1:].float()
            out["features"] = torch.zeros(*placeholder.shape, feats.shape[-1], device=device).masked_scatter(
                placeholder[..., None], feats.reshape(-1)
            )
        if request.cls_embeds:
            projected = self.inner.multi_modal_projector(selected[:, :1]).flatten(0, 1)  # (N, D)
            per_sample = (placeholder.sum(1) // patches).tolist()
            out["cls_embeds"] = list(projected.split(per_sample))
        return out

    def reencode(self, inputs: dict, grids: list[list]) -> list[list]:
        """The CLIP tower on each image resized to its grid (``resized_pixels``), position embeddings interpolated
        (``interpolate_pos_encoding``), then the projector: the model's own ``get_image_features`` (see ``Adapter``)."""
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                f"downsample needs vision_feature_select_strategy 'default' (patch tokens only), got "
                f"{cfg.vision_feature_select_strategy!r}"
            )
        pixels = inputs["pixel_values"]
        flat = [grid for sample in grids for grid in sample]
        if len(flat) != pixels.shape[0]:
            raise ValueError(f"reencode got grids for {len(flat)} images but the batch has {pixels.shape[0]}")
        patch = cfg.vision_config.patch_size
        features: list = [None] * len(flat)
        for grid in dict.fromkeys(g for g in flat if g is not None):  # one tower call per distinct grid
            which = [i for i, g in enumerate(flat) if g == grid]
            small = resized_pixels(pixels[which], *grid, patch)
            out = self.inner.get_image_features(pixel_values=small, interpolate_pos_encoding=True, return_dict=True)
            for i, f in zip(which, out.pooler_output):
                features[i] = f.float()
        it = iter(features)
        return [[next(it) for _ in sample] for sample in grids]


def resized_pixels(pixels: torch.Tensor, rows: int, cols: int, patch: int) -> torch.Tensor:
    """Processed pixel values (N, C, H, W) resized to ``rows · patch`` by ``cols · patch`` pixels.

    Bicubic with antialiasing, as transformers' tensor image processors resize; the processor's
    normalisation is per channel and affine, so resizing the normalised pixels equals normalising
    the resized ones (up to the rounding to 8 bits a PIL processor makes).
    """
    size = (rows * patch, cols * patch)
    out = torch.nn.functional.interpolate(
        pixels.float(), size=size, mode="bicubic", antialias=True, align_corners=False
    )
    return out.to(pixels.dtype)


@register_family("llava_next")
class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: anyres tiles plus newline tokens, all of them image placeholders."""

    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """No grids: the anyres layout falls back to a near-square raster per image."""
        return []

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """The CLIP tower's outputs for every crop (the base image and each anyres tile), laid out on the prompt.

        Each placeholder that shows a patch gets its crop's [CLS] attention and key for that patch;
        ``"crops"`` (B, L) gives the crop it belongs to, numbered per sample in prompt order
        (-1 for the image_newline tokens and for non-image positions); ``"cls_embeds"`` holds each
        crop's projected [CLS]. The layout is the model's own: the per-patch values go through its
        ``pack_image_features`` (unpadding, newline columns) exactly as its features do.
        """
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        _check_cls_tower(cfg)
        sizes = inputs["image_sizes"]
        counts = [
            image_size_to_num_patches(
                image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )
            for s in sizes
        ]
        pixels = inputs["pixel_values"]
        if pixels.dim() == 5:  # (images, crops, C, H, W) zero-padded over crops
            pixels = torch.cat([p[:c] for p, c in zip(pixels, counts)])
        cls_attention, keys, selected, received = _cls_rows(self, pixels, request.received_layers)
        n, patches = cls_attention.shape
        device = cls_attention.device
        feats = selected[:, 1:].float() if request.features else selected.new_zeros(n, patches, 0).float()
        # One table per patch: [CLS] attention, crop number, key, features, received attention;
        # newline entries carry crop -1.
        table = torch.cat(
            [
                cls_attention[..., None],
                torch.arange(n, device=device, dtype=torch.float32)[:, None, None].expand(n, patches, 1),
                keys,
                feats,
                *(r[..., None] for r in received),
            ],
            -1,
        )
        newline = torch.zeros(table.shape[-1], device=device)
        newline[1] = -1.0
        packed, lens = self.inner.pack_image_features(
            list(table.split(counts)), sizes, "default", image_newline=newline
        )
        packed = torch.cat(packed)
        placeholder = (inputs["input_ids"] == self.image_token_id) & inputs["attention_mask"].bool()
        if int(placeholder.sum()) != packed.shape[0]:
            raise ValueError(
                f"The prompts hold {int(placeholder.sum())} image placeholders but the images give {packed.shape[0]} "
                "tokens"
            )
        # Images to samples: each sample's placeholders are its images' tokens, in order.
        first_crop, crops_per_sample, image = [], [], 0
        starts = [0] + torch.tensor(counts).cumsum(0).tolist()
        lens = lens.tolist()
        for count in placeholder.sum(1).tolist():
            first, total = image, 0
            while total < count:
                total, image = total + lens[image], image + 1
            first_crop.append(starts[first])
            crops_per_sample.append(starts[image] - starts[first])
        crop = packed[:, 1].round().long()
        sample_of = placeholder.nonzero()[:, 0]
        local = torch.where(crop >= 0, crop - torch.tensor(first_crop, device=device)[sample_of], crop)
        out = {
            "cls_attention": torch.zeros(placeholder.shape, device=device).masked_scatter(
                placeholder, packed[:, 0].contiguous()
            ),
            "keys": None,
            "cls_embeds": None,
            "crops": torch.full(placeholder.shape, -1, dtype=torch.long, device=device).masked_scatter(
                placeholder, local
            ),
        }
        hd, c = keys.shape[-1], feats.shape[-1]

        def spread(columns: torch.Tensor) -> torch.Tensor:
            """Packed per-token columns (T, K) laid out on the prompt positions (B, L, K)."""
            return torch.zeros(*placeholder.shape, columns.shape[-1], device=device).masked_scatter(
                placeholder[..., None], columns.contiguous()
            )

        if request.keys:
            out["keys"] = spread(packed[:, 2 : 2 + hd])
        out["features"] = spread(packed[:, 2 + hd : 2 + hd + c]) if request.features else None
        out["received"] = [spread(packed[:, 2 + hd + c + i : 3 + hd + c + i])[..., 0] for i in range(len(received))]
        if request.cls_embeds:
            projected = self.inner.multi_modal_projector(selected[:, :1]).flatten(0, 1)  # (N, D)
            out["cls_embeds"] = list(projected.split(crops_per_sample))
        return out


@register_family("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: anyres images and pooled video frames (``pixel_values_videos``)."""

    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    video_inputs = (
        "pixel_values_videos",
        "video_frames",
    )  # video_frames: set by collation when clips were padded in frames

    def video_features(self, pixel_values_videos: torch.Tensor, video_frames: torch.Tensor | None = None, **kwargs):
        """Each clip's features from its own frames: a batch padded in frames (``video_frames`` = true counts) runs clip
        by clip.

        OneVision pools every frame it is given and appends one newline per clip, so padded frames
        cannot go through the tower with the rest; each clip alone is exactly its unbatched result.
        """
        if video_frames is None:
            return self.inner.get_video_features(pixel_values_videos=pixel_values_videos, **kwargs)
        pooled = [
            self.inner.get_video_features(pixel_values_videos=clip[None, :n], **kwargs).pooler_output[0]
            for clip, n in zip(pixel_values_videos, video_frames.tolist())
        ]
        return BaseModelOutputWithPooling(pooler_output=pooled)

    def vision_coords(self, inputs: dict, vision: torch.Tensor) -> torch.Tensor:
        """As ``Adapter.vision_coords``, and every video clip laid out by frame: each pooled frame a square grid
        (frame, row, col), frames numbered from 0 per clip, the clip's closing newline token (-1, 0, 0).

        A clip's run of video placeholders is ``frames · side² + 1`` long (``video_frames`` or the
        pixel tensor gives its frame count); a run of any other length keeps the raster layout.
        """
        coords = super().vision_coords(inputs, vision)
        pixels = inputs.get("pixel_values_videos")
        if pixels is None or self.video_token_id is None or pixels.dim() != 5:
            return coords
        given = inputs.get("video_frames")
        clips = iter(given.tolist() if given is not None else [pixels.shape[1]] * pixels.shape[0])
        for b in range(coords.shape[0]):
            idx = (inputs["input_ids"][b] == self.video_token_id).nonzero().flatten()
            start = 0
            while start < idx.numel():
                run = _run_length(idx, start)
                frames = next(clips, None)
                per = (run - 1) // frames if frames else 0
                side = int(per**0.5)
                if frames and per * frames + 1 == run and side * side == per:
                    k = torch.arange(per * frames, device=coords.device)
                    span = idx[start : start + per * frames]
                    coords[b, span] = torch.stack([k // per, (k % per) // side, k % side], -1)
                    coords[b, idx[start + run - 1]] = torch.tensor([-1, 0, 0], device=coords.device)
                start += run
        return coords

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """Refused: OneVision's SigLIP tower has no [CLS] token, and the official VisionZip code has no OneVision
        variant.
        """
        raise ValueError(
            f"Model family {self.model.config.model_type!r}: LLaVA-OneVision's SigLIP vision tower has no [CLS] token "
            "(all of its tokens are patches, vision_feature_select_strategy 'full'), so there is no [CLS] attention to "
            "serve, and the official VisionZip code supports LLaVA-1.5 and LLaVA-NeXT only; a scorer with a "
            "vision_request() (VisionZip, VisPruner, HiPrune) runs on llava and llava_next, or use a scorer that reads "
            "the projected features (divprune, cdpruner)"
        )
