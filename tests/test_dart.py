"""DART (``v2drop/scorers/dart.py``) against the official definition, on hand-made tensors and on real models.

Official code (``ZichenWen1/DART``, read at the fork ``xqy1111111/DART`` HEAD d6a5af6),
``llava/model/language_model/modeling_llama_self.py``:
- the stage (lines 337-342): before decoder layer K, ``last_layer_state = self.norm(layer_outputs[0])``
  (the model's final norm of layer K − 1's output) and ``any_states = layer_outputs[-2]``, the
  key states layer K − 1 returned: after RoPE (line 572) and the cache update (line 576), repeated
  over grouped-query heads (line 578; returned at 621 and 993);
- ``get_retained_image_token`` (lines 397-449): TOKEN_TOPK = budget // (pivot_image_token +
  pivot_text_token) (line 409); pivots = the top ``pivot_image_token`` vision tokens and top
  ``pivot_text_token`` tokens after the image by the L1 norm of those keys (lines 421-428); for
  each pivot in turn (line 434), the TOKEN_TOPK remaining non-pivot vision tokens with the lowest
  cosine similarity to it on ``last_layer_state`` are added and removed from the candidates
  (lines 435-442); the text pivots are removed at the end (line 445).
Pruning layer K = 2 and 4 + 4 pivots: ``scripts/v1_5/eval/textvqa.sh`` lines 20-27. The Qwen2-VL
variant (``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`` lines 341-349 and 401-445) is the
same procedure on the same keys and norm.
"""

import math

import pytest
import torch
from torch import nn

import v2drop
from v2drop import Method, Schedule, build_scorer
from v2drop.scorers import LayerState
from v2drop.scorers.dart import official_pivot_order
from v2drop.testing import FAMILIES, batch_for


def state_for(
    hidden: torch.Tensor, keys: torch.Tensor, vision_pos: list[int], norm: nn.Module, layer_idx: int = 2
) -> LayerState:
    """A one-sample LayerState over ``hidden`` (L, D) with layer K − 1's cached ``keys`` (L, K) and the final
    ``norm``."""
    L = hidden.shape[0]
    v = torch.tensor([vision_pos])
    return LayerState(
        layer_idx=layer_idx,
        hidden=hidden[None],
        vision_idx=v,
        vision_valid=torch.ones_like(v, dtype=torch.bool),
        vision_coords=torch.zeros(1, len(vision_pos), 3, dtype=torch.long),
        orig_idx=torch.arange(L)[None],
        attention_mask=torch.ones(1, L, dtype=torch.long),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
        prev_keys=keys[None],
        final_norm=norm,
    )


def dart_keep(scorer, state: LayerState, k: int) -> list[int]:
    """The scorer's kept vision indices for one sample keeping ``k``."""
    scores = scorer.score(state)
    return scorer.select(state, scores, [k]).keep[0].tolist()


def weighted_norm(weights) -> nn.RMSNorm:
    """An RMSNorm with the given weights (a per-token scale, so cosines see only the weights)."""
    norm = nn.RMSNorm(len(weights), eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(weights))
    return norm


# Positions: 0 = text before the image, 1..6 = vision tokens v0..v5, 7 and 8 = text after the image.
# KEYS are layer K − 1's cached keys (they choose the pivots); HIDDEN is layer K's input (the
# final norm of it is what the cosines compare). The final norm weighs the coordinates (1, 2).
KEYS = torch.tensor(
    [
        [9.0, 9.0],  # 0 text before the image: the largest norm, but pivots come from the text after it
        [1.0, 0.0],  # v0  L1 1
        [0.5, 0.5],  # v1  L1 1
        [-1.0, 1.0],  # v2  L1 2
        [0.0, 1.5],  # v3  L1 1.5
        [2.0, -3.0],  # v4  L1 5    <- the vision pivot
        [0.0, -0.5],  # v5  L1 0.5
        [-3.0, 0.0],  # 7   L1 3    <- the text pivot
        [0.5, 0.5],  # 8   L1 1
    ]
)
HIDDEN = torch.tensor(
    [
        [5.0, 5.0],  # 0
        [3.0, 0.0],  # v0  normed direction (3, 0)
        [1.0, 0.5],  # v1  (1, 1)
        [0.0, 1.0],  # v2  (0, 2)
        [-1.0, -0.5],  # v3  (-1, -1)
        [1.0, 1.5],  # v4  (1, 3)
        [0.2, -2.0],  # v5  (0.2, -4)
        [2.0, 0.0],  # 7   (2, 0)
        [1.0, -1.0],  # 8   (1, -2)
    ]
)
FINAL_NORM = weighted_norm([1.0, 2.0])


