"""Dropping: the engine equals a mask-based reference in which dropped tokens stay but are never attended."""

import pytest
import torch
from reference_helpers import reference_generate

from v2drop import Method, Schedule
from v2drop.testing import batch_for, image, prompt_for


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_drop_matches_mask_reference(tiny, family, attn, metric):
    lvlm = tiny(family, attn)
    prompts, images = batch_for(lvlm, 3, family)
    inputs = lvlm.prepare(prompts, images)
    schedule = Schedule.progressive([1, 3, 5], [0.5, 0.5, 0.0])
    out = lvlm.generate_from_inputs(
        inputs, Method("v2drop", schedule=schedule, metric=metric), max_new_tokens=6, stop_at_eos=False
    )
    ref_logits, ref_tokens, ref_kept = reference_generate(lvlm, inputs, schedule, 6, metric)
    assert [[s["kept"] for s in t.stages] for t in out.traces] == ref_kept
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-4, rtol=0)
    assert out.generated_ids == ref_tokens


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("scorer", ["v2drop", "random", "uniform", "position"])
def test_batch_equals_alone(tiny, family, scorer):
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    method = Method(scorer, schedule=Schedule.progressive([1, 4], [0.4, 0.5]))
    batch = lvlm.generate(prompts, images, method=method, max_new_tokens=5, stop_at_eos=False)
    for i in range(3):
        alone = lvlm.generate([prompts[i]], [images[i]], method=method, max_new_tokens=5, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)


def test_trace_counts_follow_schedule(tiny):
    lvlm = tiny("llava")
    schedule = Schedule.progressive([2, 4], [0.5, 0.25])
    out = lvlm.generate(
        [prompt_for(lvlm, "how many ?")], [image(0)], method=Method("v2drop", schedule=schedule), max_new_tokens=2
    )
    trace = out.traces[0]
    assert trace.vision_tokens_per_layer == schedule.tokens_per_layer(lvlm.depth, 64) == [64, 64, 32, 32, 8, 8]
    assert [s["layer"] for s in trace.stages] == [2, 4]
    assert [len(s["kept"]) for s in trace.stages] == [32, 8]
    assert set(trace.stages[1]["kept"]) <= set(trace.stages[0]["kept"])
    ids = out.prompt_ids[0]
    image_id = lvlm.adapter.image_token_id
    assert all(ids[p] == image_id for p in trace.stages[0]["kept"])


def test_renumber_policy_gives_contiguous_positions_and_runs(tiny, monkeypatch):
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 2, "llava")
    schedule = Schedule.one_shot(2, 0.25)
    seen = []  # the position ids every rope call gets: prefill segments first, then each decoding step's
    rope = lvlm.adapter.rope
    monkeypatch.setattr(lvlm.adapter, "rope", lambda hidden, pos: seen.append(pos.clone()) or rope(hidden, pos))
    preserve = lvlm.generate(
        prompts, images, method=Method("v2drop", schedule=schedule), max_new_tokens=4, stop_at_eos=False
    )
    preserve_pos, seen[:] = list(seen), []
    renumber = lvlm.generate(
        prompts,
        images,
        method=Method("v2drop", schedule=schedule, position_policy="renumber"),
        max_new_tokens=4,
        stop_at_eos=False,
    )
    renumber_pos = list(seen)
    # Same kept set (layers before the drop are identical), different logits (positions moved).
    assert preserve.traces[0].stages == renumber.traces[0].stages
    assert not torch.allclose(preserve.first_logits, renumber.first_logits)
    image_id = lvlm.adapter.image_token_id
    for b in range(2):
        ids, kept = preserve.prompt_ids[b], renumber.traces[b].stages[0]["kept"]
        assert len(kept) == 16  # a quarter of 64
        survivors = sorted([i for i, t in enumerate(ids) if t != image_id] + kept)  # prompt indices after the drop
        n = len(survivors)
        # prefill: layers 0-1 see every prompt position; from layer 2 on, preserve keeps the survivors'
        # own positions (LLaVA numbers tokens by prompt index) and renumber numbers them 0..n-1
        for pos in (preserve_pos, renumber_pos):
            assert pos[0][b, -len(ids) :].tolist() == list(range(len(ids)))
        assert preserve_pos[1][b, -n:].tolist() == survivors
        assert renumber_pos[1][b, -n:].tolist() == list(range(n))
        # the first decoded token continues each segment's numbering: layers 0-1 at len(ids), 2+ at n (renumber)
        assert preserve_pos[2][b].tolist() == [len(ids)] and preserve_pos[3][b].tolist() == [len(ids)]
        assert renumber_pos[2][b].tolist() == [len(ids)] and renumber_pos[3][b].tolist() == [n]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_5_vl"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_other_families_drop_consistently(tiny, family, attn):
    lvlm = tiny(family, attn)
    prompts, images = batch_for(lvlm, 2, family)
    method = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.5, 0.25]))
    batch = lvlm.generate(prompts, images, method=method, max_new_tokens=4, stop_at_eos=False)
    for i in range(2):
        alone = lvlm.generate([prompts[i]], [images[i]], method=method, max_new_tokens=4, stop_at_eos=False)
        assert alone.generated_ids[0] == batch.generated_ids[i]
        assert alone.traces[0].stages == batch.traces[i].stages
        n = alone.traces[0].vision_tokens_per_layer[0]
        assert alone.traces[0].vision_tokens_per_layer == method.schedule.tokens_per_layer(lvlm.depth, n)
