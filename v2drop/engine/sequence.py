"""The prefill sequence: hidden states with their positions, padding, prompt indices and vision bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Sequence:
    """The current prefill sequence (B = batch, L = current length, left-padded)."""

    hidden: torch.Tensor  # (B, L, D)
    position_ids: torch.Tensor  # (B, L), or (3, B, L) for M-RoPE
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    orig_idx: torch.Tensor  # (B, L) position in the unpadded prompt, -1 for padding
    vision: torch.Tensor  # (B, L) bool
    coords: torch.Tensor  # (B, L, 3) grid coordinates of vision tokens
    block: torch.Tensor  # (B, L) attention block (tokens of one block see each other both ways), -1 for none

    def vision_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) positions of vision tokens (ascending, padded with 0) and their validity mask."""
        counts = self.vision.sum(1)
        width = int(counts.max()) if counts.numel() else 0
        # A stable sort puts vision positions first, in order.
        order = torch.sort((~self.vision).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=counts.device)[None] < counts[:, None]
        return order.masked_fill(~valid, 0), valid

    def select(self, keep: list[torch.Tensor]) -> Sequence:
        """Keep the given positions of each sample (ascending), left-padding to a common length."""
        length = max(int(k.numel()) for k in keep)
        B, device = len(keep), self.hidden.device
        idx = torch.zeros(B, length, dtype=torch.long, device=device)
        mask = torch.zeros(B, length, dtype=self.attention_mask.dtype, device=device)
        for b, k in enumerate(keep):
            if k.numel():
                idx[b, length - k.numel() :] = k
                mask[b, length - k.numel() :] = 1
        pad = mask == 0
        hidden = self.hidden.gather(1, idx[..., None].expand(-1, -1, self.hidden.shape[-1]))
        if self.position_ids.dim() == 3:
            pos = self.position_ids.gather(2, idx[None].expand(self.position_ids.shape[0], -1, -1))
            pos = pos.masked_fill(pad[None], 1)
        else:
            pos = self.position_ids.gather(1, idx).masked_fill(pad, 1)
        return Sequence(
            hidden=hidden,
            position_ids=pos,
            attention_mask=mask,
            orig_idx=self.orig_idx.gather(1, idx).masked_fill(pad, -1),
            vision=self.vision.gather(1, idx) & ~pad,
            coords=self.coords.gather(1, idx[..., None].expand(-1, -1, 3)),
            block=self.block.gather(1, idx).masked_fill(pad, -1),
        )

    def extended(
        self, hidden: torch.Tensor, source: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> Sequence:
        """Append M new vision tokens per sample (``hidden`` (B, M, D)) at the end of the sequence.

        Each takes the position ids, prompt index and grid coordinates of the token at ``source``
        (B, M); ``valid`` (B, M) marks real ones; ``position_ids`` ((B, M), or (3, B, M) for M-RoPE),
        when given, are their position ids instead. ``select`` then puts them where they belong.
        """
        if position_ids is not None:
            pos = position_ids.to(self.position_ids.dtype)
        elif self.position_ids.dim() == 3:
            pos = self.position_ids.gather(2, source[None].expand(self.position_ids.shape[0], -1, -1))
        else:
            pos = self.position_ids.gather(1, source)
        return Sequence(
            hidden=torch.cat([self.hidden, hidden.to(self.hidden.dtype)], dim=1),
            position_ids=torch.cat([self.position_ids, pos], dim=-1),
            attention_mask=torch.cat([self.attention_mask, valid.to(self.attention_mask.dtype)], dim=1),
            orig_idx=torch.cat([self.orig_idx, self.orig_idx.gather(1, source).masked_fill(~valid, -1)], dim=1),
            vision=torch.cat([self.vision, valid], dim=1),
            coords=torch.cat([self.coords, self.coords.gather(1, source[..., None].expand(-1, -1, 3))], dim=1),
            block=torch.cat([self.block, self.block.gather(1, source).masked_fill(~valid, -1)], dim=1),
        )

    def renumbered(self) -> Sequence:
        """The same tokens with contiguous positions 0..n-1 per sample (official PDrop policy)."""
        mask = self.attention_mask.long()
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if self.position_ids.dim() == 3:
            pos = pos[None].expand(self.position_ids.shape[0], -1, -1)
        return replace(self, position_ids=pos)

    def next_positions(self) -> torch.Tensor:
        """(B,) the position a first new token gets: one past the largest real position."""
        pos = self.position_ids if self.position_ids.dim() == 3 else self.position_ids[None]
        real = self.attention_mask.bool()[None].expand_as(pos)
        return pos.masked_fill(~real, -1).amax(dim=(0, 2)) + 1


@dataclass
class Segment:
    """Consecutive decoder layers that saw the same tokens (between two drop stages)."""

    first_layer: int
    attention_mask: torch.Tensor  # (B, L_segment) padding mask of these layers' caches
    next_positions: torch.Tensor  # (B,) decode positions start here
    orig_idx: torch.Tensor  # (B, L_segment) prompt index of each token, -1 for padding
    block: torch.Tensor  # (B, L_segment) attention block of each token (``Sequence.block``)

    def keys(self, prompt_length: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt index, attention block) of these layers' keys after ``steps`` decoded tokens, each (B, L + steps).

        A decoded token's index continues its sample's prompt (``prompt_length`` (B,) + step); it is in no block.
        """
        new = prompt_length[:, None].to(self.orig_idx.dtype) + torch.arange(steps, device=self.orig_idx.device)
        return torch.cat([self.orig_idx, new], 1), torch.cat([self.block, torch.full_like(new, -1)], 1)


def mask_for(adapter, layer_idx, hidden, mask2d, cache, memo, first_layer, index, block):
    """The 4-D mask for ``layer_idx``, from the adapter, sized from that layer's own cache; one per segment and type.

    ``index`` and ``block`` (B, K) are the prompt indices and attention blocks of the keys (aligned with ``mask2d``);
    the queries are the last ``hidden.shape[1]`` of them.
    """
    kind = adapter.layer_type(layer_idx)
    if (first_layer, kind) not in memo:
        memo[first_layer, kind] = adapter.attention_mask(kind, layer_idx, hidden, mask2d, cache, index, block)
    return memo[first_layer, kind]


def segment_of_layers(segments: list[Segment], depth: int) -> list[int]:
    """Index of the segment each decoder layer belongs to."""
    firsts = [s.first_layer for s in segments]
    return [max(i for i, f in enumerate(firsts) if f <= layer_idx) for layer_idx in range(depth)]
