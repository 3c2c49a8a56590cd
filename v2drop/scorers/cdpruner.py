"""CDPruner: the vision tokens a conditional DPP picks, similarity of the projected features weighted by relevance.

Official code: ``Theia-4869/CDPruner``, ``llava/model/llava_arch.py`` (``encode_images``, lines 141-186: the
kernel and the fast greedy MAP inference) and ``llava/model/multimodal_encoder/clip_encoder.py`` (the CLIP text
tower's instruction embedding, lines 38-96). The relevance here comes from the LLM's own input embeddings of the
instruction (``relevance="llm_embeddings"``): v2drop's models carry no CLIP text tower. Definition and
differences: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2drop.scorers.base import LayerState, Scorer, Selection, register_scorer
from v2drop.scorers.vispruner import select_per_group

RELEVANCE_SOURCES = ("llm_embeddings",)


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` picks of the fast greedy MAP inference of a DPP with (n, n) ``kernel``, in pick order.

    Each pick is the item with the largest remaining gain ``d_j²`` (at first the kernel's diagonal),
    ties to the lower index; after picking ``j``, ``e = (L[j] − Σ c_t[j] c_t) / √d_j²`` joins the
    ``c`` vectors and every gain drops by ``e²``. Once no gain is above ``1e-12`` times the largest
    diagonal entry (the kernel's rank is used up; only rounding is left) the remaining picks follow
    the diagonal, largest first. Computed in float64.
    """
    n = kernel.shape[0]
    kernel = kernel.double()
    gains = torch.diagonal(kernel).clone()
    tol = 1e-12 * float(gains.max()) if n else 0.0
    cis = kernel.new_zeros(min(k, n), n)
    picked = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    order = []
    for i in range(min(k, n)):
        j = int(torch.argmax(gains.masked_fill(picked, float("-inf"))))
        if not gains[j] > tol:
            break
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / gains[j].sqrt()
        cis[i] = e
        gains = gains - e.square()
        picked[j] = True
        order.append(j)
    if len(order) < min(k, n):
        diagonal = torch.diagonal(kernel).masked_fill(picked, float("-inf"))
        rest = torch.sort(diagonal, descending=True, stable=True).indices[: min(k, n) - len(order)]
        order.extend(rest.tolist())
    return torch.tensor(order, dtype=torch.long, device=kernel.device)


def relevance(vision: torch.Tensor, text: torch.Tensor, negate: bool = True) -> torch.Tensor:
    """CDPruner's relevance of each of the (n, D) ``vision`` features to the (m, D) ``text`` features, (n,) float.

    The mean cosine similarity to the text rows, negated when ``negate`` (the official sign), then
    min–max normalised: ``(r − min + 1e-6) / (max − min)``; all ones when every value is the same.
    """
    cos = F.normalize(vision.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    r = cos.mean(dim=-1)
    r = -r if negate else r
    spread = r.max() - r.min()
    if not spread > 0:
        return torch.ones_like(r)
    return (r - r.min() + 1e-6) / spread


@register_scorer("cdpruner")
@dataclass
class CDPrunerScorer(Scorer):
    """CDPruner (Zhang et al., NeurIPS 2025) at a stage keeping k vision tokens.

    Each image (on LLaVA-NeXT each crop) keeps an equal share of k: the first picks of
    ``dpp_greedy`` on the kernel ``L_ij = r_i · cos(x_i, x_j) · r_j`` over its vision tokens' current
    hidden states ``x`` (at the pre-LLM stage the projected features, as official) with the
    relevance ``r`` of each token to the instruction (``relevance``, normalised over the sample's
    vision tokens). The instruction is the sample's text tokens after its last vision token.

    Parameters
    ----------
    relevance : str
        Where the instruction's features come from: ``"llm_embeddings"``, the hidden states of the
        instruction tokens at the stage (at the pre-LLM stage the LLM's input embeddings). The official
        CLIP-text variant is not available (no CLIP text tower in the supported models).
    negate : bool
        Negate the mean cosine before normalising, as the official code does for CLIP features.
    """

    relevance: str = "llm_embeddings"
    negate: bool = True

    def __post_init__(self):
        if self.relevance not in RELEVANCE_SOURCES:
            raise ValueError(
                f"cdpruner relevance must be one of {RELEVANCE_SOURCES}, got {self.relevance!r}; the official "
                "'clip_text' relevance needs a CLIP text tower, which the supported models do not have"
            )

    def instruction(self, state: LayerState, b: int, n: int) -> torch.Tensor:
        """(m, D) hidden states of sample ``b``'s text tokens after its last vision token (the instruction)."""
        last = int(state.vision_idx[b, n - 1])
        after = state.attention_mask[b].bool().clone()
        after[: last + 1] = False
        return state.hidden[b, after]

    def sample_relevance(self, state: LayerState, b: int, n: int) -> torch.Tensor:
        """(n,) relevance of sample ``b``'s vision tokens to its instruction (ones when it has no instruction)."""
        text = self.instruction(state, b, n)
        vision = state.hidden[b, state.vision_idx[b, :n]]
        if len(text) == 0:
            return torch.ones(n, device=vision.device)
        return relevance(vision, text, self.negate)

    def score(self, state: LayerState) -> torch.Tensor:
        """Each vision token's relevance to the instruction, (B, V) float32 (padded entries −inf)."""
        out = torch.full(state.vision_idx.shape, float("-inf"), device=state.hidden.device)
        for b, n in enumerate(state.vision_valid.sum(1).tolist()):
            if n:
                out[b, :n] = self.sample_relevance(state, b, n)
        return out

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """Per image (crop): the DPP's first picks on the relevance-weighted similarity kernel."""
        n_valid = state.vision_valid.sum(1).tolist()
        feats = [F.normalize(state.hidden[b, state.vision_idx[b, :n]].float(), dim=-1) for b, n in enumerate(n_valid)]

        def pick(b: int, members: torch.Tensor, k: int) -> torch.Tensor:
            x = feats[b][members].double()
            r = scores[b, members].double()
            return dpp_greedy(r[:, None] * (x @ x.T) * r[None, :], k)

        return select_per_group(state, scores, counts, pick)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The similarity kernel (2·n²·D), the relevance (2·n·m·D, m ≤ n_tokens) and the greedy DPP (~2·k·n² ≤ 2·n³)."""
        return 2.0 * n_vision * n_vision * hidden + 2.0 * n_vision * n_tokens * hidden + 2.0 * n_vision**3
