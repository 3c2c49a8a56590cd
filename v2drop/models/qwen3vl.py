"""Qwen3-VL: interleaved M-RoPE, DeepStack vision features added after the first decoder layers."""

from __future__ import annotations

import itertools

import torch

from v2drop.models.base import register_family
from v2drop.models.qwen2vl import Qwen2VLAdapter


@register_family("qwen3_vl", "qwen3_vl_moe")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's layout (``get_rope_index`` positions, ``*_grid_thw`` grids) plus DeepStack.

    The vision tower returns, besides the merged features scattered into the placeholders, one
    feature per vision token from each of several tower layers (``deepstack_visual_indexes``);
    transformers adds the n-th of them to the output of decoder layer n at the vision positions.
    ``layer_additions`` lays them out on the prompt positions for the engine, which adds them to the
    vision tokens still present. The rotary embedding interleaves the T/H/W sections
    (``Qwen3VLTextRotaryEmbedding``), which ``rope`` serves as the model's own module. A video is
    one grid per frame: each frame's tokens follow a ``<t seconds>`` timestamp that stays text.

    Qwen3-VL-MoE (``qwen3_vl_moe``) differs only in its decoder layers' MLP (a top-k routed sparse MoE block),
    which the engine runs as the layer's own module: its decoder layer takes and returns the same as Qwen3-VL's
    (the router logits are only recorded by transformers' output hooks, for the training-time aux loss, which
    prefill does not compute), so the same adapter serves both.
    """

    def __init__(self, model):
        super().__init__(model)
        self._held: tuple | None = None  # (inputs' tensors, additions) of the last embed

    def embed(self, inputs: dict) -> torch.Tensor:
        """(B, L, D) input embeddings; the same vision pass's DeepStack features are kept for ``layer_additions``."""
        embeds, additions = self._embed_with_additions(inputs)
        self._held = (_key(inputs), additions)
        return embeds

    def layer_additions(self, inputs: dict) -> dict[int, torch.Tensor]:
        """Decoder layer -> (B, L, D) DeepStack features on the prompt positions (zero at text and padding).

        Those of the last ``embed`` when it embedded these very inputs (then released), else a new vision
        pass (as when a vision cache served the embeddings).
        """
        held, self._held = self._held, None
        if held is not None and _same(held[0], _key(inputs)):
            return held[1]
        return self._embed_with_additions(inputs)[1]

    def _embed_with_additions(self, inputs: dict) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The embeddings (as ``Qwen3VLModel.forward`` builds them) and the same vision pass's DeepStack additions."""
        input_ids = inputs["input_ids"]
        embeds = self.inner.get_input_embeddings()(input_ids)
        deepstack: dict[int, torch.Tensor] = {}
        for names, get_features, token_id in (
            (self.image_inputs, self.inner.get_image_features, self.image_token_id),
            (self.video_inputs, self.inner.get_video_features, self.video_token_id),
        ):
            if inputs.get(names[0]) is None:
                continue
            out = get_features(**{n: inputs[n] for n in names if inputs.get(n) is not None}, return_dict=True)
            feats = torch.cat(list(out.pooler_output)).to(embeds.device, embeds.dtype)
            placeholder = input_ids == token_id
            if int(placeholder.sum()) != feats.shape[0]:
                raise ValueError(
                    f"The prompts hold {int(placeholder.sum())} vision placeholder tokens but the vision inputs give "
                    f"{feats.shape[0]} features: the number of images (or frames) does not match the number of "
                    "placeholders in the prompts"
                )
            embeds = embeds.masked_scatter(placeholder[..., None], feats)
            for layer_idx, per_input in enumerate(out.deepstack_features):
                extra = torch.cat(list(per_input)).to(embeds.device, embeds.dtype)
                base = deepstack.get(layer_idx, torch.zeros_like(embeds))
                deepstack[layer_idx] = base.masked_scatter(placeholder[..., None], extra)
        return embeds, deepstack

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """Refused: Qwen3-VL's vision tower has no [CLS] token, so there is no [CLS] attention to serve."""
        raise ValueError(
            f"Model family {self.model.config.model_type!r}: the Qwen3-VL vision tower has no [CLS] token (patches are "
            "merged 2x2, with a learned position grid and no class token), so a scorer that reads the [CLS] attention "
            "(VisionZip, vision_request()) cannot run on it; use a family with a CLIP-like tower (llava), or a scorer "
            "that reads the projected features (divprune)"
        )

    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """(frames, rows, columns) of every image and video frame, in prompt order, after spatial merging."""
        merge = self.model.config.vision_config.spatial_merge_size
        frames = []
        if inputs.get("video_grid_thw") is not None:  # one grid per frame: timestamps separate the frames
            frames = [[1, h, w] for t, h, w in inputs["video_grid_thw"].tolist() for _ in range(t)]
        grids = {
            1: iter(inputs["image_grid_thw"].tolist()) if inputs.get("image_grid_thw") is not None else iter(()),
            2: iter(frames),
        }
        out = []
        for row in self.token_types(inputs["input_ids"]).tolist():
            for kind, _ in itertools.groupby(row):
                if kind:
                    t, h, w = next(grids[kind])
                    out.append((t, h // merge, w // merge))
        return out


def _key(inputs: dict) -> tuple:
    """The tensors an embedding is computed from (compared by identity)."""
    return tuple(
        inputs.get(n) for n in ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    )


def _same(a: tuple, b: tuple) -> bool:
    """Whether two ``_key`` tuples hold the very same tensors."""
    return all(x is y for x, y in zip(a, b))
