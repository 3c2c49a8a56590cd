"""Controls: fewer vision tokens without choosing any: pooled (``pool``) or from a smaller image (``downsample``).

Both replace each image's tokens by a smaller token grid with the image's aspect (``target_grid``),
placed where the cells' centre tokens were (``Selection.added_at_source``). Definitions and why
they are controls: ``docs/methods.md`` (Controls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Scorer, Selection, register_scorer


def target_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """The token grid a ``rows`` × ``cols`` grid becomes under a budget of ``k`` tokens.

    ``h = ⌊√(k · rows / cols)⌋`` and ``w = ⌊k / h⌋``, each between 1 and the grid's own side (the
    aspect kept to within one row, as many of the ``k`` tokens used as a grid allows); (0, 0) for
    ``k`` = 0 and the grid itself when ``k`` covers it. On LLaVA-1.5's 24 × 24: 192 → 13 × 14 = 182,
    128 → 11 × 11 = 121, 64 → 8 × 8.
    """
    if k >= rows * cols:
        return rows, cols
    if k <= 0:
        return 0, 0
    h = min(rows, max(1, math.isqrt(k * rows // cols)))
    return h, min(cols, max(1, k // h))


def proportional_share(k: int, sizes: list[int]) -> list[int]:
    """``k`` shared over groups of ``sizes`` tokens in proportion to their sizes (largest remainders, ties to the
    earlier group, get the tokens left over)."""
    total = sum(sizes)
    base = [k * n // total for n in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(k * sizes[i] % total), i))
    for i in order[: k - sum(base)]:
        base[i] += 1
    return base


def centres(n: int, m: int) -> torch.Tensor:
    """(m,) the centre index ``⌊(2i + 1) · n / 2m⌋`` of each of ``m`` adaptive-pooling windows over ``n`` entries."""
    return (2 * torch.arange(m) + 1) * n // (2 * m)


def grid_of(coords: torch.Tensor) -> tuple[int, int] | None:
    """(rows, cols) when the tokens' (row, col) ``coords`` (n, 2) fill a grid in raster order (the image's own, or
    the smaller one a previous pool left), else None."""
    rows, r = torch.unique(coords[:, 0], return_inverse=True)
    cols, c = torch.unique(coords[:, 1], return_inverse=True)
    R, C = len(rows), len(cols)
    if R * C != len(coords) or not torch.equal(r * C + c, torch.arange(len(coords), device=coords.device)):
        return None
    return R, C


def pool_tokens(x: torch.Tensor, grid: tuple[int, int] | None, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Average pooling of a group's tokens ``x`` (n, D) and the index of each output's centre token.

    On a ``grid`` (rows, cols), 2-D adaptive average pooling to ``target`` (h, w) (cell ``(i, j)``
    averages rows ``⌊i·R/h⌋ … ⌈(i+1)·R/h⌉ − 1`` and the columns alike; ``torch``'s
    ``adaptive_avg_pool2d``), in raster order; without one, 1-D over the tokens' order to ``h · w``.
    Returns ((h·w, D) float32, (h·w,) indices into ``x``).
    """
    h, w = target
    x = x.float()
    if grid is None:
        m = h * w
        pooled = F.adaptive_avg_pool1d(x.T[None], m)[0].T
        return pooled, centres(len(x), m).to(x.device)
    R, C = grid
    pooled = F.adaptive_avg_pool2d(x.T.reshape(1, -1, R, C), (h, w)).reshape(x.shape[1], h * w).T
    idx = centres(R, h)[:, None] * C + centres(C, w)[None]
    return pooled, idx.flatten().to(x.device)


def plan(state: LayerState, b: int, n: int, k: int) -> list[tuple[torch.Tensor, tuple | None, tuple]]:
    """Per image (frame, tile) of sample ``b``: its token indices, its grid (``grid_of``) and its target grid.

    The ``k`` tokens are shared in proportion to the groups' sizes; a group's target is
    ``target_grid`` of its grid, or (1, its share) where it has none (pooled in 1-D).
    """
    groups = state.vision_coords[b, :n, 0]
    ids = groups.unique().tolist()
    members = [(groups == g).nonzero().flatten() for g in ids]
    out = []
    for idx, k_group in zip(members, proportional_share(k, [len(m) for m in members])):
        grid = grid_of(state.vision_coords[b, idx, 1:])
        # a group without a grid is pooled in 1-D: a 1 x k "grid" of whatever count it gets
        target = target_grid(*grid, k_group) if grid is not None else (1, min(len(idx), k_group))
        out.append((idx, grid, target))
    return out


def _empty(state: LayerState) -> tuple[torch.Tensor, torch.Tensor]:
    device = state.hidden.device
    return state.hidden.new_zeros(0, state.hidden.shape[-1], dtype=torch.float32), torch.zeros(
        0, dtype=torch.long, device=device
    )


