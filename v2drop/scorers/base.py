"""The scorer contract: a scorer turns one layer's state into one score per vision token.

A scorer declares what it needs and the engine serves exactly that, without knowing the scorer:

- ``needs_prev_hidden`` (class variable): the input of the layer before the drop layer;
- ``needs_prev_keys`` (class variable): the keys the layer before the drop layer cached (after
  RoPE), read from the KV cache at no extra cost;
- ``attention_request()``: attention rows, from which layer and whether they must come from the
  layer's full probability map; the query tokens are chosen once, by ``attention_queries`` on the
  layer-0 input (default: the last prompt token);
- ``vision_request()``: outputs of the vision tower itself (its [CLS] attention, keys and own
  features at the feature-selection layer, the projected [CLS] feature, the attention each patch
  receives in chosen layers), served on families whose tower has them;
- ``select()``: the step after scoring, which tokens stay and which new tokens join them
  (default: the schedule's count of top scores; SparseVLM adds its adaptive count and recycling);
  it may return a ``Merge``: groups of present tokens each replaced by their weighted sum, which the
  engine computes and places by the merge's position rule (token-merging methods);
- ``needs_reencode`` (class variable): ``LayerState.reencode``, the model's vision tower run
  again on its images resized to smaller token grids (the ``downsample`` control; pre-LLM only);
- ``at(layer)``: the scorer whose declarations hold at the stage before ``layer`` (default:
  itself; a ``staged`` scorer answers with the part it runs there).

A stage at layer -1 (``pre_llm``) runs before the decoder on the projected vision features
(``LayerState.hidden`` is the layer-0 input, ``layer`` is None); a scorer that needs anything of
a decoder layer (previous hidden states or keys, attention rows) cannot run there.

A vision-encoder stage (``vision:<l>``) runs inside the vision tower, just before encoder layer
``l``, once per tower image; only scorers with an ``encoder_request()`` run there, and they get
``LayerState.encoder`` (the previous encoder layer's attention and values, their own scores of the
previous encoder stage, the recorded [CLS] attention of earlier encoder layers); a ``Merge`` there
puts each merged token in its anchor's patch slot. There ``hidden`` is the tower's (1, T, C) input
of layer ``l`` with the [CLS] at position 0, ``vision_idx`` the patch positions 1..T-1 and
``orig_idx`` each token's original tower position (0 = [CLS], 1 + p for patch p).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
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
        The decoder layer about to run (tokens are dropped just before it); -1 at the pre-LLM stage.
    hidden : Tensor (B, L, D)
        Input of layer ``layer_idx`` (the residual stream, before its norm); at the pre-LLM stage
        the input embeddings with the projected vision features.
    prev_hidden : Tensor (B, L, D) or None
        Input of layer ``layer_idx - 1`` over the same tokens; set when ``needs_prev_hidden``.
    prev_keys : Tensor (B, L, H_kv * head_dim) or None
        The keys layer ``layer_idx - 1`` put in the KV cache for the same tokens (after RoPE, the
        key heads concatenated, not repeated for grouped queries); set when ``needs_prev_keys``.
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
        Head-averaged attention probabilities of the query rows over all current keys; set when
        ``attention_request()`` is not None.
    query_valid : BoolTensor (B, Q) or None
        Which rows of ``attention`` are real (samples may have fewer queries than others).
    sample_keys : LongTensor (B,)
        A per-sample integer derived from the prompt ids, for reproducible per-sample randomness.
    layer : nn.Module or None
        The decoder layer ``layer_idx`` (None at the pre-LLM stage).
    final_norm : nn.Module or None
        The language model's last norm (the one before the LM head).
    vision : VisionFeatures or None
        The vision tower's outputs for the current vision tokens; set when ``vision_request()`` is not None.
    reencode : callable or None
        Set when the scorer ``needs_reencode``: ``reencode(grids)`` takes, per sample, one
        ``(rows, cols)`` token grid or None per image of the sample (prompt order) and returns, per
        sample, each image's projected features (rows · cols, D) float32 from its pixels resized to
        that grid (None where the grid was None); ``Adapter.reencode`` on the batch's inputs.
    encoder : EncoderFeatures or None
        At a vision-encoder stage: what ``encoder_request()`` asks for (the module docstring gives the
        other fields' meaning there).
    """

    layer_idx: int
    hidden: torch.Tensor
    vision_idx: torch.Tensor
    vision_valid: torch.Tensor
    vision_coords: torch.Tensor
    orig_idx: torch.Tensor
    attention_mask: torch.Tensor
    sample_keys: torch.Tensor
    layer: nn.Module | None
    prev_hidden: torch.Tensor | None = None
    prev_keys: torch.Tensor | None = None
    final_norm: nn.Module | None = None
    attention: torch.Tensor | None = None
    query_valid: torch.Tensor | None = None
    vision: VisionFeatures | None = None
    reencode: Callable | None = None
    encoder: EncoderFeatures | None = None