def test_hand_made_keep_set_follows_the_previous_layers_keys_and_the_final_norm():
    """pivot_image = pivot_text = 1, keep 3: TOKEN_TOPK = (3 - 1) // 2 = 1 (line 409 with budget 2).

    Pivots by the L1 norm of KEYS (lines 424-428): v4 (5) among the vision tokens and position 7
    (3) after the image (position 0's 18 is before it). Order v4, then 7 (line 434; a set of
    small ints iterates ascending). Cosines on the final norm (directions in HIDDEN's comments):
    v4 = (1, 3): v0 0.316, v1 0.894, v2 0.949, v3 -0.894, v5 -0.932 -> claims v5 (line 437).
    Position 7 = (2, 0): v0 1, v1 0.707, v2 0, v3 -0.707 -> claims v3. Kept: v3, v4, v5.
    (Without the final norm's weights v4 would claim v3 (-0.868 < -0.773) and 7 then v2; with the
    drop layer's own keys of HIDDEN the vision pivot would be v0.)
    """
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HIDDEN, KEYS, [1, 2, 3, 4, 5, 6], FINAL_NORM), 3) == [3, 4, 5]
    assert dart_keep(scorer, state_for(HIDDEN, KEYS, [1, 2, 3, 4, 5, 6], nn.Identity()), 3) == [2, 3, 4]


def test_hand_made_keep_set_two_claims_per_pivot():
    """Keep 5: TOKEN_TOPK = 2. v4 claims v5 (-0.932) and v3 (-0.894); position 7 then chooses
    among v0 (1), v1 (0.707), v2 (0): v2 and v1. Kept: v1 .. v5 (v0 dropped)."""
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HIDDEN, KEYS, [1, 2, 3, 4, 5, 6], FINAL_NORM), 5) == [1, 2, 3, 4, 5]


def test_uneven_budget_gives_the_first_pivot_one_more():
    """Keep 4 (3 claims for 2 pivots, not a multiple; the official code can only keep 1 + 2·TOPK):
    v4 claims two (v5, v3), position 7 one (v2). Kept: v2, v3, v4, v5."""
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HIDDEN, KEYS, [1, 2, 3, 4, 5, 6], FINAL_NORM), 4) == [2, 3, 4, 5]


def test_keeping_fewer_than_the_vision_pivots_keeps_the_largest_keys():
    """Keep 1 with 1 vision pivot: only v4 (the largest cached key norm) stays."""
    scorer = build_scorer("dart", pivot_image=1, pivot_text=1)
    assert dart_keep(scorer, state_for(HIDDEN, KEYS, [1, 2, 3, 4, 5, 6], FINAL_NORM), 1) == [4]


