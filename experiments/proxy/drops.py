"""Vision-token drops during training, and the per-layer attention masks that apply them.

Half of the training conversations lose vision tokens before decoder layer 1 or 2 and are
answered as if the dropped tokens had never been there, so the model reads the image after
layer 2, as the validity bar requires, and does not derail when only a few tokens survive. The
drops are not any method's choice of tokens: they change the test bed for every method alike.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from experiments.proxy.model import VISION_TOKENS
from v2drop.benchmarks.digits import PATCHES

BLOCK = 4  # side of a dropout block, in patches
DROP_KINDS = ("tokens", "blocks", "objects")  # the drop shapes ``draw_drop`` knows


@dataclass
class VisionDrop:
    """A training-time drop: vision tokens (0-based, raster order) removed before decoder layer ``layer``."""

    layer: int  # decoder layer the drop happens before
    kept: torch.Tensor  # (256,) bool; (frames * 256,) for a clip


def block_keep_mask(share: float, generator: torch.Generator) -> torch.Tensor:
    """Which of the 256 vision tokens (raster order) survive block dropout: the tokens of a random ``share`` (at least
    one) of the aligned ``BLOCK``×``BLOCK``-patch blocks.

    Content-blind like token dropout, but it also shows the model inputs where the kept tokens
    cluster in a few regions with little background around them (token dropout almost never
    does); without it, keeping only a question's evidence tokens derailed the model (it answered
    the wrong kind of word) while keeping as many random tokens did not.
    """
    per_side = PATCHES // BLOCK
    blocks = torch.randperm(per_side * per_side, generator=generator)[: max(1, round(per_side * per_side * share))]
    kept = torch.zeros(per_side, per_side, dtype=torch.bool)
    kept.view(-1)[blocks] = True
    return kept.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1).flatten()


def token_keep_mask(share: float, generator: torch.Generator) -> torch.Tensor:
    """Which of the 256 vision tokens survive plain token dropout: a random ``share`` of them (at least one)."""
    kept = torch.zeros(VISION_TOKENS, dtype=torch.bool)
    kept[torch.randperm(VISION_TOKENS, generator=generator)[: max(1, int(VISION_TOKENS * share))]] = True
    return kept


def check_drop_settings(keep, kinds: dict) -> None:
    """Raise ValueError unless ``keep`` is [low, high] with 0 < low <= high <= 1 and ``kinds`` names one or more known
    drop shapes.
    """
    if keep is None or len(keep) != 2 or not 0 < keep[0] <= keep[1] <= 1:
        raise ValueError(
            f"token_keep must be [low, high] with 0 < low <= high <= 1, got {None if keep is None else list(keep)}"
        )
    unknown = set(kinds) - set(DROP_KINDS)
    if unknown or not kinds:
        raise ValueError(
            f"Unknown drop kinds {sorted(unknown) if unknown else '(none given)'}; known: {list(DROP_KINDS)}"
        )


def draw_shape(rng: random.Random, keep, kinds: dict) -> tuple[float, torch.Generator, str]:
    """A drop's kept share (log-uniform in ``keep``), the generator of its token masks, and its shape (``kinds``: name
    -> weight).
    """
    names, weights = zip(*kinds.items())
    share = math.exp(rng.uniform(math.log(keep[0]), math.log(keep[1])))
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    return share, generator, rng.choices(names, weights)[0]


def shape_mask(
    kind: str, share: float, generator: torch.Generator, objects, rng: random.Random, background: bool, keep_all: bool
) -> torch.Tensor:
    """The kept tokens of one image under a drop of shape ``kind``.

    ``objects``: every object kept whole or dropped whole (all kept if ``keep_all``, else each with
    even odds from ``rng``), the background kept at ``share`` if ``background``, else dropped.
    """
    if kind != "objects":
        return (block_keep_mask if kind == "blocks" else token_keep_mask)(share, generator)
    kept = token_keep_mask(share, generator) if background else torch.zeros(VISION_TOKENS, dtype=torch.bool)
    for o in objects:
        kept[o.evidence()] = keep_all or rng.random() < 0.5
    return kept


def draw_drop(
    objects, rng: random.Random, keep, kinds: dict, layers, all_objects: float = 0.0
) -> tuple[VisionDrop, list] | None:
    """A training drop and the objects that keep at least one token, or None when ten draws leave no object visible.

    Shapes (``kinds``: name -> weight), each with a kept share drawn log-uniformly from ``keep`` =
    [low, high] (small shares, where whole objects vanish, are common): ``tokens``, single tokens;
    ``blocks``, whole 4×4-patch blocks; ``objects``, every object kept whole or dropped whole
    (even odds; with probability ``all_objects`` every object is kept) and, half of the time, no
    background at all (else that share of it) — what a pruner that keeps only the evidence leaves
    (all objects and no background is the evidence of a count question). The conversation's
    questions are drawn from the whole scene and answered as if only the visible objects were
    there (``image_questions(visible=...)``: "Is there a 7?" is "no" when the 7 lost every token):
    from ``layer`` on, the model must answer as if the dropped tokens had never been there. This
    teaches it to read the image *after* that layer: information the first layers gathered from a
    token that is later dropped is worthless (a from-scratch decoder otherwise reads the answer in
    layer 0, and no token dropping at layer >= 1 could ever cost it accuracy).
    """
    check_drop_settings(keep, kinds)
    for _ in range(10):
        share, generator, kind = draw_shape(rng, keep, kinds)
        background = kind == "objects" and rng.random() < 0.5
        keep_all = kind == "objects" and all_objects > 0 and rng.random() < all_objects
        kept = shape_mask(kind, share, generator, objects, rng, background, keep_all)
        visible = [o for o in objects if kept[o.evidence()].any()]
        if visible:
            return VisionDrop(rng.choice(list(layers)), kept), visible
    return None


def layer_masks(base: torch.Tensor, dropped: list[tuple[int, torch.Tensor]], depth: int) -> list[torch.Tensor]:
    """Per decoder layer, ``base`` (B, 1, L, L additive) with the columns of each sample's dropped tokens closed from
    its drop layer on.

    ``dropped[k]`` = (layer, positions) for sample k. Closing a token's column from layer l on is
    the same as removing its hidden state before layer l, as the engine does, with positions
    kept; a dropped token still sees itself, so no row is empty.
    """
    masks, current = [], base
    for i in range(depth):
        hit = [(k, pos) for k, (layer, pos) in enumerate(dropped) if layer == i and len(pos)]
        if hit:
            current = current.clone()
            for k, pos in hit:
                diagonal = current[k, 0, pos, pos].clone()
                current[k, 0, :, pos] = torch.finfo(current.dtype).min
                current[k, 0, pos, pos] = diagonal
        masks.append(current)
    return masks


def drop_masks(ids: torch.Tensor, image_id: int, drops: list, base: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """``layer_masks`` for a padded batch: each sample's ``VisionDrop`` (or None) located among its ``image_id``
    tokens."""
    dropped = []
    for k, drop in enumerate(drops):
        vision = (ids[k] == image_id).nonzero().flatten()
        dropped.append((drop.layer, vision[~drop.kept]) if drop else (-1, vision[:0]))
    return layer_masks(base, dropped, depth)
