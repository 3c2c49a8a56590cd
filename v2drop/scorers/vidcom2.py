"""VidCom2 (Video Compression Commander): per-frame budgets from each frame's uniqueness, then the most unique tokens of
every frame, before the LLM.

Official code: ``xuyang-liu16/VidCom2`` (``token_compressor/vidcom2/vidcom2.py`` at commit
``d31b1560e4ddcd0e7bbceb48dd933a9f634d8905``, ``llava/model/vidcom2.py`` at
``0312a662f51823d28297b1d57307325f1ce39f55``); the exact-count step follows vLLM's port
(``vllm-project/vllm`` PR #47750, ``vllm/multimodal/video_prune/vidcom2.py`` at
``0f17ee061e413bf8ab7927f926f69cdff24dc63e``). Definition and differences: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Scorer, Selection, register_scorer
from v2drop.scorers.vispruner import token_groups

BANDWIDTHS = tuple(2.0**k for k in range(-3, 2))  # the Gaussian kernels' alphas: exp(-d² / (2·alpha)), summed


def ascending(values: torch.Tensor) -> torch.Tensor:
    """Indices of ``values`` from smallest to largest, ties to the lower index."""
    return torch.sort(values, stable=True).indices


def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(n,) the multi-scale Gaussian similarity Σ_alpha exp(−‖x − centre‖² / (2·alpha)) of each row of ``x`` (n, C)."""
    dist = ((x - centre) ** 2).sum(-1)
    return sum(torch.exp(-dist / (2.0 * a)) for a in BANDWIDTHS)


def vidcom2_similarity(
    features: torch.Tensor, frames: torch.Tensor, channel_share: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, frame) similarities (n,) of every token of ``features`` (n, D) whose frame is ``frames`` (n,).

    The ``int(D · channel_share)`` channels of lowest variance over all n tokens (ties to the lower
    channel) are kept, each token L2-normalised on them; ``video`` is each token's
    ``gaussian_similarity`` to the mean of all tokens, ``frame`` to the mean of its own frame's tokens.
    """
    x = features.float()
    variance = x.var(dim=0, unbiased=False)
    channels = ascending(variance)[: max(1, int(x.shape[-1] * channel_share))]
    unit = F.normalize(x[:, channels], dim=-1)
    video = gaussian_similarity(unit, unit.mean(0))
    ids, inverse = frames.unique(return_inverse=True)
    sums = torch.zeros(len(ids), unit.shape[-1], device=unit.device).index_add_(0, inverse, unit)
    sizes = torch.bincount(inverse, minlength=len(ids)).clamp(min=1)[:, None]
    frame = gaussian_similarity(unit, (sums / sizes)[inverse])
    return video, frame


def frame_budgets(
    video: torch.Tensor, frames: torch.Tensor, base: float, temperature: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame ids ascending, per-frame kept counts): VidCom2's dynamic budgets at a retained share ``base``.

    A frame's uniqueness is minus the mean of its tokens' video similarity; ``p = softmax((u − max u) /
    temperature)`` over the frames; a frame of ``n_f`` tokens keeps ``round(min(1, base · (1 + p_f −
    mean p)) · n_f)`` (round half to even, as ``torch.round``), at least 1 and at most ``n_f``.
    """
    ids, inverse = frames.unique(return_inverse=True)
    sizes = torch.bincount(inverse, minlength=len(ids))
    mean = torch.zeros(len(ids), device=video.device).index_add_(0, inverse, video) / sizes.clamp(min=1)
    uniqueness = -mean
    probs = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    scales = (base * (1.0 + probs - probs.mean())).clamp(max=1.0)
    counts = torch.round(scales * sizes.float()).long()
    return ids, torch.minimum(counts.clamp(min=1), sizes)


