"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP pooled to 256 tokens an image, bidirectional image blocks,
sliding-window local layers with their own rotary embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from v2drop.models.base import Adapter, register_family


@register_family("gemma3")
class Gemma3Adapter(Adapter):
    """Gemma 3: every image block is a square grid of ``mm_tokens_per_image`` tokens, attended both ways.

    The SigLIP tower (no [CLS] token) sees the image at its input size; the projector average-pools
    its patch grid to ``mm_tokens_per_image`` (256: 16x16) tokens, RMS-normalises and projects them.
    The processor writes each image as ``<start_of_image>``, that many ``<image_soft_token>``, then
    ``<end_of_image>``; with pan-and-scan (``do_pan_and_scan=True`` at call time) an image is the
    whole image then a few crops, each a block of its own. Text embeddings are scaled by
    sqrt(hidden size), image features are not (they replace the placeholders' embeddings).

    Attention, as transformers builds it from ``token_type_ids`` in prefill: causal, except that
    the tokens of one image block see each other both ways; local (``sliding_attention``) layers
    also hide keys ``sliding_window`` or more positions behind the query; global and local layers
    take different rotary embeddings. After a drop the engine keeps all of this on the tokens
    still present, measured on their prompt indices: kept tokens of one block still see each other
    both ways, and a local layer's window counts prompt positions (dropped tokens included), so the
    masks are those of transformers' model with the dropped tokens masked as keys. A local layer's
    KV cache keeps its last ``sliding_window - 1`` tokens, as transformers' does; the decoding masks
    hide those of them that are out of the window in prompt positions.
    """

    image_inputs = ("pixel_values",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise ValueError(
                "Gemma 3 with use_bidirectional_attention=True (an encoder variant) is not supported: the engine "
                "generates with the causal decoder; use a Gemma3ForConditionalGeneration checkpoint"
            )
        self.window = self.text_config.sliding_window

    # -- tokens -------------------------------------------------------------------------------------
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) the scaled token embeddings; an image token id outside the vocabulary embeds as id 0 (as
        ``Gemma3Model.forward`` does before its features replace it)."""
        if self.image_token_id is not None and self.image_token_id >= self.text_config.vocab_size:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return super().embed_text(input_ids)

    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """One (1, side, side) grid per image block (pan-and-scan crops included), in prompt order."""
        per_block = self.model.config.mm_tokens_per_image
        side = math.isqrt(per_block)
        n_tokens = int(((inputs["input_ids"] == self.image_token_id) & inputs["attention_mask"].bool()).sum())
        if n_tokens % per_block:
            raise ValueError(
                f"The prompts hold {n_tokens} image tokens, not a whole number of {per_block}-token image blocks: "
                "build them with the model's processor (Gemma3Processor)"
            )
        return [(1, side, side)] * (n_tokens // per_block)

    def project_vision(self, features: torch.Tensor) -> torch.Tensor:
        """Refused: Gemma 3's projector average-pools the tower's patches, so it is no per-token map."""
        raise ValueError(
            "Model family 'gemma3': the multimodal projector average-pools 4x4 SigLIP patches into one token, so there "
            "is no per-token projection of tower features; merge in the projected space instead"
        )

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """Refused: SigLIP has no [CLS] token, so there is no [CLS] attention to serve."""
        raise ValueError(
            "Model family 'gemma3': the SigLIP vision tower has no [CLS] token (and the projector pools 4x4 patches "
            "into one token), so a scorer that reads the [CLS] attention (VisionZip, VisPruner, HiPrune: "
            "vision_request()) cannot run on it; use a scorer that reads the decoder (v2drop, fastv, pdrop) or the "
            "projected features (divprune, cdpruner)"
        )

    # -- rotary embeddings: one per layer type ------------------------------------------------------
    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Layer type -> (cos, sin): the global layers' (scaled) and the local layers' rotary embeddings."""
        kinds = sorted(set(self.text_config.layer_types))
        return {kind: self.rotary_emb(hidden, position_ids, kind) for kind in kinds}

    def layer_rope(self, rope: dict, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) of the type of layer ``layer_idx``."""
        return rope[self.layer_type(layer_idx)]

    # -- attention: bidirectional image blocks, sliding windows on prompt positions -------------------
    def attention_blocks(self, inputs: dict) -> torch.Tensor:
        """(B, L) image block of each token: consecutive image tokens form one block (numbered per sample from 0), as
        transformers' ``get_block_sequence_ids_for_mask`` numbers them from ``token_type_ids`` (image = 1; read
        from the inputs when given, else from the image tokens); -1 for text and padding."""
        types = inputs.get("token_type_ids")
        if types is None:
            types = inputs.get("mm_token_type_ids")
        ids = inputs["input_ids"]
        image = (types == 1) if types is not None else ids == self.image_token_id
        image = image & inputs["attention_mask"].bool()
        starts = image & ~nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, starts.long().cumsum(1) - 1, -1)

    def allowed_keys(self, kind, key_index, key_block, key_real, query_index, query_block) -> torch.Tensor:
        """(B, Q, K) bool: causal on prompt indices, or within one image block; in local layers only keys fewer
        than ``sliding_window`` positions behind the query; padding keys never."""
        q, k = query_index[:, :, None], key_index[:, None, :]
        same_block = (query_block[:, :, None] == key_block[:, None, :]) & (query_block[:, :, None] >= 0)
        allowed = key_real[:, None, :] & ((k <= q) | same_block)
        if kind == "sliding_attention":
            allowed &= q - k < self.window
        return allowed

    def attention_mask(self, kind, layer_idx, hidden, mask2d, cache, index, block):
        """The 4-D mask (eager: additive float; sdpa: bool) of ``allowed_keys`` over the keys in this layer's cache:
        a local layer's cache holds only the last ``sliding_window - 1`` earlier tokens."""
        impl = self.text_config._attn_implementation
        if impl not in ("eager", "sdpa"):
            raise ValueError(
                f"Gemma 3 runs with attn_implementation 'eager' or 'sdpa' (its image blocks need an explicit mask), "
                f"got {impl!r}"
            )
        n_query = hidden.shape[1]
        n_key = cache.get_mask_sizes(n_query, layer_idx)[0]
        allowed = self.allowed_keys(
            kind,
            index[:, -n_key:],
            block[:, -n_key:],
            mask2d[:, -n_key:].bool(),
            index[:, -n_query:],
            block[:, -n_query:],
        )
        allowed |= (index[:, -n_query:] < 0)[..., None]  # padding rows (never read) see everything: no empty row
        allowed = allowed[:, None]
        if impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min
        )

    def attention_allowed(self, layer_idx: int, seq, query_idx: torch.Tensor) -> torch.Tensor:
        """(B, Q, L) ``allowed_keys`` of layer ``layer_idx`` for the ``query_idx`` rows of the current sequence."""
        return self.allowed_keys(
            self.layer_type(layer_idx),
            seq.orig_idx,
            seq.block,
            seq.attention_mask.bool(),
            seq.orig_idx.gather(1, query_idx),
            seq.block.gather(1, query_idx),
        )
