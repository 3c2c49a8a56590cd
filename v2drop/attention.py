"""Attention probabilities computed from a layer's own projections, so scoring never needs eager attention."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE helper shared by Llama, Qwen2 and Qwen2-VL: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def layer_keys(layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, H_kv, L, head_dim) the post-RoPE keys ``layer`` computes (and caches) from its input ``hidden``.

    ``input_layernorm``, ``k_proj``, the per-head ``k_norm`` where the layer has one, RoPE: as the layer's attention.
    """
    attn = layer.self_attn
    B, L, _ = hidden.shape
    k = attn.k_proj(layer.input_layernorm(hidden)).view(B, L, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    cos, sin = rope
    return k * cos[:, None] + rotate_half(k) * sin[:, None]


def attention_probabilities(
    layer: nn.Module,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    query_idx: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head attention probabilities of some query rows (or all) of ``layer`` over all keys.

    Applies the layer's ``input_layernorm``, ``q_proj``/``k_proj`` (with their biases), the
    per-head ``q_norm``/``k_norm`` where the layer has them, RoPE,
    grouped-query head sharing, the logit soft-capping where the layer has it, the causal mask and
    padding (or the family's own mask, ``allowed``), then softmax in float32, exactly as the layer's
    eager attention would for those rows.

    Parameters
    ----------
    layer : nn.Module
        A decoder layer with ``input_layernorm`` and ``self_attn.{q_proj,k_proj,head_dim,scaling}``.
    hidden : Tensor (B, L, D)
        The layer's input.
    rope : (cos, sin), each (B, L, head_dim)
    attention_mask : Tensor (B, L)
        1 for real tokens.
    query_idx : LongTensor (B, Q), optional
        Query positions in the current sequence; None = every position (the full (B, H, L, L)
        map, with the memory cost of an eager attention layer).
    allowed : BoolTensor (B, Q, L), optional
        Which keys each query row attends to (``Adapter.attention_allowed``); None = causal and padding.

    Returns
    -------
    Tensor (B, H, Q, L) float32
    """
    attn = layer.self_attn
    B, L, _ = hidden.shape
    head_dim = attn.head_dim
    if query_idx is None:
        query_idx = torch.arange(L, device=hidden.device).expand(B, L)
    normed = layer.input_layernorm(hidden)
    q_in = normed.gather(1, query_idx[..., None].expand(-1, -1, normed.shape[-1]))  # (B, Q, D)
    q = attn.q_proj(q_in).view(B, q_in.shape[1], -1, head_dim)
    k = attn.k_proj(normed).view(B, L, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # per-head RMSNorm before RoPE (Qwen3, Gemma 3)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, Q, hd), (B, Hkv, L, hd)
    cos, sin = rope
    q_cos = cos.gather(1, query_idx[..., None].expand(-1, -1, head_dim))[:, None]
    q_sin = sin.gather(1, query_idx[..., None].expand(-1, -1, head_dim))[:, None]
    q = q * q_cos + rotate_half(q) * q_sin
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, L, hd)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # (B, H, Q, L)
    softcap = getattr(attn, "attn_logit_softcapping", None)
    if softcap is not None:  # Gemma 2
        logits = torch.tanh(logits / softcap) * softcap
    if allowed is None:
        key_pos = torch.arange(L, device=hidden.device)
        allowed = (key_pos[None, None] <= query_idx[..., None]) & attention_mask.bool()[:, None]  # (B, Q, L)
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return logits.softmax(dim=-1)


def attention_rows(
    layer: nn.Module,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    query_idx: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged ``attention_probabilities`` of the ``query_idx`` (B, Q) rows: (B, Q, L) float32."""
    return attention_probabilities(layer, hidden, rope, attention_mask, query_idx, allowed).mean(dim=1)
