"""DART (``v2drop/scorers/dart.py``) against the official definition, on hand-made tensors and on real models.

Official code (``ZichenWen1/DART``, read at the fork ``xqy1111111/DART`` HEAD d6a5af6):
``llava/model/language_model/modeling_llama_self.py`` ``get_retained_image_token`` (lines 397-449):
TOKEN_TOPK = budget // (pivot_image_token + pivot_text_token) (line 409); pivots = the top
``pivot_image_token`` vision tokens and top ``pivot_text_token`` tokens after the image by the L1
norm of their keys (lines 421-428); for each pivot in turn, the TOKEN_TOPK remaining non-pivot
vision tokens with the lowest cosine similarity to it are added and removed from the candidates
(lines 431-442); the text pivots are removed at the end (line 445). Pruning layer K = 2 and 4 + 4
pivots: ``scripts/v1_5/eval/textvqa.sh`` lines 20-29. The Qwen2-VL variant
(``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`` lines 401-445) is the same procedure.
"""

import math

import pytest
import torch
from torch import nn

import v2drop
from v2drop import Method, Schedule, build_scorer
from v2drop.scorers import LayerState
from v2drop.scorers.dart import key_l1_norms
from v2drop.testing import FAMILIES, batch_for


class IdentityLayer(nn.Module):
    """A decoder layer whose norm and key projection are the identity: keys = features = hidden states."""

    def __init__(self, dim: int):
        super().__init__()
        self.input_layernorm = nn.Identity()
        self.self_attn = nn.Module()
        self.self_attn.k_proj = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.self_attn.k_proj.weight.copy_(torch.eye(dim))


def state_for(hidden: torch.Tensor, vision_pos: list[int], layer: nn.Module, layer_idx: int = 2) -> LayerState:
    """A one-sample LayerState over ``hidden`` (L, D) with vision tokens at ``vision_pos``."""
    L = hidden.shape[0]
    v = torch.tensor([vision_pos])
    return LayerState(
        layer_idx=layer_idx, hidden=hidden[None], vision_idx=v, vision_valid=torch.ones_like(v, dtype=torch.bool),
        vision_coords=torch.zeros(1, len(vision_pos), 3, dtype=torch.long), orig_idx=torch.arange(L)[None],
        attention_mask=torch.ones(1, L, dtype=torch.long), sample_keys=torch.zeros(1, dtype=torch.long), layer=layer,
    )


def dart_keep(scorer, state: LayerState, k: int) -> list[int]:
    """The scorer's kept vision indices for one sample keeping ``k``."""
    scores = scorer.score(state)
    return scorer.select(state, scores, [k]).keep[0].tolist()


# Positions: 0 = text before the image, 1..6 = vision tokens v0..v5, 7 and 8 = text after the image.
HAND = torch.tensor([
    [5.0, 5.0],    # 0 text before the image: never a pivot (official pivots come from the text after it)
    [3.0, 0.0],    # v0  L1 3   <- the vision pivot
    [1.0, 0.0],    # v1  L1 1
    [0.0, 1.0],    # v2  L1 1
    [-1.0, 0.0],   # v3  L1 1
    [1.0, 1.5],    # v4  L1 2.5
    [0.2, -2.0],   # v5  L1 2.2
    [0.0, 0.5],    # 7   L1 0.5
    [1.0, -1.0],   # 8   L1 2   <- the text pivot
])


def test_hand_made_keep_set_one_claim_per_pivot():
    """pivot_image = pivot_text = 1, keep 3: TOKEN_TOPK = (3 - 1) // 2 = 1 (official line 409 with budget 2).

    Pivots (official lines 424-428): v0 (key L1 3, the largest vision norm) and position 8 (L1 2,
    the largest after the image). Official order: v0 then 8 (a set of small ints iterates
    ascending). v0 = (3, 0): cosines v1 1, v2 0, v3 -1, v4 0.55, v5 0.10 -> claims v3. Position 8
    = (1, -1): cosines v1 0.71, v2 -0.71, v4 -0.20, v5 0.77 -> claims v2. Kept: v0, v2, v3.
    """
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HAND, [1, 2, 3, 4, 5, 6], IdentityLayer(2)), 3) == [0, 2, 3]


def test_hand_made_keep_set_two_claims_per_pivot():
    """Keep 5: TOKEN_TOPK = 2. v0 claims v3 (-1) and v2 (0); position 8 then chooses among v1
    (0.71), v4 (-0.20), v5 (0.77): v4 and v1. Kept: v0, v1, v2, v3, v4 (v5 dropped)."""
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HAND, [1, 2, 3, 4, 5, 6], IdentityLayer(2)), 5) == [0, 1, 2, 3, 4]


def test_uneven_budget_gives_the_first_pivot_one_more():
    """Keep 4 (3 claims for 2 pivots, not a multiple; the official code can only keep 1 + 2·TOPK):
    v0 claims two (v3, v2), position 8 one (v4). Kept: v0, v2, v3, v4."""
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HAND, [1, 2, 3, 4, 5, 6], IdentityLayer(2)), 4) == [0, 2, 3, 4]


def test_keeping_fewer_than_the_vision_pivots_keeps_the_largest_keys():
    """Keep 1 with 1 vision pivot: only v0 (the largest key norm) stays."""
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HAND, [1, 2, 3, 4, 5, 6], IdentityLayer(2)), 1) == [0]


