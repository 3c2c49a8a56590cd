"""FastV, PDrop and SparseVLM: rows beside sdpa equal eager attention, SparseVLM's parts by hand, every mode runs."""

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from v2drop import LayerState, Method, Schedule, build_scorer, select_keep
from v2drop.scorers.fastv import FastVScorer
from v2drop.scorers.pdrop import PDropScorer
from v2drop.scorers.sparsevlm import SparseVLMScorer, density_peak_clusters, select_raters
from v2drop.testing import batch_for


def recording(scorer):
    """``scorer``, keeping in ``scorer.rows`` the attention rows the engine hands it (for comparison with eager)."""
    scorer.rows = []
    score = scorer.score

    def record(state):
        scorer.rows.append(state.attention)
        return score(state)

    scorer.score = record
    return scorer


def eager_probabilities(lvlm_eager, inputs, layer_idx: int) -> torch.Tensor:
    """(B, H, L, L) attention probabilities of one layer of the eager model's own forward."""
    seen = []
    handle = lvlm_eager.adapter.layers[layer_idx].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1]))
    try:
        with torch.no_grad():
            lvlm_eager.model(**inputs)
    finally:
        handle.remove()
    return seen[0].float()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("kind", ["fastv", "pdrop"])
def test_rows_beside_sdpa_equal_eager_attention(tiny, family, kind):
    sdpa, eager = tiny(family, "sdpa"), tiny(family, "eager")
    for (n1, p1), (n2, p2) in zip(sdpa.model.state_dict().items(), eager.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    prompts, images = batch_for(sdpa, 3, family)
    inputs = sdpa.prepare(prompts, images)
    drop_layer = 2
    scorer = recording(FastVScorer() if kind == "fastv" else PDropScorer())
    keep = 3 if family == "qwen2_vl" else 20
    out = sdpa.generate_from_inputs(
        inputs, Method(scorer, schedule=Schedule.one_shot(drop_layer, keep, keep_mode="absolute")), max_new_tokens=2
    )
    source_layer = drop_layer - 1 if kind == "fastv" else drop_layer
    reference = eager_probabilities(eager, inputs, source_layer).mean(1)[:, -1]  # (B, L): last prompt token, head mean
    rows = scorer.rows[0][:, 0]
    torch.testing.assert_close(rows, reference, atol=1e-5, rtol=0)
    vision = sdpa.adapter.vision_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    offsets = (inputs["attention_mask"] == 0).sum(1)
    for b in range(len(prompts)):
        positions = vision[b].nonzero().flatten()
        expected = positions[select_keep(reference[b, positions], keep)] - offsets[b]
        assert out.traces[b].stages[0]["kept"] == expected.tolist()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["fastv", "sparsevlm"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_faithful_keeps_the_same_tokens(tiny, family, name, attn):
    lvlm = tiny(family, attn)
    prompts, images = batch_for(lvlm, 2, family)
    inputs = lvlm.prepare(prompts, images)
    schedule = Schedule.progressive([2, 4], [0.5, 0.5])
    rows = lvlm.generate_from_inputs(inputs, Method(build_scorer(name), schedule=schedule), max_new_tokens=4)
    faithful = lvlm.generate_from_inputs(
        inputs, Method(build_scorer(name, faithful=True), schedule=schedule), max_new_tokens=4
    )
    assert [t.stages for t in faithful.traces] == [t.stages for t in rows.traces]
    assert faithful.generated_ids == rows.generated_ids
    # the sdpa model is left as it was
    assert lvlm.model.config.text_config._attn_implementation == attn


METHODS = {
    "fastv": Schedule.one_shot(2, 0.5),
    "pdrop": Schedule.progressive([1, 3, 5], [0.5, 0.5, 0.5]),
    "sparsevlm": Schedule.progressive([2, 4], [0.5, 0.5]),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_method_generates_and_keep_all_is_exact(tiny, family, attn):
    lvlm = tiny(family, attn)
    prompts, images = batch_for(lvlm, 2, family)
    inputs = lvlm.prepare(prompts, images)
    base = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=4, stop_at_eos=False)
    for name, schedule in METHODS.items():
        for policy in ("preserve", "renumber"):
            out = lvlm.generate_from_inputs(
                inputs, Method(name, schedule=schedule, position_policy=policy), max_new_tokens=4
            )
            assert all(len(t.stages) == len(schedule.stages) for t in out.traces)
            assert all(len(ids) == 4 for ids in out.generated_ids)  # the tiny models have no EOS
            for trace in out.traces:  # each stage keeps the schedule's count of the vision tokens present before it
                n0 = trace.vision_tokens_per_layer[0]
                expected = [
                    schedule.kept_count(i, trace.vision_tokens_per_layer[s["layer"] - 1], n0)
                    for i, s in enumerate(trace.stages)
                ]
                assert [len(s["kept"]) for s in trace.stages] == expected
        keep_all = Schedule(tuple(type(s)(s.layer, 1.0) for s in schedule.stages))
        out = lvlm.generate_from_inputs(inputs, Method(name, schedule=keep_all), max_new_tokens=4, stop_at_eos=False)
        assert out.generated_ids == base.generated_ids, name
        assert torch.equal(out.first_logits, base.first_logits), name


@pytest.mark.parametrize("name", ["fastv", "sparsevlm"])
def test_scorers_needing_the_previous_layer_reject_layer_zero(tiny, name):
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 1, "llava")
    with pytest.raises(ValueError, match="stage layer must be >= 1"):
        lvlm.generate(prompts, images, method=Method(name, schedule=Schedule.one_shot(0, 0.5)))


def test_pdrop_renumber_equals_feeding_only_the_kept_tokens(tiny):
    """A PDrop stage before layer 0 with renumbered positions is the model run on the kept tokens alone,
    numbered 0..n−1, decoding included (the official position handling)."""
    lvlm = tiny("llava", "eager")
    prompts, images = batch_for(lvlm, 1, "llava")
    inputs = lvlm.prepare(prompts, images)
    method = Method("pdrop", schedule=Schedule.one_shot(0, 0.25), position_policy="renumber")
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=5, stop_at_eos=False)
    kept = set(out.traces[0].stages[0]["kept"])
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])[0]
    keep = torch.tensor([i for i in range(vision.numel()) if not vision[i] or i in kept])
    with torch.no_grad():
        embeds = lvlm.adapter.embed(inputs)[:, keep]
        ref = lvlm.model.model.language_model  # the decoder, fed the kept tokens with default positions
        generated, positions, h = [], torch.arange(len(keep))[None], embeds
        cache = DynamicCache(config=lvlm.adapter.text_config)
        mask = torch.ones(1, len(keep), dtype=torch.long)
        for _ in range(5):
            hidden = ref(
                inputs_embeds=h, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            ).last_hidden_state
            token = int(lvlm.model.lm_head(hidden[:, -1]).argmax(-1))
            generated.append(token)
            h = lvlm.model.get_input_embeddings()(torch.tensor([[token]]))
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    assert out.generated_ids[0] == generated