def official_keep(
    keys: torch.Tensor,
    groups: int,
    features: torch.Tensor,
    start: int,
    length: int,
    pivot_image: int,
    pivot_text: int,
    budget: int,
    set_order: bool = False,
) -> list[int]:
    """The official procedure (lines 409-449) written again from its definition, on positions ``start..``.

    ``keys`` (L, H_kv, d) are layer K − 1's cached keys; like the official ``repeat_kv`` (line 578)
    each key head is repeated ``groups`` times, then the heads are concatenated (line 419) before
    the L1 norm. ``features`` (L, D) are the final norm of layer K's input (line 341). The official
    loop visits the pivots in the iteration order of a Python ``set`` of positions (line 434,
    ``set_order=True``, ``pivot_order="official"``); ``pivot_order="position"`` visits them in
    ascending position order (``set_order=False``, ``docs/methods.md``).
    """
    repeated = keys.float().repeat_interleave(groups, dim=1).flatten(1)
    feats = features.float()
    topk = budget // (pivot_image + pivot_text)
    norms = torch.norm(repeated, p=1, dim=-1)
    image_idx = (norms[start : start + length].topk(pivot_image).indices + start).tolist()
    query_idx = (norms[start + length :].topk(pivot_text).indices + start + length).tolist()
    chosen = set(image_idx + query_idx)
    valid = set(range(start, start + length)) - set(image_idx)
    for item in list(chosen.copy()) if set_order else sorted(chosen):
        valid_list = sorted(valid)
        sim = -torch.nn.functional.cosine_similarity(feats[item], feats[valid_list], dim=-1)
        picked = [valid_list[i] for i in sim.topk(topk).indices.tolist()]
        chosen.update(picked)
        valid.difference_update(picked)
    chosen.difference_update(query_idx)
    return sorted(i - start for i in chosen)


@pytest.mark.parametrize("seed", range(4))
def test_random_tensors_match_the_official_procedure_at_its_budgets(seed):
    """Random keys and features, 24 vision tokens at 3..26, 5 text tokens after: with
    ``budget = 8·t`` our count ``4 + 8·t`` gives the official kept set (lines 409-449)."""
    torch.manual_seed(seed)
    D = 16
    norm = weighted_norm(torch.empty(D).uniform_(0.5, 1.5).tolist())
    hidden, keys = torch.randn(32, D), torch.randn(32, 2, 4)  # 2 key heads of 4, each serving 2 query heads
    for t in (1, 2):
        ours = dart_keep(build_scorer("dart"), state_for(hidden, keys.flatten(1), list(range(3, 27)), norm), 4 + 8 * t)
        with torch.no_grad():
            assert ours == official_keep(keys, 2, norm(hidden), 3, 24, 4, 4, 8 * t)


def test_official_pivot_order_is_the_python_set_order():
    """Hand-worked CPython order: 8 small ints live in a 32-slot table at slot ``position mod 32``
    (72 collides with 40 at slot 8 and probes to slot 9): 100 (4), 646 (6), 40 (8), 72 (9),
    650 (10), 620 (12), 51 (19), 700 (28); position order would be 40, 51, 72, 100, 620, ..."""
    assert official_pivot_order([40, 72, 100, 51], [646, 620, 650, 700]) == [100, 646, 40, 72, 650, 620, 51, 700]
    assert official_pivot_order([5, 7], []) == [5, 7] and official_pivot_order([6], [8]) == [8, 6]  # 8 slots: 8 -> 0


# HIDDEN and KEYS one position later: one more text token before the image (pad-like, never a pivot).
SHIFTED_HIDDEN, SHIFTED_KEYS = torch.cat([HIDDEN[:1], HIDDEN]), torch.cat([KEYS[:1], KEYS])


def test_official_pivot_order_changes_the_kept_set_when_the_text_pivot_comes_first():
    """Keep 5 with 1 + 1 pivots, two claims each. Vision at positions 2..7: the pivots are v4
    (position 6) and the text token at 8; the set {6, 8} iterates 8 first (8 slots: 8 mod 8 = 0).
    Position order (v4 first): v4 claims v5 (-0.932), v3 (-0.894); 8 = (2, 0) then v2 (0), v1
    (0.707): kept v1..v5. Official order (8 first): 8 claims v3 (-0.707), v2 (0); v4 then v5
    (-0.932), v0 (0.316): kept v0, v2, v3, v4, v5."""
    state = state_for(SHIFTED_HIDDEN, SHIFTED_KEYS, [2, 3, 4, 5, 6, 7], FINAL_NORM)
    assert dart_keep(build_scorer("dart", pivot_image=1, pivot_text=1), state, 5) == [1, 2, 3, 4, 5]
    official = build_scorer("dart", pivot_image=1, pivot_text=1, pivot_order="official")
    assert dart_keep(official, state, 5) == [0, 2, 3, 4, 5]
    # in the unshifted layout the set {5, 7} iterates in position order: both options agree
    unshifted = state_for(HIDDEN, KEYS, [1, 2, 3, 4, 5, 6], FINAL_NORM)
    assert dart_keep(official, unshifted, 5) == [1, 2, 3, 4, 5]


