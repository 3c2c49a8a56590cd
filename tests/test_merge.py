"""Token merging in the engine: a scorer's ``Merge`` replaces groups of vision tokens by their weighted sums.

Hand-worked sequences check the merged hidden states, positions (anchor or rounded mean, 1-D and M-RoPE), places
and traces; on tiny models, singleton groups are exactly a selection of the same tokens (logits), and a batch
merges what each sample merges alone, before the LLM and inside it.
"""

import math
from dataclasses import dataclass

import pytest
import torch
from reference_helpers import _additive, greedy_decode
from transformers import DynamicCache

from v2drop import Method, Schedule
from v2drop.engine.loop import SampleTrace
from v2drop.engine.sequence import Sequence
from v2drop.engine.stages import apply_selection
from v2drop.scorers import LayerState, Merge, Scorer, Selection, register_scorer, select_keep
from v2drop.testing import batch_for

HIDDEN = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 4.0], [6.0, 8.0], [10.0, 2.0], [0.0, 1.0], [1.0, 1.0]])
# sequence:            t0           v1          v2          v3          v4           t5          t6
VISION_IDX = torch.tensor([[1, 2, 3, 4]])


def hand_sequence(mrope: bool = False) -> Sequence:
    """One sample: a text token, four vision tokens (a 2x2 grid), two text tokens."""
    if mrope:  # (t, row, column): the grid's rows and columns, text on the diagonal
        pos = torch.tensor([[0, 1, 1, 1, 1, 3, 4], [0, 1, 1, 2, 2, 3, 4], [0, 1, 2, 1, 2, 3, 4]])[:, None]
    else:
        pos = torch.arange(7)[None]
    vision = torch.tensor([[False, True, True, True, True, False, False]])
    coords = torch.zeros(1, 7, 3, dtype=torch.long)
    coords[0, 1:5, 1:] = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    return Sequence(
        HIDDEN[None].clone(),
        pos,
        torch.ones(1, 7, dtype=torch.long),
        torch.arange(7)[None],
        vision,
        coords,
        torch.full((1, 7), -1),  # no attention blocks
    )


def apply(selection, mrope=False):
    """(new sequence, the stage's trace) of ``selection`` on the hand sequence."""
    traces = [SampleTrace()]
    return apply_selection(hand_sequence(mrope), selection, VISION_IDX, 2, traces), traces[0].stages[0]


def merge(keep, members, groups, weights, anchors, **kw):
    t = torch.tensor
    return Merge(
        keep=[t(keep)], members=[t(members)], groups=[t(groups)], weights=[t(weights)], anchors=[t(anchors)], **kw
    )


def test_weighted_sums_at_their_anchors():
    """Keep v1; v2, v3 merge with weights .25, .75 (anchor v2), v4 alone with weight 2 (anchor v4).
    .25·(2, 4) + .75·(6, 8) = (5, 7) at v2's place; 2·(10, 2) = (20, 4) at v4's."""
    new, trace = apply(merge([0], [1, 2, 3], [0, 0, 1], [0.25, 0.75, 2.0], [1, 3]))
    expected = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 7.0], [20.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(new.hidden[0], expected)
    assert new.position_ids[0].tolist() == [0, 1, 2, 4, 5, 6]  # the anchors' positions
    assert new.orig_idx[0].tolist() == [0, 1, 2, 4, 5, 6]
    assert new.vision[0].tolist() == [False, True, True, True, False, False]
    assert new.coords[0, 1:4, 1:].tolist() == [[0, 0], [0, 1], [1, 1]]
    assert trace == {"layer": 2, "kept": [1], "merged": [2, 4], "members": [[2, 3], [4]]}


def test_mean_positions_round_halves_up():
    """The same merge with position="mean": v2, v3 at positions 2, 3 -> 2.5 -> 3; v4 -> 4."""
    new, _ = apply(merge([0], [1, 2, 3], [0, 0, 1], [0.25, 0.75, 2.0], [1, 3], position="mean"))
    assert new.position_ids[0].tolist() == [0, 1, 3, 4, 5, 6]
    torch.testing.assert_close(new.hidden[0, 2], torch.tensor([5.0, 7.0]))


def test_mrope_positions_by_anchor_and_by_mean():
    """v2 (t 1, row 1, col 2) and v3 (1, 2, 1): anchor v2 keeps (1, 1, 2); the mean (1, 1.5, 1.5) rounds to
    (1, 2, 2)."""
    by_anchor, _ = apply(merge([0, 3], [1, 2], [0, 0], [0.5, 0.5], [0]), mrope=True)
    by_mean, _ = apply(merge([0, 3], [1, 2], [0, 0], [0.5, 0.5], [0], position="mean"), mrope=True)
    assert by_anchor.position_ids[:, 0].T.tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 2, 2], [3, 3, 3], [4, 4, 4]]
    assert by_mean.position_ids[:, 0, 2].tolist() == [1, 2, 2]
    torch.testing.assert_close(by_mean.hidden[0, 2], torch.tensor([4.0, 6.0]))
    # anchor v1 is kept: the merged token sits right after it
    assert by_anchor.orig_idx[0].tolist() == [0, 1, 1, 4, 5, 6]