@dataclass(frozen=True)
class EncoderRequest:
    """What a scorer running at vision-encoder stages (``vision:<l>``) needs of the tower.

    Attributes
    ----------
    attention : bool
        The attention probabilities of encoder layer ``l - 1`` (the layer that produced the stage's
        hidden states) over the tokens present, all heads, float32.
    values : bool
        That layer's value vectors, all heads, float32.
    every_layer : bool
        Also run between the stages: before every encoder layer from 1 up to the last encoder
        stage, scoring and dropping as the scorer's ``select`` decides. Each count is then a target,
        that of the next stage: what the schedule alone would leave of the image's patches
        (``Schedule.counts``), whatever the scorer dropped before.
    cls_attention_layers : tuple of int
        Record, while the tower runs, the heads-averaged [CLS] attention on each patch of the encoder layers
        producing ``hidden_states[l]`` for each ``l`` here (numbered as stages are, ``vision:<l>``, and moved to the
        model's tower as the schedule's stages: ``Schedule.fit_tower``, at most its selection layer), for the
        stages after them (``EncoderFeatures.cls_attention``).
    """

    attention: bool = False
    values: bool = False
    every_layer: bool = False
    cls_attention_layers: tuple = ()

    def __post_init__(self):
        layers = self.cls_attention_layers
        if not isinstance(layers, tuple) or not all(
            isinstance(l, int) and not isinstance(l, bool) and l >= 1 for l in layers
        ):
            raise ValueError(
                f"EncoderRequest.cls_attention_layers must be a tuple of encoder layers >= 1, got {layers!r}"
            )


@dataclass(frozen=True)
class EncoderFeatures:
    """The tower's state at a vision-encoder stage before encoder layer ``layer``, for one tower image.

    Attributes
    ----------
    layer : int
        The encoder layer about to run (0-based): the stage's hidden states are ``hidden_states[layer]``.
    selection : int
        The ``hidden_states`` index the projector reads (the feature-selection layer).
    next_stage : int
        The encoder layer of the next schedule stage (``layer`` itself at a stage; later between
        stages, with ``EncoderRequest.every_layer``).
    attention : Tensor (1, H, T, T) float32 or None
        Encoder layer ``layer - 1``'s attention probabilities over the present tokens (position 0 = [CLS]).
    values : Tensor (1, H, T, hd) float32 or None
        That layer's value vectors over the present tokens.
    prev_scores : Tensor (1, V) float32 or None
        The scores this scorer returned at the previous vision-encoder stage (or layer, with
        ``every_layer``), for the patches still present (None the first time).
    cls_attention : dict of int to Tensor (1, V) float32
        Per layer of ``EncoderRequest.cls_attention_layers`` (as requested) already run, the heads-averaged [CLS]
        attention it gave each patch still present.
    """

    layer: int
    selection: int
    next_stage: int
    attention: torch.Tensor | None = None
    values: torch.Tensor | None = None
    prev_scores: torch.Tensor | None = None
    cls_attention: dict = dataclasses.field(default_factory=dict)


def is_tower_layer(layer) -> bool:
    """Whether ``layer`` names a tower layer: a nonzero int, a float in (0, 1) (a share of the depth), or None."""
    if layer is None:
        return True
    if isinstance(layer, bool):
        return False
    if isinstance(layer, int):
        return layer != 0
    return isinstance(layer, float) and 0.0 < layer < 1.0


