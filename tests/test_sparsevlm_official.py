"""SparseVLM presets keep the official v1.5 code's tokens: positions renumbered after each prune.

The reference below runs the official procedure step by step on the tiny LLaVA's own tensors, with
the model's own decoder layers: before each stage layer l, layer l−1's head-averaged attention
rows of the raters (computed here from its q/k projections, rotary embedding and causal softmax)
score the vision tokens, the top ``k`` are kept, part of the dropped ones is recycled right after
the last kept vision token, and the positions of the new sequence are renumbered 0..n−1 (as the
official code, which rebuilds ``position_ids`` from the pruned length). Everything here —
raters, scores, kept sets, the recycling clusters, positions — is computed independently of the
engine and of ``v2drop.scorers.sparsevlm``, from the official v1.5 code (``Gumpest/SparseVLMs``,
branch ``v1.5``): ``llava/model/language_model/modelling_sparse_llama.py`` lines 199-204 (raters),
284-311 (recycling and re-insertion), ``llava/model/language_model/utils.py`` lines 247-310
(``cluster_and_merge``). One official detail is replaced: the official code adds a 1e-6 random
jitter to the cluster densities so that no two are equal, and ties are the rule, not the
exception (with k nearest neighbours = clusters = 2, two mutual nearest neighbours have the same
density; with 1 cluster every density is 1), so the official centres are random there. The
reference, like the scorer, breaks ties deterministically: of two equal densities the lower index
counts as denser. (The 1e-6 the official code adds to each cluster's size before averaging is
left out; it moves merged values by about 1e-6 relative.)
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from v2drop import Method
from v2drop.testing import build, image, prompt_for

STAGES = {2: 24, 4: 12, 5: 6}  # layer -> vision tokens kept (of the tiny LLaVA's 64)


@pytest.fixture(scope="module")
def tiny():
    return build("llava")


def attention_rows(layer, rotary, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Head-averaged causal attention probabilities (n, n) of ``layer`` on its input ``hidden`` (1, n, D) at
    ``positions``.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    n, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    cos, sin = rotary(x, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1).mean(1)[0]


def official_raters(hidden: torch.Tensor, vision: torch.Tensor, text_after: torch.Tensor) -> torch.Tensor:
    """Text tokens after the image whose mean (over vision tokens) softmax relevance is above the mean relevance."""
    text = text_after.nonzero().flatten()
    relevance = (hidden[vision] @ hidden[text].T).softmax(dim=1).mean(dim=0)
    return text[relevance > relevance.mean()]


def official_recycle(dropped: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top 30% (+1) of the dropped tokens by score, clustered by DPC-KNN into ⌊m/10⌋+1 clusters, averaged per
    cluster.

    Returns the merged tokens in the order the official code inserts them (centres by density × delta,
    descending) and each centre's index into ``dropped``.
    """
    m = int(dropped.shape[0] * 0.3) + 1
    top = scores.topk(m).indices
    x = dropped[top]
    clusters = int(m / 10) + 1
    dist = (x[:, None] - x[None]).norm(dim=-1) / x.shape[1] ** 0.5
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    index = torch.arange(m)
    # [i, j]: j is denser than i; equal densities: the lower index (the official code: random jitter)
    higher = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )
    delta = torch.where(higher, dist, dist.max()).min(dim=-1).values
    centres = (delta * density).topk(clusters).indices
    member_of = dist[centres].argmin(dim=0)
    member_of[centres] = torch.arange(clusters)
    merged = torch.stack([x[member_of == c].mean(dim=0) for c in range(clusters)])
    return merged, top[centres]


