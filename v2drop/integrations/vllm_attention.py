"""vLLM's decoder layers in the form ``v2drop.attention`` reads, so the engine's drop stage recomputes attention rows.

vLLM's fused attention returns no weights. A scorer that reads attention rows (FastV, PDrop) gets them the way
v2drop's engine computes them with transformers' layers (``v2drop.engine.stages._attention``,
``v2drop.attention.attention_probabilities``): from the scoring layer's input, its own input norm, q/k projections
and RoPE, head-averaged, causal over the request's current tokens. ``StageAdapter`` is the part of an ``Adapter``
the drop stage reads, over vLLM's layers:

- ``layers``: per vLLM decoder layer a ``LayerView``: ``input_layernorm`` (the layer's RMSNorm on a flattened
  copy), ``self_attn.q_proj`` / ``k_proj`` (the query and key parts of the layer's own fused ``qkv_proj``, run
  by its own kernel: vLLM's CPU backend packs the weight and drops the plain tensor; the value part is computed
  and discarded), ``head_dim``, ``scaling``;
- ``rope`` / ``layer_rope``: (cos, sin) of the current positions from the layer's own ``rotary_emb`` cache
  (vLLM stores [cos | sin] of half the rotary dimension; neox style doubles them as ``rotate_half`` expects).
  For vLLM's ``MRotaryEmbedding`` (Qwen2-VL / Qwen2.5-VL) the positions are M-RoPE's (3, B, L) T/H/W rows: each
  row's half-dimension cos/sin is read from the same cache, the first ``mrope_section[0]`` frequencies taken from
  the T row, the next ``mrope_section[1]`` from the H row and the last ``mrope_section[2]`` from the W row (vLLM's
  ``MRotaryEmbedding.forward_native``; transformers' Qwen2-VL ``recomposition_frequencies`` does the same on the
  doubled dimension), then doubled;
- ``attention_allowed``: None (causal over the current tokens, as vLLM's decoder attention).

``check_layers`` refuses layers this cannot reproduce (tensor parallelism, per-head query/key norms, partial or
interleaved-pair RoPE, M-RoPE with interleaved T/H/W sections or without sections, and every other multimodal RoPE).
"""

from __future__ import annotations

import torch

MROPE = "MRotaryEmbedding"  # vLLM's M-RoPE class (Qwen2-VL, Qwen2.5-VL) whose cos/sin ``layer_cos_sin`` reproduces


def is_mrope(rotary) -> bool:
    """Whether a vLLM rotary embedding is a multimodal RoPE (``MRotaryEmbedding`` or a subclass: it has sections)."""
    return type(rotary).__name__.startswith("MRotary") or hasattr(rotary, "mrope_section")


def check_layers(layers) -> None:
    """Raise ValueError, naming why, unless every vLLM decoder layer in ``layers`` can serve ``LayerView``."""
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        qkv = getattr(attn, "qkv_proj", None)
        rotary = getattr(attn, "rotary_emb", None)
        problem = None
        name = type(rotary).__name__
        if attn is None or qkv is None or rotary is None or not hasattr(layer, "input_layernorm"):
            problem = "it has no self_attn.qkv_proj, rotary_emb and input_layernorm"
        elif attn.num_heads != attn.total_num_heads:
            problem = "its heads are split by tensor parallelism"
        elif getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            problem = "it normalises queries and keys per head"
        elif not isinstance(getattr(rotary, "cos_sin_cache", None), torch.Tensor):
            problem = f"its RoPE ({name}) has no plain cos/sin cache"
        elif is_mrope(rotary) and name != MROPE:
            problem = f"its multimodal RoPE ({name}) is not vLLM's {MROPE}, the only one reproduced"
        elif not rotary.is_neox_style or rotary.rotary_dim != attn.head_dim:
            problem = "its RoPE rotates interleaved pairs or part of each head"
        elif is_mrope(rotary) and getattr(rotary, "mrope_interleaved", False):
            problem = "its M-RoPE interleaves the T/H/W frequencies (Qwen3-VL style), which is not reproduced"
        elif is_mrope(rotary) and sum(rotary.mrope_section or ()) != rotary.rotary_dim // 2:
            problem = f"its M-RoPE sections {rotary.mrope_section} do not cover half of the rotary dimension"
        if problem is not None:
            raise ValueError(
                f"The vLLM plugin cannot recompute attention rows of decoder layer {i}: {problem} "
                "(supported: Llama- and Qwen2-style layers on one rank, with RoPE or vLLM's M-RoPE)"
            )


