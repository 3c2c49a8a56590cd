"""The scorer contract: a scorer turns one layer's state into one score per vision token."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from v2drop.registry import Registry


@dataclass(frozen=True)
class LayerState:
    """What the engine hands a scorer at a drop stage, filled only with what the scorer asks for.

    Shapes use B = batch, L = current sequence length, D = hidden size, V = the largest number of
    vision tokens present in any sample (rows with fewer are padded; see ``vision_valid``).

    Attributes
    ----------
    layer_idx : int
        The decoder layer about to run (tokens are dropped just before it).
    hidden : Tensor (B, L, D)
        Input of layer ``layer_idx`` (the residual stream, before its norm).
    prev_hidden : Tensor (B, L, D) or None
        Input of layer ``layer_idx - 1`` over the same tokens; set when ``needs_prev_hidden``.
    vision_idx : LongTensor (B, V)
        Positions of the vision tokens in the current sequence, ascending; padded with 0.
    vision_valid : BoolTensor (B, V)
        Which entries of ``vision_idx`` are real.
    vision_coords : LongTensor (B, V, 3)
        (image or frame, row, column) of each vision token on its image's token grid.
    orig_idx : LongTensor (B, L)
        Each current token's position in the sample's unpadded prompt (-1 for padding).
    attention_mask : LongTensor (B, L)
        1 for real tokens, 0 for padding.
    attention : Tensor (B, Q, L) float32 or None
        Head-averaged attention probabilities of the requested query rows over all current keys;
        set when ``attention_query`` is not None.
    query_valid : BoolTensor (B, Q) or None
        Which rows of ``attention`` are real.
    sample_keys : LongTensor (B,)
        A per-sample integer derived from the prompt ids, for reproducible per-sample randomness.
    layer : nn.Module
        The decoder layer ``layer_idx``.
    """

    layer_idx: int
    hidden: torch.Tensor
    vision_idx: torch.Tensor
    vision_valid: torch.Tensor
    vision_coords: torch.Tensor
    orig_idx: torch.Tensor
    attention_mask: torch.Tensor
    sample_keys: torch.Tensor
    layer: nn.Module
    prev_hidden: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    query_valid: torch.Tensor | None = None

    def gather_vision(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` (B, L, ...) at the vision tokens: (B, V, ...)."""
        idx = self.vision_idx
        if x.dim() == 3:
            return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return x.gather(-1, idx) if x.dim() == 2 else x.gather(-1, idx[:, None].expand(-1, x.shape[1], -1))


@dataclass
class Scorer:
    """Base class: score every current vision token, higher = keep.

    Subclasses are small dataclasses whose fields are the method's hyperparameters. They declare
    what they need through class variables, and the engine computes only that.

    Class variables
    ---------------
    needs_prev_hidden : bool
        Fill ``LayerState.prev_hidden`` (costs one saved copy of the hidden states).
    attention_query : str or None
        Which attention rows to compute: ``"last_prompt"`` (the last prompt token),
        ``"last_instruction"`` (the last prompt token, as PDrop names it) or ``"raters"`` (the
        positions ``queries`` picks once from the layer-0 embeddings).
    attention_layer_offset : int
        Compute the rows with the projections of layer ``layer_idx + offset`` on that layer's
        input: 0 for the drop layer itself (PDrop), -1 for the layer before (FastV).
    """

    needs_prev_hidden: ClassVar[bool] = False
    attention_query: ClassVar[str | None] = None
    attention_layer_offset: ClassVar[int] = 0

    def score(self, state: LayerState) -> torch.Tensor:
        """Scores (B, V) float32 for ``state.vision_idx``; padded entries are ignored."""
        raise NotImplementedError

    def queries(self, embeds: torch.Tensor, vision: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the query positions (in the layer-0 sequence) of ``attention_query="raters"``."""
        raise NotImplementedError(f"{type(self).__name__} asks for rater rows but does not define queries()")

    def count(self, state: LayerState, sample: int, n: int, scheduled: int) -> int:
        """How many of the ``n`` present vision tokens of ``sample`` to keep (default: the schedule's)."""
        return scheduled

    def merge(self, hidden: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens to insert after the kept vision tokens, built from one sample's dropped ones (default: none).

        Returns the new tokens' hidden states (C, D) and, for each, the index of the dropped token
        whose position ids and grid coordinates it takes.
        """
        return hidden[:0], torch.zeros(0, dtype=torch.long, device=hidden.device)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """Analytic FLOPs of one scoring call (0 unless a scorer says otherwise)."""
        return 0.0

    def check_layer(self, layer_idx: int) -> None:
        """Raise if this scorer cannot run at a stage before ``layer_idx``."""
        if (self.needs_prev_hidden or self.attention_layer_offset < 0) and layer_idx < 1:
            raise ValueError(f"{type(self).__name__} needs the layer before the drop layer; stage layer must be >= 1, got {layer_idx}")


SCORERS: Registry[type[Scorer]] = Registry("scorer", base_cls=Scorer, entry_point_group="v2drop.scorers")


def register_scorer(name: str):
    """Class decorator registering a ``Scorer`` subclass under ``name``."""
    return SCORERS.register(name)


def list_scorers(pattern: str = "*") -> list[str]:
    """Sorted names of the registered scorers matching an fnmatch ``pattern``."""
    return SCORERS.names(pattern)


def build_scorer(name: str, **kwargs: Any) -> Scorer:
    """Instantiate scorer ``name``; None-valued kwargs keep the defaults, unknown ones are an error."""
    cls = SCORERS.get(name)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    unknown = set(kwargs) - fields
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise ValueError(f"Scorer {name!r} has no parameter(s) {sorted(unknown)}; valid parameters: {valid}")
    return cls(**kwargs)
