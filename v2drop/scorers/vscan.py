"""VScan: global and local [CLS]-attention scans with token merging in the vision encoder, then PDrop mid-LLM.

Official code: ``Tencent/SelfEvolvingAgent`` @ a82450e1b5e15070bee79ee8b79f8d9a97cb85f7, ``VScan/llava/model/
llava_arch.py`` (``encode_images``: the scans; ``window_cls_selection``: the local scan; ``token_merging``: the
merge) and ``VScan/llava/model/modeling_llama_x.py`` (``LlamaModel.layer_prune``: the LLM stage). Definition and
differences: ``docs/methods.md`` ("VScan").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.schedule import is_vision_layer, layer_name
from v2drop.scorers.base import (
    AttentionRequest,
    EncoderRequest,
    LayerState,
    Merge,
    Scorer,
    Selection,
    register_scorer,
    select_keep,
)
from v2drop.scorers.pdrop import PDropScorer


def window_scan(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, windows: int, per_window: int):
    """VScan's local scan: in each of ``windows × windows`` equal tiles of the patch grid, the ``per_window``
    patches of highest ``scores`` (n,); ascending indices. ``rows``/``cols`` (n,) are each patch's grid place; tile
    ``(i, j)`` spans rows ``[i·R // windows, (i+1)·R // windows)`` of the R grid rows (columns alike). Ties go to
    the lower index."""
    n_rows, n_cols = int(rows.max()) + 1, int(cols.max()) + 1
    tile = (rows * windows // n_rows) * windows + cols * windows // n_cols
    picked = [
        idx[select_keep(scores[idx], per_window)]
        for t in range(windows * windows)
        for idx in [(tile == t).nonzero().flatten()]
    ]
    return torch.cat(picked).sort().values


def nearest_merge(hidden: torch.Tensor, retained: torch.Tensor) -> Merge | Selection:
    """VScan's merge of every patch not in ``retained`` into its most cosine-similar retained patch.

    ``hidden`` (n, C) are the patches' features, ``retained`` ascending indices. A retained patch that draws
    ``c > 0`` others becomes the mean of itself and them (weights ``1 / (1 + c)``, anchored on itself); one that
    draws none is kept as it is. Similarities in float32; ties go to the lower retained index.
    """
    n = hidden.shape[0]
    rest = torch.ones(n, dtype=torch.bool, device=hidden.device)
    rest[retained] = False
    rest = rest.nonzero().flatten()
    if not len(rest):
        return Selection(keep=[retained])
    h = torch.nn.functional.normalize(hidden.float(), dim=-1, eps=1e-8)
    target = (h[rest] @ h[retained].T).argmax(-1)  # first maximum on ties
    drawn = torch.bincount(target, minlength=len(retained))
    anchors = retained[drawn > 0]
    group_of = torch.cumsum(drawn > 0, 0) - 1  # retained index -> its group
    members = torch.cat([anchors, rest])
    groups = torch.cat([group_of[drawn > 0], group_of[target]])
    weights = 1.0 / (1.0 + drawn[torch.cat([(drawn > 0).nonzero().flatten(), target])].float())
    return Merge(keep=[retained[drawn == 0]], members=[members], groups=[groups], weights=[weights], anchors=[anchors])


@register_scorer("vscan")
@dataclass
class VScanScorer(Scorer):
    """VScan (Zhang et al., TMLR 2026): scans and merges inside the vision encoder, PDrop's rule at decoder stages.

    At a vision-encoder stage ``vision:<l>`` keeping ``k`` of the ``n`` present patches (``k < n``): the local scan
    takes ``int(k · (1 − global_ratio)) // windows²`` patches per tile of a ``windows × windows`` split of the grid,
    by the [CLS] attention (heads averaged) of the shallow encoder layer producing ``hidden_states[shallow_layer]``
    (recorded as the tower runs; the stage's own layer when the stage comes first); the global scan then takes the
    ``k − int(k · (1 − global_ratio))`` others of highest [CLS] attention of encoder layer ``l − 1``. Every other
    patch merges into its most cosine-similar retained patch (``nearest_merge``, on the stage's hidden states). At a
    decoder stage: PDrop, the last instruction token's attention in that layer. Presets ``vscan-llava15-*``.
    """

    global_ratio: float = 0.5
    windows: int = 4
    shallow_layer: int = 6

    def __post_init__(self):
        if not 0.0 <= float(self.global_ratio) <= 1.0:
            raise ValueError(
                f"vscan global_ratio is the global scan's share of a stage, in [0, 1]; got {self.global_ratio}"
            )
        for name in ("windows", "shallow_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"vscan {name} must be an int >= 1, got {value!r}")
        self._llm = PDropScorer()

    def at(self, layer_idx: int) -> Scorer:
        """Itself at vision-encoder stages, PDrop at decoder stages."""
        return self._llm if layer_idx >= 0 else self

    def encoder_request(self) -> EncoderRequest:
        """The previous encoder layer's attention probabilities and the shallow layer's recorded [CLS] attention."""
        return EncoderRequest(attention=True, cls_attention_layers=(self.shallow_layer,))

    def attention_request(self) -> AttentionRequest | None:
        """None: decoder stages run the PDrop part (``at``), which asks for its own rows."""
        return None

    def check_layer(self, layer_idx: int) -> None:
        """Vision-encoder stages from ``vision:1`` on, and decoder stages; not the pre-LLM stage."""
        if is_vision_layer(layer_idx):
            if layer_name(layer_idx) == "vision:0":
                raise ValueError(
                    "vscan reads the [CLS] attention of the encoder layer before its stage: use vision:<l>, l >= 1"
                )
            return
        if layer_idx < 0:
            raise ValueError(
                "vscan runs at vision-encoder stages (vision:<l>, its scans) and decoder stages (PDrop), not at the "
                "pre-LLM stage (-1)"
            )
        self._llm.check_layer(layer_idx)

    def score(self, state: LayerState) -> torch.Tensor:
        """At an encoder stage the [CLS] attention of the previous encoder layer, heads averaged; else PDrop's."""
        if state.encoder is None:
            return self._llm.score(state)
        return state.encoder.attention[:, :, 0, 1:].mean(1)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """The local and global scans and the merge at an encoder stage (see the class); PDrop's top k elsewhere."""
        if state.encoder is None:
            return self._llm.select(state, scores, counts)
        n, k = scores.shape[1], counts[0]
        if k >= n:
            return Selection(keep=[torch.arange(n, device=scores.device)])
        shallow = state.encoder.cls_attention.get(self.shallow_layer, scores)[0]
        n_local = int(k * (1 - self.global_ratio))
        coords = state.vision_coords[0]
        local = window_scan(shallow, coords[:, 1], coords[:, 2], self.windows, n_local // self.windows**2)
        deep = scores[0].clone()
        deep[local] = float("-inf")
        global_ = select_keep(deep, min(k - n_local, n - len(local)))
        retained = torch.cat([local, global_]).sort().values
        return nearest_merge(state.hidden[0, 1:], retained)