def test_after_kept_places_merges_after_the_added_tokens():
    """Keep v3; add (9, 9) in v4's name; merge v1, v2 (anchor v1): the added token, then the merged one, after v3."""
    m = merge([2], [0, 1], [0, 0], [0.5, 0.5], [0], place="after_kept")
    m.added_hidden, m.added_source = [torch.tensor([[9.0, 9.0]])], [torch.tensor([3])]
    new, trace = apply(m)
    expected = torch.tensor([[0.0, 0.0], [6.0, 8.0], [9.0, 9.0], [1.5, 2.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(new.hidden[0], expected)
    assert new.orig_idx[0].tolist() == [0, 3, 4, 1, 5, 6]
    assert trace["merged"] == [4, 1] and trace["members"] == [[1, 2]]
    at_anchor, _ = apply(merge([2], [0, 1], [0, 0], [0.5, 0.5], [0]))
    assert at_anchor.orig_idx[0].tolist() == [0, 1, 3, 5, 6]


def test_bad_merges_are_refused():
    with pytest.raises(ValueError, match="position must be one of"):
        merge([0], [1], [0], [1.0], [1], position="first")
    with pytest.raises(ValueError, match="each with a member"):
        merge([0], [1, 2], [0, 2], [1.0, 1.0], [1, 2, 3])
    with pytest.raises(ValueError, match="one length"):
        merge([0], [1, 2], [0], [1.0, 1.0], [1])
    with pytest.raises(RuntimeError, match="also kept"):
        apply(merge([1], [1, 2], [0, 0], [0.5, 0.5], [1]))
    with pytest.raises(RuntimeError, match="twice in one group"):
        apply(merge([0], [1, 1], [0, 0], [0.5, 0.5], [1]))


def test_a_token_may_join_several_groups():
    """v2 joins both groups (as FastVID's multi-frame merge adds a token to each anchor frame's group):
    g0 = .5·v2 + .5·v3 = (4, 6) at v2; g1 = .5·v2 + .5·v4 = (6, 3) at v4."""
    new, trace = apply(merge([0], [1, 2, 1, 3], [0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5], [1, 3]))
    torch.testing.assert_close(new.hidden[0, 2:4], torch.tensor([[4.0, 6.0], [6.0, 3.0]]))
    assert trace["members"] == [[2, 3], [2, 4]] and new.orig_idx[0].tolist() == [0, 1, 2, 4, 5, 6]


@dataclass
class PairMergeScorer(Scorer):
    """A test scorer: of a stage's count k, ceil(k/2) tokens of the largest hidden norm stay; the next tokens by norm
    either stay too (``mode="select"``), merge alone with weight 1 (``"singletons"``), or merge in pairs of
    consecutive tokens weighted by their norms, anchored at the larger-norm one (``"pairs"``)."""

    mode: str = "pairs"
    position: str = "mean"

    def score(self, state: LayerState) -> torch.Tensor:
        """Each vision token's hidden-state norm."""
        D = state.hidden.shape[-1]
        return state.hidden.gather(1, state.vision_idx[..., None].expand(-1, -1, D)).float().norm(dim=-1)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """The kept tokens and the merge of the mode (class docstring)."""
        keep, members, groups, weights, anchors = [], [], [], [], []
        for b, (n, k) in enumerate(zip(state.vision_valid.sum(1).tolist(), counts)):
            s = scores[b, :n]
            order = torch.sort(s, descending=True, stable=True).indices
            kept, m = select_keep(s, math.ceil(k / 2)), k - math.ceil(k / 2)
            if self.mode == "pairs":
                rest = order[len(kept) :][: 2 * m].sort().values[: 2 * (min(m, (n - len(kept)) // 2))]
                group = torch.arange(len(rest)) // 2
                pair = rest.view(-1, 2)
                anchor = pair.gather(1, s[pair].argmax(1, keepdim=True)).flatten()
                w = s[rest] / torch.zeros(len(pair)).index_add_(0, group, s[rest])[group]
            else:
                rest = order[len(kept) :][:m].sort().values
                group, anchor, w = torch.arange(len(rest)), rest, torch.ones(len(rest))
            keep.append(kept if self.mode != "select" else torch.cat([kept, rest]).sort().values)
            members.append(rest)
            groups.append(group)
            weights.append(w)
            anchors.append(anchor)
        if self.mode == "select":
            return Selection(keep=keep)
        return Merge(keep, members=members, groups=groups, weights=weights, anchors=anchors, position=self.position)


@pytest.fixture
def pair_merge():
    register_scorer("test-pair-merge")(PairMergeScorer)  # undone after the test (conftest restores the registry)
    return PairMergeScorer


SCHEDULE = Schedule.from_dict({"keep_mode": "relative", "stages": [["pre_llm", 0.5], [2, 0.5]]})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_singleton_groups_are_exactly_a_selection(tiny, family, pair_merge):
    lvlm = tiny(family)
    inputs = lvlm.prepare(*batch_for(lvlm, 2, family))
    outs = [
        lvlm.generate_from_inputs(inputs, Method(pair_merge(mode), SCHEDULE), max_new_tokens=3, stop_at_eos=False)
        for mode in ("select", "singletons")
    ]
    assert torch.equal(outs[0].first_logits, outs[1].first_logits)
    assert outs[0].generated_ids == outs[1].generated_ids
    for selected, merged in zip(outs[0].traces, outs[1].traces):
        for a, b in zip(selected.stages, merged.stages):
            new = b.get("merged", [])
            assert a["kept"] == sorted(b["kept"] + new) and b.get("members", []) == [[p] for p in new]
        assert selected.vision_tokens_per_layer == merged.vision_tokens_per_layer
    assert any("members" in s for t in outs[1].traces for s in t.stages)


@pytest.mark.parametrize("position", ["anchor", "mean"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_merges_what_each_sample_merges_alone(tiny, family, position, pair_merge):
    """Pairs merged before the LLM and before layer 2 (hidden states of the residual stream, KV cache of the
    shorter sequence), samples of different vision counts on Qwen2-VL (padding, M-RoPE)."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    method = Method(pair_merge("pairs", position), SCHEDULE)
    batch = lvlm.generate(prompts, images, method=method, max_new_tokens=4, stop_at_eos=False)
    for i in range(3):
        alone = lvlm.generate([prompts[i]], [images[i]], method=method, max_new_tokens=4, stop_at_eos=False)
        assert alone.traces[0].stages == batch.traces[i].stages
        assert alone.generated_ids[0] == batch.generated_ids[i]
        torch.testing.assert_close(alone.first_logits[0], batch.first_logits[i], atol=1e-4, rtol=0)
    if family != "llava":
        return  # Qwen2-VL's tiny images have 4-9 tokens: too few for pairs at every stage
    trace = batch.traces[0]
    first = trace.vision_tokens // 2  # 32 then 16 of 64: half kept, half pairs
    assert [len(s["kept"]) + len(s["merged"]) for s in trace.stages] == [first, first // 2]
    assert all(len(group) == 2 for s in trace.stages for group in s["members"])
    assert trace.vision_tokens_per_layer == [first] * 2 + [first // 2] * (lvlm.depth - 2)


@torch.no_grad()
def merge_reference(lvlm, inputs, traces, max_new_tokens):
    """The engine's merges done the slow, obvious way, from the stages' traces: the whole sequence runs through every
    layer; at a stage each group's anchor slot gets the group's norm-weighted sum and every other vision token
    that is not kept stops being attended (prefill and decode). Returns (first logits, greedy tokens)."""
    a = lvlm.adapter
    ids, pad = inputs["input_ids"], inputs["attention_mask"].bool()
    B, L = ids.shape
    h = a.embed(inputs)
    pos = a.position_ids(inputs)
    rope = a.rope(h, pos)
    vision = a.vision_mask(ids) & pad
    offset = (~pad).sum(1)
    alive, alive_at = pad.clone(), []
    cache = DynamicCache(config=a.text_config)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for layer_idx, layer in enumerate(a.layers):
        for i, stage in enumerate(traces[0].stages):
            if max(stage["layer"], 0) != layer_idx:
                continue
            for b in range(B):
                st = traces[b].stages[i]
                alive[b] &= ~vision[b]
                alive[b, torch.tensor(st["kept"], dtype=torch.long) + offset[b]] = True
                for anchor, members in zip(st.get("merged", []), st.get("members", [])):
                    slots = torch.tensor(members) + offset[b]
                    norms = h[b, slots].float().norm(dim=-1)
                    h[b, anchor + offset[b]] = ((norms / norms.sum())[:, None] * h[b, slots].float()).sum(0).to(h.dtype)
                    alive[b, anchor + offset[b]] = True
        alive_at.append(alive.clone())
        h = layer(
            h,
            attention_mask=_additive(causal[None] & alive[:, None, :], h.dtype),
            position_embeddings=rope,
            past_key_values=cache,
            use_cache=True,
        )
    first = a.lm_head(a.norm(h[:, -1])).float()
    return first, greedy_decode(a, first, cache, alive_at, pos, pad, max_new_tokens)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_merges_equal_a_full_sequence_reference(tiny, family, pair_merge):
    """Pairs merged at their anchors (anchor positions) before the LLM and before layer 2, then 5 decoded tokens:
    the same logits and tokens as the full sequence in which each anchor slot holds its pair's weighted sum and
    the other merged and dropped tokens are masked from then on (so the KV caches agree)."""
    lvlm = tiny(family, "eager")
    inputs = lvlm.prepare(*batch_for(lvlm, 3, family))
    out = lvlm.generate_from_inputs(
        inputs, Method(pair_merge("pairs", "anchor"), SCHEDULE), max_new_tokens=5, stop_at_eos=False
    )
    assert any("members" in s for t in out.traces for s in t.stages)
    first, tokens = merge_reference(lvlm, inputs, out.traces, 5)
    torch.testing.assert_close(out.first_logits, first, atol=1e-4, rtol=0)
    assert out.generated_ids == tokens
