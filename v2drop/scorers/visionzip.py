"""VisionZip: dominant tokens by the vision tower's [CLS] attention, the rest merged into contextual tokens.

Official code: ``dvlab-research/VisionZip``, ``visionzip/clip_encoder.py`` (lines 43-85) and
``visionzip/utils.py`` (the head-averaged keys, line 89); ``visionzip/main.py`` line 7 (the
dominant count includes the [CLS] token); LLaVA-NeXT per crop: ``visionzip/llava_arch.py`` (lines
94-121 and ``restore_image_features_sorted``, lines 42-80). Read at commit
3151f6df4fca36a4cd1c985e5956e725b1f9ad02. Definition and differences: ``docs/methods.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from v2drop.scorers.base import LayerState, Scorer, Selection, VisionRequest, register_scorer, select_keep


@register_scorer("visionzip")
@dataclass
class VisionZipScorer(Scorer):
    """VisionZip (Yang et al., CVPR 2025) at a stage keeping k vision tokens.

    Of the k, ``c = round(k · contextual_ratio)`` are contextual and ``k − c`` dominant. At the
    pre-LLM stage the dominant ones are each image's [CLS] token (projected) plus the patches the
    [CLS] attends to most (heads summed) at the tower's feature-selection layer; at a later stage
    only patches. The remaining patches, in order, give ``c`` evenly spaced targets; every other
    remaining patch joins the target whose head-averaged key is most cosine-similar, and a
    contextual token is the target's hidden state plus the mean of the hidden states that joined it.

    On LLaVA-NeXT every crop (the base image and each anyres tile) is zipped on its own with an
    equal share of k, and the image_newline tokens go (``zip_crops``), as the official code does.

    Needs a vision tower with a [CLS] token (the CLIP of LLaVA-1.5 and LLaVA-NeXT): OneVision
    (SigLIP) and Qwen2-VL / 2.5-VL are refused.

    Parameters
    ----------
    contextual_ratio : float
        Share of the kept tokens that are contextual: 10/64 gives the official 54+10, 108+20 and
        162+30 for 64, 128 and 192 tokens.
    merge_space : {"projected", "tower"}
        Where a contextual token is merged. ``projected``: from the projected features (the LLM's
        inputs at the pre-LLM stage, the current hidden states at a decoder stage). ``tower``: as
        the official code, from the tower's features at the selection layer, then passed through
        the model's projector (a 2-layer MLP on LLaVA, so the two differ); pre-LLM stage only.
    order : {"kept_first", "official"}
        Where the added tokens go in the sequence. ``kept_first``: all after the sample's last kept
        vision token ([CLS], then the contextual tokens). ``official``: as the official code builds
        each image's features, [CLS] right before the image's first patch, the dominant patches in
        index order, then the contextual tokens in target order (on LLaVA-NeXT the base crop so, then
        the tiles' dominant patches, every tile's [CLS], every tile's contextual tokens).
    """

    contextual_ratio: float = 10 / 64
    merge_space: Literal["projected", "tower"] = "projected"
    order: Literal["kept_first", "official"] = "kept_first"

    def __post_init__(self):
        if not 0.0 <= self.contextual_ratio <= 1.0:
            raise ValueError(f"visionzip contextual_ratio must be in [0, 1], got {self.contextual_ratio}")
        if self.merge_space not in ("projected", "tower"):
            raise ValueError(f"visionzip merge_space must be 'projected' or 'tower', got {self.merge_space!r}")
        if self.order not in ("kept_first", "official"):
            raise ValueError(f"visionzip order must be 'kept_first' or 'official', got {self.order!r}")

    def vision_request(self) -> VisionRequest:
        """[CLS] attention (dominant), keys (contextual assignment), projected [CLS] tokens and, to merge in the
        tower's space, the tower's features."""
        return VisionRequest(cls_attention=True, keys=True, cls_embeds=True, features=self.merge_space == "tower")

    def score(self, state: LayerState) -> torch.Tensor:
        """The head-summed [CLS] attention on each vision token, (B, V) float32."""
        return state.vision.cls_attention.float()

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Dominant tokens kept, [CLS] and contextual tokens added (see the class docstring)."""
        if self.merge_space == "tower" and state.layer_idx >= 0:
            raise ValueError(
                "visionzip merge_space='tower' builds LLM inputs from tower features: it runs at the pre_llm stage "
                f"only, not before decoder layer {state.layer_idx}; use merge_space='projected' there"
            )
        keep, added_hidden, added_source, added_place = [], [], [], []
        D = state.hidden.shape[-1]
        crops = state.vision.crops if state.vision is not None else None
        for b, (n, k) in enumerate(zip(state.vision_valid.sum(1).tolist(), counts)):
            hidden = state.hidden.new_zeros(0, D, dtype=torch.float32)
            source = torch.zeros(0, dtype=torch.long, device=scores.device)
            if k >= n:  # nothing to drop: keep every token as it is
                keep.append(torch.arange(n, device=scores.device))
                added_hidden.append(hidden)
                added_source.append(source)
                added_place.append(source)
                continue
            if crops is not None:
                kept, hidden, source, place = self.zip_crops(state, b, scores[b, :n], k, crops[b, :n])
                keep.append(kept)
                added_hidden.append(hidden)
                added_source.append(source)
                added_place.append(place)
                continue
            contextual = min(math.floor(k * self.contextual_ratio + 0.5), k)
            cls = state.vision.cls_embeds[b] if state.layer_idx < 0 and state.vision.cls_embeds is not None else None
            n_cls = min(len(cls), k - contextual) if cls is not None else 0
            dominant = select_keep(scores[b, :n], k - contextual - n_cls)
            rest = torch.ones(n, dtype=torch.bool, device=scores.device)
            rest[dominant] = False
            rest = rest.nonzero().flatten()
            contextual = min(contextual, len(rest))
            if n_cls:
                images = state.vision_coords[b, :n, 0]
                firsts = torch.stack([(images == i).nonzero()[0, 0] for i in images.unique()[:n_cls]])
                hidden = torch.cat([hidden, cls[:n_cls].float()])
                source = torch.cat([source, firsts])
            if contextual:
                merged, targets = self.contextual_tokens(state, b, rest, contextual)
                hidden = torch.cat([hidden, merged])
                source = torch.cat([source, targets])
            keep.append(dominant)
            added_hidden.append(hidden)
            added_source.append(source)
            # official: [CLS] right before its image's first patch, contextual tokens after the last vision token
            added_place.append(torch.cat([source[:n_cls], torch.full_like(source[n_cls:], n)]))
        official = self.order == "official"
        return Selection(
            keep=keep,
            added_hidden=added_hidden,
            added_source=added_source,
            added_place=added_place if official else None,
        )

    def contextual_tokens(
        self, state: LayerState, b: int, rest: torch.Tensor, contextual: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``contextual`` tokens merged from the vision tokens ``rest`` (ascending indices into
        ``state.vision_idx[b]``).

        Every ``⌊len(rest) / contextual⌋``-th of them is a target; every other one joins the
        target with the most cosine-similar key. Returns ((c, D) float32 hidden states: target +
        mean of the joined, (c,) the targets); with ``merge_space="tower"`` the sum is taken over
        the tower's features and then projected.
        """
        step = max(1, len(rest) // contextual)
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, len(rest), step, device=rest.device)[:contextual]] = True
        keys = state.vision.keys[b, rest].float()
        keys = keys / keys.norm(dim=-1, keepdim=True)
        assign = (keys[~is_target] @ keys[is_target].T).argmax(dim=1)
        tower = self.merge_space == "tower"
        h = state.vision.features[b, rest].float() if tower else state.hidden[b, state.vision_idx[b, rest]].float()
        sums = torch.zeros(contextual, h.shape[-1], device=h.device).index_add_(0, assign, h[~is_target])
        sizes = torch.bincount(assign, minlength=contextual).clamp(min=1)[:, None]
        merged = h[is_target] + sums / sizes
        return (state.vision.project(merged) if tower else merged), rest[is_target]

    def zip_crops(self, state: LayerState, b: int, scores: torch.Tensor, k: int, crops: torch.Tensor):
        """VisionZip per crop (LLaVA-NeXT anyres): the base image and every tile are zipped on their own.

        ``k`` is shared out equally over the sample's crops (the first ones one more when it does
        not divide); a crop keeping ``k_c`` has ``round(k_c · contextual_ratio)`` contextual tokens,
        its [CLS] (at the pre-LLM stage) and the rest dominant patches by its own [CLS] attention.
        Tokens of no crop (image_newline) are dropped. Returns the kept indices, the added tokens
        and their ``Selection.added_place``. ``kept_first``: every crop's [CLS], then every crop's
        contextual tokens, in crop order. ``official``: per image, its base crop's [CLS] (placed right
        before the crop's first token) and contextual tokens (right after the crop's last token), then
        its tiles' [CLS] and contextual tokens (right after the image's last token), in crop order.
        """
        device = scores.device
        groups = crops.unique()
        groups = groups[groups >= 0]
        share, extra = divmod(k, max(1, len(groups)))
        cls = state.vision.cls_embeds[b] if state.layer_idx < 0 and state.vision.cls_embeds is not None else None
        images = state.vision_coords[b, : len(crops), 0]
        kept, zipped = [], []  # per crop with added tokens: its image, whether it is the base, (hidden, source, place)
        for i, group in enumerate(groups.tolist()):
            members = (crops == group).nonzero().flatten()
            k_crop = share + (1 if i < extra else 0)
            if k_crop >= len(members):
                kept.append(members)
                continue
            contextual = min(math.floor(k_crop * self.contextual_ratio + 0.5), k_crop)
            n_cls = 1 if cls is not None and k_crop - contextual >= 1 else 0
            dominant = members[select_keep(scores[members], k_crop - contextual - n_cls)]
            kept.append(dominant)
            rest = members[~torch.isin(members, dominant)]
            contextual = min(contextual, len(rest))
            image = (images == images[members[0]]).nonzero().flatten()
            base = bool(members[0] == image[0])
            # official places: a base crop's [CLS] right before its first token and its contextual tokens right after
            # its last; a tile's right after its image's last token
            after = int(members.max() if base else image.max()) + 1
            crop = {"image": int(images[members[0]]), "base": base, "cls": None, "ctx": None}
            if n_cls:
                cls_place = members[:1] if base else torch.tensor([after], device=device)
                crop["cls"] = (cls[group : group + 1].float(), members[:1], cls_place)
            if contextual:
                merged, targets = self.contextual_tokens(state, b, rest, contextual)
                crop["ctx"] = (merged, targets, torch.full_like(targets, after))
            zipped.append(crop)
        empty_h = state.hidden.new_zeros(0, state.hidden.shape[-1], dtype=torch.float32)
        empty_s = torch.zeros(0, dtype=torch.long, device=device)
        keep = torch.cat(kept).sort().values if kept else empty_s
        parts = [zipped]  # kept_first: every crop's [CLS], then every crop's contextual tokens, in crop order
        if self.order == "official":  # per image: the base crop's [CLS] and contextual, then the tiles'
            parts = [
                [z for z in zipped if z["image"] == im and z["base"] == base]
                for im in dict.fromkeys(z["image"] for z in zipped)
                for base in (True, False)
            ]
        tokens = [z[kind] for part in parts for kind in ("cls", "ctx") for z in part if z[kind] is not None]
        hidden = torch.cat([empty_h, *(t[0] for t in tokens)])
        source = torch.cat([empty_s, *(t[1] for t in tokens)])
        return keep, hidden, source, torch.cat([empty_s, *(t[2] for t in tokens)])

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """An estimate: the [CLS] row against every patch key and the merge (about 4·n·D)."""
        return 4.0 * n_vision * hidden