class AttentionView:
    """A vLLM attention module as ``v2drop.attention`` reads it: ``q_proj``, ``k_proj``, ``head_dim``, ``scaling``."""

    def __init__(self, attn):
        self.attn = attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling

    def _part(self, x: torch.Tensor, start: int, size: int) -> torch.Tensor:
        """Columns ``start .. start + size`` of the layer's own fused ``qkv_proj`` of ``x`` (..., D).

        The layer's own kernel: vLLM's CPU backend packs the weight for its GEMM and drops the plain tensor.
        """
        out, _ = self.attn.qkv_proj(x.reshape(-1, x.shape[-1]).contiguous())
        return out[:, start : start + size].reshape(*x.shape[:-1], size)

    def q_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The query projection of ``x``: the first ``q_size`` outputs of ``qkv_proj``."""
        return self._part(x, 0, self.attn.q_size)

    def k_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The key projection of ``x``: the ``kv_size`` outputs after the queries'."""
        return self._part(x, self.attn.q_size, self.attn.kv_size)


class LayerView:
    """A vLLM decoder layer as ``v2drop.attention`` reads it: ``input_layernorm``, ``self_attn`` (``AttentionView``)."""

    def __init__(self, layer):
        self.layer = layer
        self.self_attn = AttentionView(layer.self_attn)

    def input_layernorm(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input RMSNorm of ``x`` (..., D), without a residual (vLLM's norm takes 2-D input)."""
        return self.layer.input_layernorm(x.reshape(-1, x.shape[-1]).contiguous()).view(x.shape)


def layer_cos_sin(layer, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (B, L, head_dim) in ``dtype``, of ``position_ids`` from the vLLM layer's RoPE cache:
    (B, L) positions for RoPE; for M-RoPE (``MRotaryEmbedding``) (3, B, L) T/H/W rows, each section of the
    frequencies read at its own row (or (B, L): the same position on every row, as vLLM's text-only positions)."""
    rotary = layer.self_attn.rotary_emb
    position_ids = position_ids.long()
    if is_mrope(rotary):
        if position_ids.dim() == 2:
            position_ids = position_ids.expand(3, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"M-RoPE positions must be (3, B, L) or (B, L), got {tuple(position_ids.shape)}")
    elif position_ids.dim() != 2:
        raise ValueError(f"RoPE positions must be (B, L), got {tuple(position_ids.shape)}")
    cos, sin = rotary.cos_sin_cache.float()[position_ids].chunk(2, dim=-1)  # (B, L, rotary_dim / 2) or (3, ...)
    if is_mrope(rotary):  # frequencies [0, t) from the T row, [t, t + h) from the H row, the rest from the W row
        cos = torch.cat([part[i] for i, part in enumerate(cos.split(rotary.mrope_section, dim=-1))], dim=-1)
        sin = torch.cat([part[i] for i, part in enumerate(sin.split(rotary.mrope_section, dim=-1))], dim=-1)
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)


class StageAdapter:
    """The part of an ``Adapter`` a decoder drop stage reads, over vLLM's decoder ``layers`` and final ``norm``."""

    def __init__(self, layers, norm):
        self.vllm_layers = layers
        self.layers = [LayerView(layer) for layer in layers]
        self.norm = norm
        self.project_vision = None

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The positions ((B, L), or M-RoPE's (3, B, L)) and dtype the layers' RoPE is read at (``layer_rope`` reads
        each layer's own cache)."""
        return position_ids, hidden.dtype

    def layer_rope(self, rope, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of decoder layer ``layer_idx`` at the positions ``rope`` carries (``layer_cos_sin``)."""
        position_ids, dtype = rope
        return layer_cos_sin(self.vllm_layers[layer_idx], position_ids, dtype)

    def layer_type(self, layer_idx: int) -> str:
        """Every layer of the served models attends to all earlier tokens."""
        return "full_attention"

    def attention_allowed(self, layer_idx: int, seq, query_idx: torch.Tensor) -> None:
        """None: causal over the request's current tokens, as vLLM's decoder attention (and padding-free)."""
        return None