def test_official_pivot_order_counts_positions_in_the_unpadded_sample():
    """Left padding does not move the official positions: a padded copy of the shifted layout keeps the same set."""
    pad = torch.zeros(3, 2)
    state = state_for(torch.cat([pad, SHIFTED_HIDDEN]), torch.cat([pad, SHIFTED_KEYS]), [5, 6, 7, 8, 9, 10], FINAL_NORM)
    state.attention_mask[0, :3] = 0
    official = build_scorer("dart", pivot_image=1, pivot_text=1, pivot_order="official")
    assert dart_keep(official, state, 5) == [0, 2, 3, 4, 5]


def test_official_count_gives_every_pivot_the_same_share():
    """Keep 4 with 1 + 1 pivots: the official TOKEN_TOPK = (4 - 1) // 2 = 1 claim each, so 3 kept
    (position order shares 2 + 1 and keeps 4)."""
    state = state_for(HIDDEN, KEYS, [1, 2, 3, 4, 5, 6], FINAL_NORM)
    assert dart_keep(build_scorer("dart", pivot_image=1, pivot_text=1, pivot_order="official"), state, 4) == [3, 4, 5]


@pytest.mark.parametrize("seed", range(3))
def test_random_tensors_match_the_official_set_order_at_llava_positions(seed):
    """576 vision tokens at the LLaVA-1.5 offset 35, 12 text tokens after: ``pivot_order="official"``
    with ``4 + 8·t`` keeps the official set (set iteration order), ``position`` the sorted-order one."""
    torch.manual_seed(seed)
    D, start, n = 16, 35, 576
    L = start + n + 12
    norm = weighted_norm(torch.empty(D).uniform_(0.5, 1.5).tolist())
    hidden, keys = torch.randn(L, D), torch.randn(L, 2, 4)
    state = state_for(hidden, keys.flatten(1), list(range(start, start + n)), norm)
    with torch.no_grad():
        feats = norm(hidden)
        for t in (8, 16):
            official = dart_keep(build_scorer("dart", pivot_order="official"), state, 4 + 8 * t)
            ours = dart_keep(build_scorer("dart"), state, 4 + 8 * t)
            assert official == official_keep(keys, 2, feats, start, n, 4, 4, 8 * t, set_order=True)
            assert ours == official_keep(keys, 2, feats, start, n, 4, 4, 8 * t)
            assert official != ours  # at these positions the set order is not the position order


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="pivot_order"):
        build_scorer("dart", pivot_order="sorted")
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


@pytest.mark.parametrize("budget,kept", [(192, 196), (128, 132), (64, 68)])
def test_official_presets_keep_the_official_count(budget, kept):
    """The official code's count after layer 2: 4 vision pivots + 8 pivots · (budget // 8) claims."""
    method = Method.from_preset(f"dart-official-llava15-{budget}")
    assert method.scorer.pivot_order == "official" and (method.scorer.pivot_image, method.scorer.pivot_text) == (4, 4)
    assert (
        method.schedule.layers == (2,)
        and method.schedule.counts(576) == [kept]
        and method.position_policy == "preserve"
    )