# -- SparseVLM on hand-made tensors -------------------------------------------------------------------------


def test_rater_selection_by_hand():
    # two vision tokens (1, 0); a token that is not a candidate (9, 9); candidates (2, 0), (0, 0), (0, 1), (1, 0)
    embeds = torch.tensor([[1.0, 0], [1.0, 0], [9.0, 9.0], [2.0, 0], [0.0, 0], [0.0, 1], [1.0, 0]])
    vision = torch.tensor([True, True, False, False, False, False, False])
    text_after = torch.tensor([False, False, False, True, True, True, True])
    # each vision token's logits over the text: [2, 0, 0, 1] -> softmax, the same for both
    e = torch.tensor([2.0, 0, 0, 1]).exp()
    m = e / e.sum()  # [0.61, 0.08, 0.08, 0.23], mean 0.25
    assert (m > m.mean()).tolist() == [True, False, False, False]
    assert select_raters(embeds, vision, text_after).tolist() == [3]
    # ties everywhere: every candidate rates
    flat = torch.zeros(5, 2)
    assert select_raters(
        flat, torch.tensor([True, True, False, False, False]), torch.tensor([False, False, True, True, True])
    ).tolist() == [2, 3, 4]


def test_sparsevlm_queries_take_text_after_the_last_vision_token():
    embeds = torch.tensor([[[5.0, 5.0], [1.0, 0], [1.0, 0], [3.0, 0], [0.0, 1], [0.0, 0]]])
    vision = torch.tensor([[False, True, True, False, False, False]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last token is padding
    # logits of a vision token over text positions 3, 4: [3, 0] -> raters = [3]
    assert [q.tolist() for q in SparseVLMScorer().attention_queries(embeds, vision, mask)] == [[3]]


def _state(attention, query_valid, vision_idx):
    B, Q, L = attention.shape
    return LayerState(
        layer_idx=3,
        hidden=torch.zeros(B, L, 2),
        vision_idx=vision_idx,
        vision_valid=torch.ones_like(vision_idx, dtype=torch.bool),
        vision_coords=torch.zeros(*vision_idx.shape, 3, dtype=torch.long),
        orig_idx=torch.arange(L).expand(B, L),
        attention_mask=torch.ones(B, L, dtype=torch.long),
        sample_keys=torch.zeros(B, dtype=torch.long),
        layer=None,
        attention=attention,
        query_valid=query_valid,
    )


def test_sparsevlm_score_is_the_mean_over_valid_raters():
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.0], [0.3, 0.0, 0.1, 0.2, 0.4], [9.0, 9.0, 9.0, 9.0, 9.0]]])
    state = _state(attention, torch.tensor([[True, True, False]]), torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(SparseVLMScorer().score(state), torch.tensor([[0.1, 0.2, 0.3]]))


def test_sparsevlm_adaptive_count_uses_the_rank():
    # raters x vision attention of rank 1 (two equal rows) over 3 vision tokens
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]]])
    state = _state(attention, torch.tensor([[True, True]]), torch.tensor([[1, 2, 3]]))
    assert SparseVLMScorer(adaptive=True, scale=2.0, bias=0.0).count(state, 0, 3, scheduled=1) == 2
    assert SparseVLMScorer(adaptive=True, scale=5.0).count(state, 0, 3, scheduled=1) == 2  # at most n - 1
    assert SparseVLMScorer().count(state, 0, 3, scheduled=1) == 1
    full_rank = _state(
        torch.tensor([[[0, 1.0, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0, 1.0, 0]]]),
        torch.ones(1, 3, dtype=torch.bool),
        torch.tensor([[1, 2, 3]]),
    )
    assert SparseVLMScorer(adaptive=True).count(full_rank, 0, 3, scheduled=1) == 3  # rank = n: nothing dropped