def vidcom2_keep(features: torch.Tensor, frames: torch.Tensor, target: int, channel_share: float = 0.5) -> torch.Tensor:
    """Ascending indices of the ``target`` tokens VidCom2 keeps of ``features`` (n, D) in frames ``frames`` (n,).

    Every frame keeps its ``frame_budgets`` count (share ``target / n``) of its tokens with the lowest
    video + frame similarity; then, as vLLM's exact-count step, the kept tokens with the highest
    similarity are dropped (or the dropped ones with the lowest added) over the whole video until exactly
    ``target`` remain. Ties go to the lower index when keeping and to the higher index when dropping.
    """
    n = features.shape[0]
    if target >= n:
        return torch.arange(n, device=features.device)
    video, frame = vidcom2_similarity(features, frames, channel_share)
    similarity = video + frame
    ids, counts = frame_budgets(video, frames, target / n)
    kept = torch.zeros(n, dtype=torch.bool, device=features.device)
    for frame_id, k in zip(ids.tolist(), counts.tolist()):
        members = (frames == frame_id).nonzero().flatten()
        kept[members[ascending(similarity[members])[:k]]] = True
    current = int(kept.sum())
    if current > target:  # drop the most redundant kept tokens, the later one first among equals
        members = kept.nonzero().flatten().flip(0)
        order = torch.sort(similarity[members], descending=True, stable=True).indices
        kept[members[order[: current - target]]] = False
    elif current < target:  # add the most unique dropped tokens
        members = (~kept).nonzero().flatten()
        kept[members[ascending(similarity[members])[: target - current]]] = True
    return kept.nonzero().flatten()


@register_scorer("vidcom2")
@dataclass
class VidCom2Scorer(Scorer):
    """VidCom2 (Liu et al., EMNLP 2025): frames that differ from the video keep more tokens; within a frame the tokens
    least like the video and their frame stay.

    Runs on the current hidden states (at the pre-LLM stage, as the official code, the projected
    vision features) of each sample, its frames given by the vision-token layout (a Qwen2-VL /
    Qwen2.5-VL video's temporal grid steps, a OneVision clip's pooled frames, each image of a
    multi-image prompt such as the proxy's ``digits-video``; one image is one frame). Tokens of no
    frame (OneVision's video newline) always stay, on top of the count. The score of a token is minus
    its video + frame similarity; the kept set comes from ``select`` (``vidcom2_keep``), whose
    per-frame budgets sum to exactly the schedule's count.

    Parameters
    ----------
    channel_share : float
        Share of the feature channels (those of lowest variance) the similarities are computed on (official 0.5).
    """

    channel_share: float = 0.5
    temperature: ClassVar[float] = 0.01  # softmax temperature of the frame budgets (fixed in the official code)

    def __post_init__(self):
        if not 0.0 < self.channel_share <= 1.0:
            raise ValueError(f"vidcom2 channel_share must be in (0, 1], got {self.channel_share}")

    def frame_tokens(self, state: LayerState, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into ``state.vision_idx``, frame ids) of sample ``b``'s tokens that belong to a frame."""
        n = int(state.vision_valid[b].sum())
        groups = token_groups(state, b, n)
        members = (groups >= 0).nonzero().flatten()
        return members, groups[members]

    def features(self, state: LayerState, b: int, members: torch.Tensor) -> torch.Tensor:
        """(m, D) the current hidden states of sample ``b``'s vision tokens ``members``."""
        return state.hidden[b, state.vision_idx[b, members]]

    def score(self, state: LayerState) -> torch.Tensor:
        """Minus the video + frame similarity of each frame token; tokens of no frame score the sample's maximum."""
        out = torch.full(state.vision_idx.shape, float("-inf"), device=state.hidden.device)
        for b in range(out.shape[0]):
            members, frames = self.frame_tokens(state, b)
            n = int(state.vision_valid[b].sum())
            if not len(members):
                out[b, :n] = 0.0
                continue
            video, frame = vidcom2_similarity(self.features(state, b, members), frames, self.channel_share)
            scores = -(video + frame)
            out[b, :n] = scores.max()
            out[b, members] = scores
        return out

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per sample, ``vidcom2_keep`` of its frame tokens at the count, and every token of no frame."""
        keep = []
        for b, k in enumerate(counts):
            n = int(state.vision_valid[b].sum())
            members, frames = self.frame_tokens(state, b)
            if k >= n or not len(members):
                keep.append(torch.arange(n, device=scores.device))
                continue
            others = torch.ones(n, dtype=torch.bool, device=scores.device)
            others[members] = False
            chosen = members[vidcom2_keep(self.features(state, b, members), frames, k, self.channel_share)]
            keep.append(torch.cat([chosen, others.nonzero().flatten()]).sort().values)
        return Selection(keep=keep)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """Variances, normalisation and the two kernel distances on half the channels: about 6·n·D."""
        return 6.0 * n_vision * hidden