@dataclass(frozen=True)
class VisionRequest:
    """The vision tower's own outputs a scorer needs (served for CLIP-like towers with a [CLS] token).

    All of them are read at the tower's feature-selection layer (``vision_feature_layer``), the
    layer whose output the projector receives.

    Attributes
    ----------
    cls_attention : bool
        The [CLS] query's attention probabilities on each patch token, summed over heads.
    keys : bool
        Each patch token's key vector of that layer, averaged over heads.
    cls_embeds : bool
        Each image's [CLS] output passed through the projector (a token the LLM can read).
    features : bool
        Each patch token's output of that layer, before the projector (the tower's own feature).
    received_layers : tuple of int, float or None
        Encoder layers whose received attention is served: for each patch token, the attention
        probabilities all of the layer's query tokens give it, averaged over heads and queries. A
        layer is numbered as ``vision_feature_layer`` numbers it (``ℓ`` ≥ 1: the layer whose output
        is ``hidden_states[ℓ]``; negative: counted from the end); a float ``f`` in (0, 1) is the
        layer ``max(1, round(f · depth))`` of a tower ``depth`` layers deep; None is the
        feature-selection layer.
    """

    cls_attention: bool = True
    keys: bool = False
    cls_embeds: bool = False
    features: bool = False
    received_layers: tuple = ()

    def __post_init__(self):
        if not isinstance(self.received_layers, tuple) or not all(map(is_tower_layer, self.received_layers)):
            raise ValueError(
                "VisionRequest.received_layers must be a tuple of nonzero ints, floats in (0, 1) (a share of the "
                f"tower's depth) or None (the feature-selection layer), got {self.received_layers!r}"
            )

    def union(self, other: VisionRequest | None) -> VisionRequest:
        """A request for everything either request asks for."""
        if other is None:
            return self
        layers = self.received_layers + tuple(x for x in other.received_layers if x not in self.received_layers)
        return VisionRequest(
            self.cls_attention or other.cls_attention,
            self.keys or other.keys,
            self.cls_embeds or other.cls_embeds,
            self.features or other.features,
            layers,
        )