def official_keep(hidden: torch.Tensor, layer: nn.Module, start: int, length: int, pivot_image: int, pivot_text: int, budget: int) -> list[int]:
    """The official procedure (lines 409-449) written again from its definition, on positions ``start..``.

    The official loop visits the pivots in the iteration order of a Python ``set`` of positions,
    which is ascending while the positions stay below the set's table size; we visit them in
    ascending position order always (``docs/methods.md``).
    """
    keys = layer.self_attn.k_proj(layer.input_layernorm(hidden)).float()
    feats = layer.input_layernorm(hidden).float()
    topk = budget // (pivot_image + pivot_text)
    norms = keys.abs().sum(-1)
    image_idx = (norms[start:start + length].topk(pivot_image).indices + start).tolist()
    query_idx = (norms[start + length:].topk(pivot_text).indices + start + length).tolist()
    chosen = set(image_idx + query_idx)
    valid = set(range(start, start + length)) - set(image_idx)
    for item in sorted(chosen):
        valid_list = sorted(valid)
        sim = -torch.nn.functional.cosine_similarity(feats[item], feats[valid_list], dim=-1)
        picked = [valid_list[i] for i in sim.topk(topk).indices.tolist()]
        chosen.update(picked)
        valid.difference_update(picked)
    chosen.difference_update(query_idx)
    return sorted(i - start for i in chosen)


@pytest.mark.parametrize("seed", range(4))
def test_random_layer_matches_the_official_procedure_at_its_budgets(seed):
    """A random norm + key projection, 24 vision tokens at 3..26, 5 text tokens after: with
    ``budget = 8·t`` our count ``4 + 8·t`` gives the official kept set (lines 409-449)."""
    torch.manual_seed(seed)
    D = 16
    layer = IdentityLayer(D)
    layer.input_layernorm = nn.RMSNorm(D)
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.self_attn.k_proj.weight.normal_()
    hidden = torch.randn(32, D)
    for t in (1, 2):
        ours = dart_keep(build_scorer("dart"), state_for(hidden, list(range(3, 27)), layer), 4 + 8 * t)
        assert ours == official_keep(hidden, layer, 3, 24, 4, 4, 8 * t)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="pivot_image"):
        build_scorer("dart", pivot_image=-1)
    with pytest.raises(ValueError, match="at least one pivot"):
        build_scorer("dart", pivot_image=0, pivot_text=0)


@pytest.mark.parametrize("budget,kept", [(192, 166), (128, 98), (64, 30)])
def test_presets_average_the_budget_on_llava15(budget, kept):
    """One stage at the official K = 2 keeping ``(32·budget − 2·576) / 30`` tokens (FastV's rule)."""
    method = Method.from_preset(f"dart-llava15-{budget}")
    assert method.scorer_name == "dart" and method.schedule.layers == (2,) and method.position_policy == "preserve"
    assert method.schedule.counts(576) == [kept]
    assert abs(method.schedule.average_tokens(32, 576) - budget) < 0.5


def test_qwen2vl_preset_removes_77_8_percent_on_average():
    method = Method.from_preset("dart-qwen2vl-778")
    assert method.reference_depth == 28 and method.schedule.layers == (2,)
    assert math.isclose(method.schedule.average_tokens(28, 1000) / 1000, 0.222, abs_tol=0.001)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family_and_keeps_what_the_definition_keeps(tiny, family):
    """On each tiny family, the engine's kept set equals ``official_keep`` on the real layer state.

    LLaVA-style models (64 or 136 tokens) use the official 4 + 4 pivots keeping 4 + 8·2; the tiny
    Qwen models have 4 to 9 vision tokens, so 1 + 1 pivots keeping 1 + 2·2.
    """
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    pivots, t = (1, 2) if family.startswith("qwen") else (4, 2)
    k = pivots + 2 * pivots * t
    method = Method(build_scorer("dart", pivot_image=pivots, pivot_text=pivots), schedule=Schedule.one_shot(2, k, keep_mode="absolute"))
    states = []
    score = method.scorer.score
    method.scorer.score = lambda state: states.append(state) or score(state)
    out = lvlm.generate(prompts, images, method=method, max_new_tokens=2)
    assert len(states) == 1
    state, checked = states[0], 0
    for b, trace in enumerate(out.traces):
        n = int(state.vision_valid[b].sum())
        vision = state.vision_idx[b, :n]
        kept = [int((state.orig_idx[b, vision] == p).nonzero()) for p in trace.stages[0]["kept"]]
        if n <= k:
            assert kept == list(range(n))
            continue
        start = int(vision[0])
        assert vision.tolist() == list(range(start, start + n))  # one image: one block, text after it
        with torch.no_grad():
            expected = official_keep(state.hidden[b], state.layer, start, n, pivots, pivots, 2 * pivots * t)
        assert kept == expected
        assert trace.vision_tokens_per_layer[2:] == [k] * (lvlm.depth - 2)
        checked += 1
    assert checked >= 1


def test_runs_on_the_bundled_proxy():
    """The shipped proxy (256 vision tokens) with the 64-of-576 preset fitted to it, as the analysis commands do."""
    from v2drop.benchmarks import get_benchmark
    from v2drop.budgets import budget_method

    lvlm = v2drop.load("proxy")
    method = budget_method("dart", 64, lvlm.depth, 256)
    assert method.scorer_name == "dart" and len(method.schedule.stages) == 1
    sample = get_benchmark("digits").load("test", 1)[0]
    out = lvlm.generate([lvlm.format_prompt(sample.question)], [list(sample.images)], method=method, max_new_tokens=2)
    trace = out.traces[0]
    assert [s["layer"] for s in trace.stages] == list(method.schedule.layers)
    assert len(trace.stages[0]["kept"]) == method.schedule.counts(256)[0]
    assert abs(sum(trace.vision_tokens_per_layer) / lvlm.depth - 64 / 576 * 256) < 2