def official_kept_sets(lvlm, inputs, stages: dict[int, int]) -> tuple[list[list[int]], list[list[int]]]:
    """Kept vision tokens (original indices) per stage, and the position ids after each stage, as the official code."""
    model = lvlm.model
    lm = model.model.language_model
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[0]  # layer-0 input: text + image features
        ids = inputs["input_ids"][0]
        vision = ids == model.config.image_token_id
        L = ids.shape[0]
        last_vision = int(vision.nonzero().max())
        text_after = ~vision & (torch.arange(L) > last_vision)
        raters = set(official_raters(hidden[0], vision, text_after).tolist())
        orig = torch.arange(L)  # original index of each row (a recycled token: its cluster centre's)
        is_vision = vision.clone()
        positions = torch.arange(L)
        kept_sets, position_sets = [], []
        layer_input = previous_input = hidden  # stages start at layer 1: previous_input is reset below first
        for idx, layer in enumerate(lm.layers):
            if idx in stages:
                probs = attention_rows(lm.layers[idx - 1], lm.rotary_emb, previous_input, positions)
                rater_rows = torch.tensor([i for i, o in enumerate(orig.tolist()) if o in raters and not is_vision[i]])
                vision_rows = is_vision.nonzero().flatten()
                scores = probs[rater_rows][:, vision_rows].mean(0)
                top = torch.sort(scores, descending=True, stable=True).indices[: stages[idx]]
                kept_rows = vision_rows[top.sort().values]
                dropped = torch.ones(len(vision_rows), dtype=torch.bool)
                dropped[top] = False
                merged, centres = official_recycle(layer_input[0, vision_rows[dropped]], scores[dropped])
                kept_sets.append(orig[kept_rows].tolist())
                keep = [i for i in range(len(orig)) if not is_vision[i] or i in set(kept_rows.tolist())]
                last = int(kept_rows.max())
                before, after = [i for i in keep if i <= last], [i for i in keep if i > last]
                centre_orig = orig[vision_rows[dropped][centres]]
                layer_input = torch.cat([layer_input[:, before], merged[None], layer_input[:, after]], dim=1)
                orig = torch.cat([orig[before], centre_orig, orig[after]])
                is_vision = torch.cat([is_vision[before], torch.ones(len(centres), dtype=torch.bool), is_vision[after]])
                positions = torch.arange(len(orig))  # the official code renumbers after each prune
                position_sets.append(positions.tolist())
            previous_input = layer_input
            cos_sin = lm.rotary_emb(layer_input, positions[None])
            layer_input = layer(
                layer_input, attention_mask=None, position_ids=positions[None], position_embeddings=cos_sin
            )
            if isinstance(layer_input, tuple):
                layer_input = layer_input[0]
    return kept_sets, position_sets


def sparsevlm(policy: str) -> Method:
    return Method.from_dict(
        {
            "scorer": {"name": "sparsevlm"},
            "position_policy": policy,
            "schedule": {"keep_mode": "absolute", "stages": [[layer, k] for layer, k in STAGES.items()]},
        }
    )


def test_presets_renumber_positions():
    for budget in (64, 128, 192):
        assert Method.from_preset(f"sparsevlm-llava15-{budget}").position_policy == "renumber"


@pytest.mark.parametrize("question,seed", [("what is the digit in the middle of the image ?", 3), ("how many ?", 1)])
def test_kept_sets_match_the_official_procedure_at_every_stage(tiny, question, seed):
    inputs = tiny.prepare([prompt_for(tiny, question)], [[image(seed)]])
    kept, positions = official_kept_sets(tiny, inputs, STAGES)
    # hand-checked positions: contiguous from 0 after every prune, text and recycled tokens included
    assert [p == list(range(len(p))) for p in positions] == [True] * len(STAGES)
    n_text = int((inputs["input_ids"][0] != tiny.model.config.image_token_id).sum())
    assert len(positions[0]) == n_text + STAGES[2] + (int(0.3 * (64 - STAGES[2])) + 1) // 10 + 1
    out = tiny.generate_from_inputs(inputs, sparsevlm("renumber"), max_new_tokens=1)
    ours = [stage["kept"] for stage in out.traces[0].stages]
    assert [len(k) for k in kept] == list(STAGES.values())
    assert ours == kept
    # original positions (the old presets' policy) keep the same first stage, then diverge from the official code
    preserved = [
        stage["kept"]
        for stage in tiny.generate_from_inputs(inputs, sparsevlm("preserve"), max_new_tokens=1).traces[0].stages
    ]
    assert preserved[0] == kept[0] and preserved[1:] != kept[1:]