@dataclass(frozen=True)
class VisionFeatures:
    """The vision tower's outputs for the current vision tokens (``LayerState.vision``).

    Attributes
    ----------
    cls_attention : Tensor (B, V) float32
        Head-summed [CLS] attention on each vision token at the tower's selection layer.
    keys : Tensor (B, V, K) float32 or None
        Head-averaged keys of each vision token at that layer.
    cls_embeds : list of Tensor (I_b, D) or None
        Per sample, the projected [CLS] feature of each of its I_b tower images, in prompt order
        (an image, or on LLaVA-NeXT each crop: the base image and every anyres tile).
    crops : LongTensor (B, V) or None
        On families whose images are several tower crops (LLaVA-NeXT anyres): the crop each vision
        token shows, a row of ``cls_embeds[b]``, or -1 for tokens of no crop (image_newline).
        None where every image is one crop (LLaVA-1.5).
    features : Tensor (B, V, C) float32 or None
        Each vision token's output of the tower's selection layer, before the projector.
    received : dict of int or None to Tensor (B, V) float32, or None
        Per layer of ``VisionRequest.received_layers``, the head- and query-averaged attention each
        vision token receives in that layer.
    project : callable or None
        The model's projector: tower features (..., C) of the selection layer -> (..., D) float32
        LLM inputs (``Adapter.project_vision``), for scorers that build tokens in the tower's space.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor | None = None
    cls_embeds: list | None = None
    crops: torch.Tensor | None = None
    features: torch.Tensor | None = None
    received: dict | None = None
    project: Callable | None = None


@dataclass(frozen=True)
class AttentionRequest:
    """The head-averaged attention rows a scorer needs at every drop stage.

    Attributes
    ----------
    layer_offset : {0, -1}
        Rows of layer ``stage layer + layer_offset``, computed from that layer's own norm, q/k
        projections and RoPE on its input: 0 for the drop layer itself (PDrop), -1 for the layer
        before it (FastV, SparseVLM).
    full_map : bool
        Compute that layer's whole (B, H, L, L) probability map and read the rows from it, as the
        original eager implementations do: the same rows, at their memory cost.
    """

    layer_offset: int = 0
    full_map: bool = False

    def __post_init__(self):
        if self.layer_offset not in (0, -1):
            raise ValueError(f"AttentionRequest.layer_offset must be 0 or -1, got {self.layer_offset}")


@dataclass
class Selection:
    """The outcome of one drop stage for a batch: the vision tokens that stay and any tokens added.

    Attributes
    ----------
    keep : list of LongTensor
        Per sample, ascending indices into ``state.vision_idx`` of the kept vision tokens.
    added_hidden : list of Tensor (C_b, D), optional
        Per sample, hidden states of new vision tokens inserted right after the sample's last kept
        vision token (SparseVLM's recycled tokens).
    added_source : list of LongTensor (C_b,), optional
        Per sample, for each added token the index into ``state.vision_idx`` of the token whose
        position ids, prompt index and grid coordinates it takes.
    added_at_source : bool
        Place each added token at its source token's place in the sequence (added tokens in
        ascending source order; the ``pool`` and ``downsample`` controls, which replace every image
        by fewer tokens) instead of all of them right after the last kept vision token.
    added_place : list of LongTensor (C_b,), optional
        Per sample, for each added token where it goes in the sequence: ``i`` in ``0 .. V_b − 1`` right before
        the place of vision token ``state.vision_idx[b, i]`` (kept or not), ``V_b`` (the sample's vision-token
        count) right after its last vision token's place, ``−1`` right after its last kept vision token; tokens
        given one place keep their order (VisionZip's official order: [CLS] before the image's first patch).
        Not with ``added_at_source``.
    """

    keep: list[torch.Tensor]
    added_hidden: list[torch.Tensor] | None = None
    added_source: list[torch.Tensor] | None = None
    added_at_source: bool = False
    added_place: list[torch.Tensor] | None = None


MERGE_POSITIONS = ("anchor", "mean")
MERGE_PLACES = ("anchor", "after_kept")


@dataclass
class Merge(Selection):
    """A ``Selection`` that also replaces groups of present vision tokens by one token each: their weighted sum.

    The engine computes the merged hidden states itself, in float32 from the stage's hidden states (the
    projected features at the pre-LLM stage, the tower's hidden states at a vision-encoder stage, the layer's input
    residual stream at a decoder stage), so a
    merge is applied the same way at every stage and on every family. Each list has one entry per sample;
    a vision token is kept (``keep``), merged (a member of one group, or of several: FastVID's multi-frame
    merge adds a token to one group per anchor frame), or dropped.

    Attributes
    ----------
    members : list of LongTensor (M_b,)
        Indices into ``state.vision_idx`` of the tokens merged; none in ``keep``, none twice in one group.
    groups : list of LongTensor (M_b,)
        The group, ``0 .. G_b − 1``, each member joins; every group has a member.
    weights : list of Tensor (M_b,)
        Each member's weight: a merged token is ``Σ weight · hidden`` over its group (weights summing to 1 per
        group give the weighted mean).
    anchors : list of LongTensor (G_b,)
        Per group, the index into ``state.vision_idx`` of the token whose prompt index and grid coordinates the
        merged token takes (e.g. the group's first or most important member).
    position : {"anchor", "mean"}
        The merged token's position ids: the anchor's, or the mean of its members' (each M-RoPE axis on its
        own) rounded to the nearest integer, halves up.
    place : {"anchor", "after_kept"}
        Where a merged token sits: at its anchor's place in the sequence (right after the anchor when the
        anchor is kept), or, in group order, after the sample's last kept vision token and any added tokens.
    """

    members: list[torch.Tensor] | None = None
    groups: list[torch.Tensor] | None = None
    weights: list[torch.Tensor] | None = None
    anchors: list[torch.Tensor] | None = None
    position: str = "anchor"
    place: str = "anchor"

    def __post_init__(self):
        if self.position not in MERGE_POSITIONS:
            raise ValueError(f"Merge.position must be one of {MERGE_POSITIONS}, got {self.position!r}")
        if self.place not in MERGE_PLACES:
            raise ValueError(f"Merge.place must be one of {MERGE_PLACES}, got {self.place!r}")
        fields = {"members": self.members, "groups": self.groups, "weights": self.weights, "anchors": self.anchors}
        missing = [name for name, value in fields.items() if value is None]
        if missing:
            raise ValueError(
                f"Merge needs members, groups, weights and anchors (one tensor per sample); {missing} missing"
            )
        if len({len(value) for value in fields.values()} | {len(self.keep)}) != 1:
            raise ValueError("Merge: keep, members, groups, weights and anchors must have one entry per sample each")
        for b, (m, g, w, a) in enumerate(zip(self.members, self.groups, self.weights, self.anchors)):
            if not (m.dim() == g.dim() == w.dim() == a.dim() == 1) or not len(m) == len(g) == len(w):
                raise ValueError(
                    f"Merge sample {b}: members, groups and weights must be 1-D of one length, anchors 1-D; got shapes "
                    f"{tuple(m.shape)}, {tuple(g.shape)}, {tuple(w.shape)}, {tuple(a.shape)}"
                )
            if len(g) and (
                int(g.min()) < 0 or torch.bincount(g, minlength=len(a)).eq(0).any() or int(g.max()) >= len(a)
            ):
                raise ValueError(
                    f"Merge sample {b}: groups must number 0 .. {len(a) - 1} (one per anchor), each with a member; "
                    f"got {g.tolist()}"
                )
            if not len(g) and len(a):
                raise ValueError(f"Merge sample {b}: {len(a)} anchors but no members")

    def combine(self, b: int, members_hidden: torch.Tensor) -> torch.Tensor:
        """(G_b, D) float32 merged tokens of sample ``b``: per group ``Σ weight · hidden`` of its members, from the
        members' (M_b, D) hidden states in ``members[b]`` order (the one computation every stage kind uses)."""
        weighted = members_hidden.float() * self.weights[b].float().to(members_hidden.device)[:, None]
        out = torch.zeros(len(self.anchors[b]), members_hidden.shape[-1], device=members_hidden.device)
        return out.index_add_(0, self.groups[b].to(members_hidden.device), weighted)