@register_scorer("pool")
@dataclass
class PoolScorer(Scorer):
    """Average pooling of each image's vision tokens to a smaller grid (a control: every token contributes, none is
    chosen).

    At a stage keeping k of n tokens, each image (video frame, InternVL tile) gets a share of k in
    proportion to its tokens, and its tokens (the current hidden states: at the pre-LLM stage the
    projected features) are average-pooled to ``target_grid`` of its token grid (``pool_tokens``).
    A pooled token takes the place, position ids and grid coordinates of its cell's centre token.
    Where an image's tokens do not fill a grid (LLaVA-NeXT's anyres layout with newline tokens, or
    tokens another stage thinned), they are pooled in 1-D over their order. An image whose share
    covers its tokens keeps them as they are. Runs at any stage.
    """

    def score(self, state: LayerState) -> torch.Tensor:
        """Zeros (B, V): pooling ranks nothing."""
        return torch.zeros(state.vision_idx.shape, dtype=torch.float32, device=state.hidden.device)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, every image pooled to its target grid (see the class docstring)."""
        keep, added_hidden, added_source = [], [], []
        for b, (n, k) in enumerate(zip(state.vision_valid.sum(1).tolist(), counts)):
            hidden, source = _empty(state)
            kept = [torch.zeros(0, dtype=torch.long, device=scores.device)]
            if k >= n:
                kept.append(torch.arange(n, device=scores.device))
            else:
                feats = state.hidden[b, state.vision_idx[b, :n]]
                for idx, grid, target in plan(state, b, n, k):
                    if target[0] * target[1] >= len(idx):
                        kept.append(idx)
                    elif target[0] * target[1] > 0:
                        pooled, centre = pool_tokens(feats[idx], grid, target)
                        hidden = torch.cat([hidden, pooled])
                        source = torch.cat([source, idx[centre]])
            keep.append(torch.cat(kept).sort().values)
            added_hidden.append(hidden)
            added_source.append(source)
        return Selection(keep=keep, added_hidden=added_hidden, added_source=added_source, added_at_source=True)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The averages: one addition per token and channel."""
        return float(n_vision * hidden)


@register_scorer("downsample")
@dataclass
class DownsampleScorer(Scorer):
    """The image itself made smaller: the vision tower run on each image resized to a smaller token grid (a control:
    fewer tokens enter the LLM, all of them kept).

    At the pre-LLM stage keeping k of n tokens, each image gets a share of k in proportion to its
    tokens and its token grid becomes ``target_grid`` of it; the model's own vision tower and
    projector run on the image's pixels resized to that grid (``Adapter.reencode``: LLaVA-1.5's CLIP
    with interpolated position embeddings) and their tokens replace the image's, each at the place
    of its cell's centre token. An image whose share covers its tokens keeps them as they are.
    Families whose processor sets the token count (anyres tiles, dynamic resolution) refuse.
    """

    needs_reencode = True

    def score(self, state: LayerState) -> torch.Tensor:
        """Zeros (B, V): downsampling ranks nothing."""
        return torch.zeros(state.vision_idx.shape, dtype=torch.float32, device=state.hidden.device)

    def check_layer(self, layer_idx: int) -> None:
        """Only the pre-LLM stage: a smaller image's tokens are LLM inputs, not any decoder layer's hidden states."""
        if layer_idx >= 0:
            raise ValueError(
                "downsample replaces each image by the vision tower's tokens of a smaller image, which are LLM inputs: "
                f"it runs at the pre_llm stage only, not before decoder layer {layer_idx}"
            )

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, every image re-encoded at its target grid (see the class docstring)."""
        plans, grids = [], []
        for b, (n, k) in enumerate(zip(state.vision_valid.sum(1).tolist(), counts)):
            groups = plan(state, b, n, k) if k < n else []
            plans.append(groups)
            grids.append([t if g is not None and 0 < t[0] * t[1] < len(idx) else None for idx, g, t in groups])
        features = state.reencode(grids) if any(plans) else grids  # the family refuses here if it cannot
        for idx, grid, _target in (group for groups in plans for group in groups):
            if grid is None:
                raise ValueError(
                    "downsample needs each image's tokens on a full grid at the pre_llm stage; an image here has "
                    f"{len(idx)} tokens that fill none"
                )
        keep, added_hidden, added_source = [], [], []
        for b, (groups, feats) in enumerate(zip(plans, features)):
            hidden, source = _empty(state)
            kept = [torch.zeros(0, dtype=torch.long, device=scores.device)]
            if not groups:
                kept.append(torch.arange(int(state.vision_valid[b].sum()), device=scores.device))
            for (idx, (R, C), (h, w)), f in zip(groups, feats):
                if f is None:
                    if h * w >= len(idx):
                        kept.append(idx)
                    continue
                if f.shape[0] != h * w:
                    raise ValueError(f"reencode gave {f.shape[0]} tokens for a {h}x{w} grid")
                centre = centres(R, h)[:, None] * C + centres(C, w)[None]
                hidden = torch.cat([hidden, f.to(hidden.device)])
                source = torch.cat([source, idx[centre.flatten().to(idx.device)]])
            keep.append(torch.cat(kept).sort().values)
            added_hidden.append(hidden)
            added_source.append(source)
        return Selection(keep=keep, added_hidden=added_hidden, added_source=added_source, added_at_source=True)
