"""Frame-level controls for video methods at the same token budget: whole frames sampled uniformly (``frames``), and
every frame average-pooled to its share (``frame_pool``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2drop.benchmarks.media import frame_indices
from v2drop.scorers.base import LayerState, Scorer, Selection, register_scorer
from v2drop.scorers.vispruner import share, token_groups


def frame_members(state: LayerState, b: int) -> tuple[int, list[torch.Tensor], torch.Tensor]:
    """(n, per frame the ascending indices of its tokens, indices of sample ``b``'s tokens of no frame)."""
    n = int(state.vision_valid[b].sum())
    groups = token_groups(state, b, n)
    ids = groups.unique()
    members = [(groups == i).nonzero().flatten() for i in ids[ids >= 0].tolist()]
    return n, members, (groups < 0).nonzero().flatten()


@register_scorer("frames")
@dataclass
class FramesScorer(Scorer):
    """Uniform frame sampling at the token budget: whole frames, spread evenly, every token of each kept.

    With a count of k of a sample's n frame tokens in F frames, ``m = round(k · F / n)`` frames stay
    (at least 1): those ``v2drop.benchmarks.media.frame_indices(F, m)`` picks, the rule the video
    benchmarks sample frames from a clip with. Tokens of no frame (OneVision's video newline) stay, on top
    of the count. The
    kept count is m whole frames, so it meets the budget only where k is a multiple of the frame's
    tokens. Scores are all 0: the choice is ``select``'s. The vision encoder still sees every frame.
    """

    def score(self, state: LayerState) -> torch.Tensor:
        """Zeros (B, V): the kept frames depend only on the count (see ``select``)."""
        return torch.zeros(state.vision_idx.shape, device=state.hidden.device)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, every token of ``m`` uniformly spaced frames and every token of no frame."""
        keep = []
        for b, k in enumerate(counts):
            n, frames, others = frame_members(state, b)
            if k >= n or not frames:
                keep.append(torch.arange(n, device=scores.device))
                continue
            n_frame = sum(len(f) for f in frames)
            m = min(len(frames), max(1, round(k * len(frames) / n_frame)))
            chosen = [frames[i] for i in frame_indices(len(frames), m)]
            keep.append(torch.cat([*chosen, others]).sort().values)
        return Selection(keep=keep)


def pooled_grid(count: int, rows: int, cols: int) -> tuple[int, int]:
    """The (rows, columns) of at most ``count`` cells, each at most the grid's, with the most cells; ties: the shape
    closest to the grid's aspect ratio."""
    best = (1, 1)
    for r in range(1, rows + 1):
        c = min(cols, count // r)
        if c < 1:
            break
        key = (r * c, -abs(r / c - rows / cols))
        if key > (best[0] * best[1], -abs(best[0] / best[1] - rows / cols)):
            best = (r, c)
    return best


def pool_frame(hidden: torch.Tensor, coords: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (c, D), source (c,)): one frame's tokens ``hidden`` (n, D) at ``coords`` (n, 2) average-pooled to at
    most ``count`` tokens.

    A full row-major grid is pooled in 2-D (``F.adaptive_avg_pool2d`` to ``pooled_grid``); anything
    else (a frame already thinned) in raster order (``adaptive_avg_pool1d`` to ``count``). A pooled
    token's source (whose position it takes) is the first token of its cell, an index into the frame.
    """
    n = hidden.shape[0]
    rows, cols = int(coords[:, 0].max()) + 1, int(coords[:, 1].max()) + 1
    grid = rows * cols == n and bool(
        (coords[:, 0] * cols + coords[:, 1] == torch.arange(n, device=coords.device)).all()
    )
    x = hidden.float()
    if grid:
        r, c = pooled_grid(count, rows, cols)
        pooled = F.adaptive_avg_pool2d(x.T.reshape(1, -1, rows, cols), (r, c))[0].flatten(1).T
        starts_r = [(i * rows) // r for i in range(r)]
        starts_c = [(j * cols) // c for j in range(c)]
        source = torch.tensor([a * cols + b for a in starts_r for b in starts_c], device=hidden.device)
    else:
        c = min(count, n)
        pooled = F.adaptive_avg_pool1d(x.T[None], c)[0].T
        source = torch.tensor([(i * n) // c for i in range(c)], device=hidden.device)
    return pooled.to(hidden.dtype), source


@register_scorer("frame_pool")
@dataclass
class FramePoolScorer(Scorer):
    """Per-frame average pooling to the budget: every frame's tokens pooled on its grid to an equal share of the count.

    With a count of k, the frames share k equally (the first frames one more when it does not
    divide, ``share``) and each is average-pooled to the largest grid of at most its share
    (``pool_frame``); so the kept count is at most k. The pooled tokens replace the frame's tokens, in
    frame order where the sample's vision tokens begin, each at the position of its cell's first token;
    tokens of no frame (OneVision's video newline) follow unchanged, on top of the count. Scores are all 0.
    """

    def score(self, state: LayerState) -> torch.Tensor:
        """Zeros (B, V): pooling keeps no token by score (see ``select``)."""
        return torch.zeros(state.vision_idx.shape, device=state.hidden.device)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, no original token kept; pooled tokens (and the tokens of no frame) added in their place."""
        keep, added_hidden, added_source = [], [], []
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        for b, k in enumerate(counts):
            n, frames, others = frame_members(state, b)
            if k >= n or not frames:
                keep.append(torch.arange(n, device=scores.device))
                added_hidden.append(state.hidden.new_zeros(0, state.hidden.shape[-1]))
                added_source.append(empty)
                continue
            k_frames = max(len(frames), min(k, sum(len(f) for f in frames)))
            hidden, source = [], []
            for members, k_f in zip(frames, share(k_frames, len(frames))):
                h = state.hidden[b, state.vision_idx[b, members]]
                pooled, src = pool_frame(h, state.vision_coords[b, members, 1:], max(1, k_f))
                hidden.append(pooled)
                source.append(members[src])
            hidden.append(state.hidden[b, state.vision_idx[b, others]])
            source.append(others)
            keep.append(empty)
            added_hidden.append(torch.cat(hidden))
            added_source.append(torch.cat(source))
        return Selection(keep=keep, added_hidden=added_hidden, added_source=added_source)