def select_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


@dataclass
class Scorer:
    """Base class: score every current vision token, higher = keep.

    Subclasses are small dataclasses whose fields are the method's hyperparameters; they declare
    what they need (see the module docstring) and the engine computes only that.

    Class variables
    ---------------
    needs_prev_hidden : bool
        Fill ``LayerState.prev_hidden`` (costs one saved copy of the hidden states).
    needs_prev_keys : bool
        Fill ``LayerState.prev_keys`` (read from the KV cache: nothing is recomputed).
    stochastic : bool
        Draws at random from an integer ``seed`` field: ``experiments.evaluate --seeds N`` runs it with seeds
        0..N-1 and reports the spread over seeds (a deterministic scorer runs once).
    needs_reencode : bool
        Fill ``LayerState.reencode`` (the vision tower run again on resized images, on request).
    """

    needs_prev_hidden: ClassVar[bool] = False
    needs_prev_keys: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    needs_reencode: ClassVar[bool] = False

    def score(self, state: LayerState) -> torch.Tensor:
        """Scores (B, V) float32 for ``state.vision_idx``; padded entries are ignored."""
        raise NotImplementedError

    def attention_request(self) -> AttentionRequest | None:
        """The attention rows ``score`` reads from ``state.attention`` (default: none)."""
        return None

    def vision_request(self) -> VisionRequest | None:
        """The vision tower outputs ``score``/``select`` read from ``state.vision`` (default: none)."""
        return None

    def encoder_request(self) -> EncoderRequest | None:
        """What ``score``/``select`` read from ``state.encoder`` at vision-encoder stages; None (the default): this
        scorer does not run inside the vision encoder."""
        return None

    def at(self, layer_idx: int) -> Scorer:
        """The scorer that runs the stage before ``layer_idx`` (-1: the pre-LLM stage); itself unless staged."""
        return self

    def attention_queries(
        self, embeds: torch.Tensor, vision: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per sample, the positions (in the left-padded layer-0 sequence) of the attention query tokens.

        Called once per batch on the layer-0 input when ``attention_request()`` is not None; the
        queries should be text tokens, which no stage drops. Default: the last prompt token.
        """
        last = torch.tensor([embeds.shape[1] - 1], device=embeds.device)
        return [last for _ in range(embeds.shape[0])]

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """The step after scoring: per sample, keep the ``counts[b]`` highest of ``scores`` (B, V).

        ``scores`` are float32 with NaN turned to -inf; ``counts`` are the schedule's.
        """
        n_valid = state.vision_valid.sum(1).tolist()
        return Selection(keep=[select_keep(scores[b, :n], k) for b, (n, k) in enumerate(zip(n_valid, counts))])

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """Analytic FLOPs of one scoring call on ``n_tokens`` current tokens (0 unless a scorer says otherwise)."""
        return 0.0

    def check_layer(self, layer_idx: int) -> None:
        """Raise if this scorer cannot run at a stage before ``layer_idx``."""
        from v2drop.schedule import is_vision_layer, layer_name

        if is_vision_layer(layer_idx):
            if self.encoder_request() is None:
                raise ValueError(
                    f"{type(self).__name__} does not run inside the vision encoder (it has no encoder_request()); "
                    f"stage {layer_name(layer_idx)} needs a scorer made for vision-encoder stages, such as flowcut"
                )
            return
        request = self.attention_request()
        if (
            self.needs_prev_hidden or self.needs_prev_keys or (request is not None and request.layer_offset < 0)
        ) and layer_idx < 1:
            where = "the pre-LLM stage (-1)" if layer_idx < 0 else layer_idx
            raise ValueError(
                f"{type(self).__name__} needs the layer before the drop layer; stage layer must be >= 1, got {where}"
            )
        if request is not None and layer_idx < 0:
            raise ValueError(
                f"{type(self).__name__} reads a decoder layer's attention; it cannot run at the pre-LLM stage (-1)"
            )


# Every module of v2drop.scorers is imported on the first lookup, so a scorer registers by being in that package.
SCORERS: Registry[type[Scorer]] = Registry(
    "scorer", base_cls=Scorer, entry_point_group="v2drop.scorers", package="v2drop.scorers"
)


def register_scorer(name: str):
    """Class decorator registering a ``Scorer`` subclass under ``name``."""
    return SCORERS.register(name)


def list_scorers(pattern: str = "*") -> list[str]:
    """Sorted names of the registered scorers matching an fnmatch ``pattern``."""
    return SCORERS.names(pattern)


def scorer_params(scorer: Scorer | None) -> dict:
    """The constructor parameters of a scorer instance (its init dataclass fields), as copies.

    Copies, so that editing config data taken from a Method (a sweep changing a composite's
    weight) never changes the Method's own scorer.
    """
    if scorer is None or not dataclasses.is_dataclass(scorer):
        return {}
    return {f.name: copy.deepcopy(getattr(scorer, f.name)) for f in dataclasses.fields(scorer) if f.init}


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


# -- shared by the attention-based scorers -------------------------------------------------------


def vision_columns(state: LayerState) -> torch.Tensor:
    """(B, Q, V) the attention rows' entries at the current vision tokens."""
    return state.attention.gather(-1, state.vision_idx[:, None].expand(-1, state.attention.shape[1], -1))


@dataclass
class LastTokenAttentionScorer(Scorer):
    """Score = the last prompt token's head-averaged attention on each vision token (FastV, PDrop).

    Subclasses set ``source_layer_offset``: the rows come from layer ``stage layer + offset``.
    """

    source_layer_offset: ClassVar[int] = 0

    def attention_request(self) -> AttentionRequest:
        """The last prompt token's row (the default query) of the source layer."""
        return AttentionRequest(layer_offset=self.source_layer_offset)

    def score(self, state: LayerState) -> torch.Tensor:
        """The query row's head-averaged attention on each vision token."""
        return vision_columns(state)[:, 0]

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """One query row against every key: q/k projections of the row and keys, then the dot products."""
        return 2.0 * hidden * hidden * (n_tokens + 1) + 2.0 * n_tokens * hidden
