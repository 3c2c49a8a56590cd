"""Simple baselines: random, spatially uniform and positional keep sets (strong in published benchmarks),
and ``given``, an oracle that keeps chosen vision tokens (e.g. a question's evidence)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from v2drop.scorers.base import LayerState, Scorer, register_scorer


@register_scorer("random")
@dataclass
class RandomScorer(Scorer):
    """Uniformly random keep set, reproducible per sample and layer from ``seed``.

    Parameters
    ----------
    seed : int
        Combined with the sample's prompt ids and the layer, so a sample draws the same keep
        set whether it runs alone or in a batch.
    """

    seed: int = 0
    stochastic: ClassVar[bool] = True

    def score(self, state: LayerState) -> torch.Tensor:
        """Uniform draws in [0, 1), one generator per sample seeded from (seed, prompt, layer)."""
        rows = []
        for key in state.sample_keys.tolist():
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + key * 131 + state.layer_idx) % (2**63))
            rows.append(torch.rand(state.vision_idx.shape[1], generator=gen))
        return torch.stack(rows).to(state.hidden.device)


def _trailing_zeros(x: torch.Tensor, cap: int = 30) -> torch.Tensor:
    """Number of trailing zero bits of each entry (``cap`` for 0)."""
    tz = torch.zeros_like(x)
    for bit in range(cap):
        tz += ((x >> bit) & 1 == 0).long() * (tz == bit).long()
    return tz


def _bit_reverse(x: torch.Tensor, bits: int = 12) -> torch.Tensor:
    """Reverse the lowest ``bits`` bits of each entry."""
    out = torch.zeros_like(x)
    for bit in range(bits):
        out |= ((x >> bit) & 1) << (bits - 1 - bit)
    return out


def _interleave(a: torch.Tensor, b: torch.Tensor, bits: int = 12) -> torch.Tensor:
    """Morton code: bits of ``a`` and ``b`` interleaved (``a`` more significant)."""
    out = torch.zeros_like(a)
    for bit in range(bits):
        out |= ((a >> bit) & 1) << (2 * bit + 1) | ((b >> bit) & 1) << (2 * bit)
    return out


_TABLE_SIZE = 1 << 12


@lru_cache(maxsize=1)
def _coordinate_tables() -> dict[str, torch.Tensor]:
    """The bit functions above over every 12-bit value, computed once (a gather per call instead of ~30 small ops)."""
    x = torch.arange(_TABLE_SIZE)
    zero = torch.zeros_like(x)
    return {
        "tz": _trailing_zeros(x),
        "rev12": _bit_reverse(x),
        "rev8": _bit_reverse(x, bits=8),
        "spread": _interleave(zero, x),
    }  # bits of x moved to the even positions


def _lookup(name: str, x: torch.Tensor) -> torch.Tensor:
    """``_coordinate_tables()[name][x]`` on ``x``'s device."""
    return _coordinate_tables()[name].to(x.device)[x]


@register_scorer("uniform")
@dataclass
class UniformScorer(Scorer):
    """A spatially even grid of each image's vision tokens, kept as they are (the ``downsample`` control re-encodes a
    smaller image instead).

    Tokens on coarser lattices of the token grid score higher (stride 16, then 8, 4, 2, 1),
    and within one lattice a bit-reversed order spreads a partial level over the whole image,
    so the top-k of any k is as even a grid as k allows. Frames of a video are treated alike.
    """

    def score(self, state: LayerState) -> torch.Tensor:
        """Coarser lattice first, then a bit-reversed 2-D order, then the frame (see the class docstring)."""
        frame, row, col = state.vision_coords.unbind(-1)  # each (B, V)
        frame = frame.clamp(min=0) & 0xFF  # _bit_reverse(bits=8) reads the lowest 8 bits only
        if int(torch.maximum(row.max(), col.max())) < _TABLE_SIZE:
            level = torch.minimum(_lookup("tz", row), _lookup("tz", col)).clamp(max=15)
            spread = (
                _lookup("spread", _lookup("rev12", row)) << 1 | _lookup("spread", _lookup("rev12", col))
            ).float() / float(1 << 24)
            frame_term = _lookup("rev8", frame).float() / 256.0
        else:  # grids beyond 4096 tokens a side: the bitwise loops
            level = torch.minimum(_trailing_zeros(row), _trailing_zeros(col)).clamp(max=15)
            spread = _interleave(_bit_reverse(row), _bit_reverse(col)).float() / float(1 << 24)
            frame_term = _bit_reverse(frame, bits=8).float() / 256.0
        # level dominates; within a level a 2-D low-discrepancy order, then the frame, decides.
        return (level.float() * 4 - spread * 2 - frame_term * 1e-3).float()


@register_scorer("position")
@dataclass
class PositionScorer(Scorer):
    """Keep the last vision tokens: positional bias in its purest form."""

    def score(self, state: LayerState) -> torch.Tensor:
        """The token's position in the current sequence: later is better."""
        return state.vision_idx.float()


@register_scorer("given")
@dataclass
class GivenScorer(Scorer):
    """An oracle: keep the given vision tokens (e.g. the evidence of a synthetic question).

    Parameters
    ----------
    keep : tuple of int
        Indices (0-based, among the vision tokens present at the stage) that score 1; every other
        token scores 0, so with an absolute count of ``len(keep)`` exactly these survive. The same
        indices apply to every sample of a batch.
    """

    keep: tuple = ()

    def __post_init__(self):
        self.keep = tuple(int(k) for k in self.keep)  # YAML/JSON give lists: keep Method round trips equal

    def score(self, state: LayerState) -> torch.Tensor:
        """1 on the given indices of the current vision tokens, 0 elsewhere."""
        scores = torch.zeros(state.vision_idx.shape, dtype=torch.float32, device=state.vision_idx.device)
        index = torch.tensor([k for k in self.keep if 0 <= k < scores.shape[1]], dtype=torch.long, device=scores.device)
        scores[:, index] = 1.0
        return scores
