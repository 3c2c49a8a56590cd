"""Family adapters: what the engine must know about one LVLM family, and nothing more."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from v2drop.registry import Registry

FAMILIES: Registry[type[Adapter]] = Registry("model family")


def register_family(*model_types: str):
    """Class decorator registering an adapter for the given ``config.model_type`` values."""

    def decorator(cls):
        for name in model_types:
            FAMILIES.add(name, cls)
        return cls

    return decorator


@dataclass
class TowerParts:
    """A vision tower taken apart for vision-encoder stages: its input, layers and where its output goes.

    Attributes
    ----------
    embeddings : Tensor (N, T, C)
        The encoder's input (patch embeddings with the [CLS] at position 0, after the pre-norm), N tower images.
    layers : sequence of nn.Module
        The encoder layers; ``layer(hidden, None)`` runs one on (n, T, C) hidden states.
    selection : int
        The ``hidden_states`` index the projector reads (the feature-selection layer).
    attention : callable
        ``attention(layer, hidden, values)`` -> (probabilities (n, H, T, T) float32, values (n, H, T, hd)
        float32 or None): what ``layer`` computes on its input ``hidden``.
    project : callable
        The projector on selected-layer patch features (k, C) -> (k, D), in the LLM's dtype.
    sample : list of int
        The sample each tower image belongs to.
    placeholders : LongTensor (N, P)
        The positions (in the left-padded prompt) of each image's patch placeholders, patch order.
    grid : tuple of int
        (rows, cols) of each image's patch grid.
    """

    embeddings: torch.Tensor
    layers: object
    selection: int
    attention: Callable
    project: Callable
    sample: list
    placeholders: torch.Tensor
    grid: tuple


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, chosen from its config's ``model_type``."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported model family {model_type!r} ({type(model).__name__}). "
            f"Supported families: {', '.join(FAMILIES.names())}"
        )
    return FAMILIES.get(model_type)(model)


class Adapter:
    """One LVLM family's layout: merging vision features, finding vision tokens, positions, modules.

    Subclasses set the class variables below and override ``position_ids`` / ``image_grids``
    where the family differs from LLaVA-1.5.

    Class variables
    ---------------
    image_inputs, video_inputs : tuple of str
        Processor outputs passed to ``get_image_features`` / ``get_video_features``; the first
        one (the pixels) must be present for the call to happen.
    mrope : bool
        Position ids are Qwen's 3-D M-RoPE ids of shape (3, B, L) instead of (B, L).
    """

    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")
    video_inputs: ClassVar[tuple[str, ...]] = ()
    mrope: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model
        self.language_model = self.inner.language_model
        self.layers = self.language_model.layers
        self.norm = self.language_model.norm
        self.rotary_emb = self.language_model.rotary_emb
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config
        cfg = model.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        self.video_token_id = getattr(cfg, "video_token_id", None)
        if self.video_token_id is None:
            self.video_token_id = getattr(cfg, "video_token_index", None)

    @property
    def depth(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    # -- tokens -----------------------------------------------------------------------------------
    def vision_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: which prompt tokens are vision tokens (image or video placeholders)."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in (self.image_token_id, self.video_token_id):
            if token_id is not None:
                mask |= input_ids == token_id
        return mask

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) the model's token embeddings of ``input_ids`` (placeholders included)."""
        return self.inner.get_input_embeddings()(input_ids)

    def embed(self, inputs: dict) -> torch.Tensor:
        """(B, L, D) input embeddings with the vision features scattered into their placeholders."""
        input_ids = inputs["input_ids"]
        embeds = self.embed_text(input_ids)
        for names, get_features, token_id in (
            (self.image_inputs, self.inner.get_image_features, self.image_token_id),
            (self.video_inputs, self.video_features, self.video_token_id),
        ):
            if not names or inputs.get(names[0]) is None:
                continue
            kwargs = {n: inputs[n] for n in names if inputs.get(n) is not None}
            pooled = get_features(**kwargs, return_dict=True).pooler_output
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled]).to(embeds.device, embeds.dtype)
            placeholder = input_ids == token_id
            if int(placeholder.sum()) != feats.shape[0]:
                raise ValueError(
                    f"The prompts hold {int(placeholder.sum())} vision placeholder tokens but the vision inputs "
                    f"give {feats.shape[0]} features: the number of images (or frames) does not match the "
                    f"number of image placeholders in the prompts"
                )
            embeds = embeds.masked_scatter(placeholder[..., None], feats)
        return embeds

    def layer_additions(self, inputs: dict) -> dict[int, torch.Tensor]:
        """Decoder layer -> (B, L, D) features the model adds to that layer's output at the vision positions.

        Laid out on the prompt positions of ``inputs`` (zero elsewhere); the engine adds each to the
        vision tokens still present after the layer. Most families add nothing (Qwen3-VL: DeepStack).
        """
        return {}

    def video_features(self, **kwargs):
        """The model's ``get_video_features`` on the batch's video inputs (``pooler_output``: features per video)."""
        return self.inner.get_video_features(**kwargs)

    def position_ids(self, inputs: dict) -> torch.Tensor:
        """Position ids as the model's own ``generate`` builds them: (B, L), pads at 1."""
        mask = inputs["attention_mask"].long()
        pos = mask.cumsum(-1) - 1
        return pos.masked_fill(mask == 0, 1)

    def decode_position_ids(self, next_pos: torch.Tensor) -> torch.Tensor:
        """Position ids for one new token per sample, from (B,) next positions."""
        pos = next_pos[:, None]
        return pos[None].expand(3, -1, -1) if self.mrope else pos

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The rotary embeddings of ``position_ids`` for every layer: here (cos, sin), each (B, L, head_dim)."""
        return self.rotary_emb(hidden, position_ids)

    def layer_rope(self, rope, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) decoder layer ``layer_idx`` takes, from what ``rope`` returned (the same for every layer)."""
        return rope

    # -- attention masks ----------------------------------------------------------------------------
    def layer_type(self, layer_idx: int) -> str:
        """``full_attention`` or ``sliding_attention``: the kind of decoder layer ``layer_idx`` (``layer_types``)."""
        types = getattr(self.text_config, "layer_types", None)
        return types[layer_idx] if types else "full_attention"

    def attention_blocks(self, inputs: dict) -> torch.Tensor:
        """(B, L) the attention block of each prompt token; tokens of one block (>= 0) see each other both ways.

        -1 everywhere here: every token attends causally.
        """
        return torch.full_like(inputs["input_ids"], -1)

    def attention_mask(self, kind, layer_idx, hidden, mask2d, cache, index, block):
        """The 4-D mask of decoder layer ``layer_idx`` (of type ``kind``), sized from that layer's own cache.

        ``mask2d`` (B, K) marks the real keys; ``index`` and ``block`` (B, K) are their prompt indices and
        attention blocks (decoded tokens continue the prompt's indices), the queries being the last
        ``hidden.shape[1]`` keys. Here transformers' causal (or sliding-window causal) mask over ``mask2d``.
        """
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        return make(
            config=self.text_config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            past_key_values=cache,
            position_ids=None,
            layer_idx=layer_idx,
        )

    def attention_allowed(self, layer_idx: int, seq, query_idx: torch.Tensor) -> torch.Tensor | None:
        """(B, Q, L) bool: which current tokens the ``query_idx`` (B, Q) rows of layer ``layer_idx`` attend to.

        None here: causal over the current sequence, padding masked (``attention_probabilities``' default).
        """
        return None

    def project_vision(self, features: torch.Tensor) -> torch.Tensor:
        """The model's projector on tower features of the feature-selection layer: (..., C) -> (..., D) float32.

        Generic for the LLaVA families (``multi_modal_projector``, token by token); families whose
        projector is not a per-token map of those features refuse with a ValueError.
        """
        projector = getattr(self.inner, "multi_modal_projector", None)
        if projector is None:
            raise ValueError(
                f"{type(self).__name__} has no per-token vision projector (multi_modal_projector) to map tower "
                "features into the LLM: use a LLaVA-family model or merge in the projected space"
            )
        return projector(features.to(next(projector.parameters()).dtype)).float()

    def reencode(self, inputs: dict, grids: list[list]) -> list[list]:
        """Per sample, each image's projected features (rows · cols, D) float32 from its pixels resized to the
        ``(rows, cols)`` token grid ``grids[b][i]`` gives it (None: not needed, None back); see ``LayerState.reencode``.

        Served where the tower has one fixed grid it can run smaller (LLaVA-1.5); other families refuse.
        """
        raise ValueError(
            f"Model family {self.model.config.model_type!r} cannot re-encode an image at a smaller token grid in the "
            "engine (its processor sets the token count: anyres tiles, dynamic resolution or pixel-shuffled tiles); "
            "downsample runs on llava (LLaVA-1.5); on this family lower the processor's resolution instead (Qwen: "
            "max_pixels) or use pool"
        )

    # -- the vision tower's own outputs (pre-LLM scorers) --------------------------------------------
    def vision_tower_state(self, inputs: dict, request) -> dict:
        """The vision tower outputs a ``VisionRequest`` asks for, laid out on the prompt positions.

        Returns ``{"cls_attention": (B, L) float32, "keys": (B, L, K) float32 or None,
        "cls_embeds": per-sample list of (I_b, D) or None, "features": (B, L, C) float32 or None,
        "received": one (B, L) float32 per entry of ``request.received_layers``}``; entries at
        non-vision positions are zero. Families whose tower has no [CLS] token refuse with a ValueError.
        """
        raise ValueError(
            f"Model family {self.model.config.model_type!r} does not expose its vision tower's [CLS] attention, "
            "so a scorer with a vision_request() (VisionZip) cannot run on it; supported families: llava (LLaVA-1.5), "
            "llava_next (LLaVA-NeXT)"
        )

    def tower_parts(self, inputs: dict) -> TowerParts:
        """The vision tower taken apart for vision-encoder stages (``TowerParts``); refused where not supported."""
        raise ValueError(
            f"Model family {self.model.config.model_type!r}: vision-encoder stages (vision:<l>) run on a CLIP-like "
            "tower with a [CLS] token and one patch grid per image (llava: LLaVA-1.5); this family's tower has no "
            "[CLS] token or packs its patches after the tower (anyres tiles, windowed ViT with a patch merger)"
        )

    # -- vision-token layout ------------------------------------------------------------------------
    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """(frames, rows, cols) token grid of every image/video in the batch, in prompt order."""
        n_tokens = int((inputs["input_ids"] == self.image_token_id).sum())
        per_image = getattr(self.model.config, "image_seq_length", None)
        if not per_image or n_tokens % per_image:
            return []
        side = math.isqrt(per_image)
        grid = (1, side, side) if side * side == per_image else (1, 1, per_image)
        return [grid] * (n_tokens // per_image)

    def vision_coords(self, inputs: dict, vision: torch.Tensor) -> torch.Tensor:
        """(B, L, 3) (image or frame, row, col) of each vision token; -1 elsewhere.

        Grids come from ``image_grids``; where a family's layout is not a plain grid (anyres tiles
        with newline tokens) each image's tokens are laid out on a near-square raster instead.
        """
        coords = torch.full((*vision.shape, 3), -1, dtype=torch.long, device=vision.device)
        grids = iter(self.image_grids(inputs))
        for b in range(vision.shape[0]):
            idx = vision[b].nonzero().flatten()
            start, frame = 0, 0
            while start < idx.numel():
                grid = next(grids, None)
                count = grid[0] * grid[1] * grid[2] if grid else _run_length(idx, start)
                if grid is None:
                    side = math.ceil(math.sqrt(count))
                    grid = (1, math.ceil(count / side), side)
                t, h, w = grid
                k = torch.arange(count, device=vision.device)
                span = idx[start : start + count]
                coords[b, span, 0] = frame + k // (h * w)
                coords[b, span, 1] = (k // w) % h
                coords[b, span, 2] = k % w
                frame += t
                start += count
        return coords


def _run_length(idx: torch.Tensor, start: int) -> int:
    """Length of the run of consecutive positions in ``idx`` beginning at ``start``."""
    end = start + 1
    while end < idx.numel() and idx[end] == idx[end - 1] + 1:
        end += 1
    return end - start