def test_qwen2vl_preset_removes_77_8_percent_on_average():
    method = Method.from_preset("dart-qwen2vl-778")
    assert method.reference_depth == 28 and method.schedule.layers == (2,)
    assert math.isclose(method.schedule.average_tokens(28, 1000) / 1000, 0.222, abs_tol=0.001)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family_and_keeps_what_the_definition_keeps(tiny, family):
    """On each tiny family, the engine's kept set equals ``official_keep`` on the real layer state
    (the cached keys of layer 1 and the final norm of layer 2's input).

    LLaVA-style models (64 or 136 tokens) use the official 4 + 4 pivots keeping 4 + 8·2; the tiny
    Qwen models have 4 to 9 vision tokens and the tiny Gemma 3 16, so 1 + 1 pivots keeping 1 + 2·2 (Gemma 3:
    the keys of its local layer 1, recomputed from that layer's input).
    """
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    pivots, t = (1, 2) if family.startswith("qwen") or family == "gemma3" else (4, 2)
    k = pivots + 2 * pivots * t
    method = Method(
        build_scorer("dart", pivot_image=pivots, pivot_text=pivots),
        schedule=Schedule.one_shot(2, k, keep_mode="absolute"),
    )
    states = []
    score = method.scorer.score
    method.scorer.score = lambda state: states.append(state) or score(state)
    out = lvlm.generate(prompts, images, method=method, max_new_tokens=2)
    assert len(states) == 1
    state, checked = states[0], 0
    cfg = lvlm.model.config.text_config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
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
            keys = state.prev_keys[b].unflatten(-1, (cfg.num_key_value_heads, -1))
            expected = official_keep(
                keys, groups, state.final_norm(state.hidden[b]), start, n, pivots, pivots, 2 * pivots * t
            )
        assert kept == expected
        assert trace.vision_tokens_per_layer[2:] == [k] * (lvlm.depth - 2)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_keys_are_the_previous_layers_post_rope_keys_of_a_plain_forward(tiny, family):
    """The keys DART reads before layer 2 are the keys layer 1 caches in a plain transformers forward
    (after RoPE; M-RoPE on Qwen2-VL), sample by sample, although the engine ran a padded batch;
    the similarity norm is the model's final norm (official lines 337-342)."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    method = Method(
        build_scorer("dart", pivot_image=1, pivot_text=1), schedule=Schedule.one_shot(2, 3, keep_mode="absolute")
    )
    states = []
    score = method.scorer.score
    method.scorer.score = lambda state: states.append(state) or score(state)
    lvlm.generate(prompts, images, method=method, max_new_tokens=1)
    (state,) = states
    assert state.final_norm is lvlm.model.model.language_model.norm
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        with torch.no_grad():
            plain = lvlm.model(**lvlm.prepare([prompt], [image]), use_cache=True).past_key_values
        expected = plain.layers[1].keys[0].transpose(0, 1).flatten(1)  # (L_b, H_kv * d)
        real = state.attention_mask[b].bool()
        assert state.prev_keys.shape[1] == state.hidden.shape[1] and int(real.sum()) == expected.shape[0]
        torch.testing.assert_close(state.prev_keys[b, real], expected, rtol=0, atol=1e-5)


def test_needs_the_layer_before_the_stage():
    """Layer K − 1's keys do not exist before layer 0 or at the pre-LLM stage."""
    with pytest.raises(ValueError, match="stage layer must be >= 1"):
        Method(build_scorer("dart"), schedule=Schedule.one_shot(0, 0.5))


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


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_official_order_in_a_padded_batch_keeps_what_each_sample_keeps_alone(tiny, family):
    """Positions are counted in each sample's unpadded sequence, so padding does not change the set order."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)

    def official():
        scorer = build_scorer("dart", pivot_order="official")
        return Method(scorer, schedule=Schedule.one_shot(2, 4 + 8 * 2, keep_mode="absolute"))

    batch = lvlm.generate(prompts, images, method=official(), max_new_tokens=1)
    for i in range(3):
        alone = lvlm.generate(prompts[i : i + 1], images[i : i + 1], method=official(), max_new_tokens=1)
        assert alone.traces[0].stages == batch.traces[i].stages