def test_density_peak_clusters_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1], [9.0, 0.0]])
    centres, assign = density_peak_clusters(x, 2, knn=2)
    # the two tight groups' densest points are the centres; the far point joins the nearer group
    assert sorted(centres.tolist()) in ([0, 3], [0, 4])
    groups = {c: [i for i in range(6) if assign[i] == k] for k, c in enumerate(centres.tolist())}
    assert groups[0] == [0, 1, 2] and sorted(next(v for c, v in groups.items() if c != 0)) == [3, 4, 5]
    assert all(assign[c] == k for k, c in enumerate(centres.tolist()))


def test_sparsevlm_merge_by_hand():
    hidden = torch.arange(20, dtype=torch.float32).view(10, 2)  # token i = (2i, 2i+1)
    scores = torch.tensor([0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    merged, centres = SparseVLMScorer().merge(hidden, scores)
    # top int(0.3 * 10) + 1 = 4 by score: tokens 1, 3, 5, 7 -> floor(4 / 10) + 1 = 1 cluster, their mean
    assert merged.shape == (1, 2)
    torch.testing.assert_close(merged[0], hidden[[1, 3, 5, 7]].mean(0))
    # one cluster -> one neighbour (the point itself): every density ties, the highest-scored token is the centre
    assert centres.tolist() == [1]
    # with three neighbours the middle points are the densest; ties go to the higher-scored one (3 before 5)
    assert SparseVLMScorer(knn=3).merge(hidden, scores)[1].tolist() == [3]
    # 30 dropped: 10 recycled in 2 clusters; every recycled token lands in exactly one
    hidden = torch.cat([torch.zeros(15, 2), torch.full((15, 2), 10.0)]) + torch.linspace(0, 0.1, 30)[:, None]
    scores = torch.cat([torch.arange(15.0), torch.arange(15.0)])
    merged, centres = SparseVLMScorer().merge(hidden, scores)
    assert merged.shape == (2, 2)
    assert sorted(merged[:, 0].round().tolist()) == [0.0, 10.0]
    assert SparseVLMScorer(recycle=False).merge(hidden, scores)[0].shape == (0, 2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sparsevlm_end_to_end_batch_equals_alone(tiny, family):
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    n = 3 if family == "qwen2_vl" else 30
    method = Method("sparsevlm", schedule=Schedule.progressive([2, 4], [n, n // 2], keep_mode="absolute"))
    batch = lvlm.generate(prompts, images, method=method, max_new_tokens=4)
    for b in range(3):
        alone = lvlm.generate(prompts[b : b + 1], images[b : b + 1], method=method, max_new_tokens=4)
        assert alone.generated_ids[0] == batch.generated_ids[b]
        assert alone.traces[0].stages == batch.traces[b].stages
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[b], atol=1e-4, rtol=0)
    trace = batch.traces[0]
    merged = [len(s.get("merged", [])) for s in trace.stages]
    # the top int(0.3·d) + 1 of the d dropped tokens are recycled, in ⌊m / 10⌋ + 1 clusters
    for stage, layer in enumerate((2, 4)):
        dropped = trace.vision_tokens_per_layer[layer - 1] - len(trace.stages[stage]["kept"])
        m = min(dropped, int(0.3 * dropped) + 1)
        assert merged[stage] == min(m, m // 10 + 1) >= 1
    # merged tokens count as vision tokens from then on
    assert trace.vision_tokens_per_layer[2] == n + merged[0]
    assert trace.vision_tokens_per_layer[4] == n // 2 + merged[1]


@pytest.mark.parametrize("full_map", [False, True])
@pytest.mark.parametrize("offset", [0, -1])
def test_any_declared_queries_get_the_eager_rows(tiny, offset, full_map):
    """A scorer that declares its own query tokens and source layer gets exactly those eager rows."""
    from v2drop import AttentionRequest, Scorer, register_scorer
    from v2drop.scorers.base import vision_columns

    @register_scorer("test-last-three")  # the registry fixture removes it after the test
    @dataclass
    class LastThree(Scorer):
        def attention_request(self):
            return AttentionRequest(layer_offset=offset, full_map=full_map)

        def attention_queries(self, embeds, vision, attention_mask):
            L = embeds.shape[1]
            return [torch.tensor([L - 3, L - 2, L - 1]) for _ in range(embeds.shape[0])]

        def score(self, state):
            return vision_columns(state).mean(1)

    sdpa, eager = tiny("llava", "sdpa"), tiny("llava", "eager")
    prompts, images = batch_for(sdpa, 2, "llava")
    inputs = sdpa.prepare(prompts, images)
    scorer = recording(LastThree())
    sdpa.generate_from_inputs(inputs, Method(scorer, schedule=Schedule.one_shot(2, 0.5)), max_new_tokens=1)
    L = inputs["input_ids"].shape[1]
    reference = eager_probabilities(eager, inputs, 2 + offset).mean(1)[:, L - 3 :]  # (B, 3, L)
    torch.testing.assert_close(scorer.rows[0], reference, atol=1e-5, rtol=0)
