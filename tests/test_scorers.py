"""Scorers on hand-made tensors: kept sets worked out by hand, ties, reproducibility, registry errors."""

import dataclasses
import re

import pytest
import torch

import v2drop
from v2drop import LayerState, Method, Schedule, build_scorer, register_scorer, select_keep
from v2drop.scorers import Scorer


def state(hidden, prev=None, coords=None, keys=(7,), layer_idx=3):
    """A LayerState whose every token is a vision token."""
    B, L, _ = hidden.shape
    idx = torch.arange(L).expand(B, L)
    return LayerState(
        layer_idx=layer_idx,
        hidden=hidden,
        prev_hidden=prev,
        vision_idx=idx,
        vision_valid=torch.ones(B, L, dtype=torch.bool),
        vision_coords=coords if coords is not None else torch.zeros(B, L, 3, dtype=torch.long),
        orig_idx=idx,
        attention_mask=torch.ones(B, L, dtype=torch.long),
        sample_keys=torch.tensor(keys),
        layer=torch.nn.Identity(),
    )


# Token i moved by delta[i] between layer l-1 and l.
PREV = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]]])
DELTA = torch.tensor([[[0.0, 3.0], [2.0, 2.0], [0.0, 2.0], [-3.0, -4.0], [0.5, 0.5]]])


@pytest.mark.parametrize(
    "metric, expected_scores, keep2",
    [
        # ||d||2 = 3, 2.83, 2, 5, 0.71 -> top-2 = {0, 3}
        ("l2", [3.0, 8**0.5, 2.0, 5.0, 0.5**0.5], [0, 3]),
        # ||d||1 = 3, 4, 2, 7, 1 -> top-2 = {1, 3}
        ("l1", [3.0, 4.0, 2.0, 7.0, 1.0], [1, 3]),
        # 1 - cos(x+d, x): (1,3)vs(1,0): 1-1/sqrt10; (3,2)vs(1,0): 1-3/sqrt13; (0,4)vs(0,2): 0;
        # (0,0)vs(3,4): zero vector -> cos 0 -> 1; (1.5,1.5)vs(1,1): 0 -> top-2 = {3, 0}
        ("cosine", [1 - 10**-0.5, 1 - 3 / 13**0.5, 0.0, 1.0, 0.0], [0, 3]),
    ],
)
def test_v2drop_scores_and_kept_set(metric, expected_scores, keep2):
    scorer = build_scorer("v2drop", metric=metric)
    scores = scorer.score(state(PREV + DELTA, PREV))
    torch.testing.assert_close(scores[0], torch.tensor(expected_scores), atol=1e-6, rtol=0)
    assert select_keep(scores[0], 2).tolist() == keep2


def test_v2drop_computes_in_float32_for_half_inputs():
    scores = build_scorer("v2drop").score(state((PREV + DELTA).bfloat16(), PREV.bfloat16()))
    assert scores.dtype == torch.float32


def test_ties_break_toward_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, 0.0])
    assert select_keep(scores, 2).tolist() == [1, 2]
    assert select_keep(scores, 4).tolist() == [0, 1, 2, 4]
    assert select_keep(torch.zeros(5), 3).tolist() == [0, 1, 2]


def test_position_keeps_the_last_tokens():
    scores = build_scorer("position").score(state(torch.zeros(1, 6, 2)))
    assert select_keep(scores[0], 2).tolist() == [4, 5]


def test_uniform_keeps_an_even_grid():
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    coords = torch.stack([torch.zeros(64, dtype=torch.long), rows.flatten(), cols.flatten()], -1)[None]
    scores = build_scorer("uniform").score(state(torch.zeros(1, 64, 2), coords=coords))
    kept = select_keep(scores[0], 4)
    assert sorted((int(r), int(c)) for r, c in coords[0, kept, 1:]) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    kept16 = select_keep(scores[0], 16)
    assert sorted({int(r) for r in coords[0, kept16, 1]}) == [0, 2, 4, 6]
    assert sorted({int(c) for c in coords[0, kept16, 2]}) == [0, 2, 4, 6]
    # A partial level is spread over the image: every quadrant gets the same share.
    kept8 = coords[0, select_keep(scores[0], 8), 1:]
    quadrants = [(int(r) // 4, int(c) // 4) for r, c in kept8]
    assert sorted(quadrants) == [(0, 0)] * 2 + [(0, 1)] * 2 + [(1, 0)] * 2 + [(1, 1)] * 2


def test_random_is_seeded_per_sample():
    hidden = torch.zeros(2, 50, 2)
    a = build_scorer("random", seed=1).score(state(hidden, keys=(11, 12)))
    b = build_scorer("random", seed=1).score(state(hidden[:1], keys=(11,)))
    c = build_scorer("random", seed=2).score(state(hidden, keys=(11, 12)))
    assert torch.equal(a[0], b[0])  # same sample, same draw, whatever the batch
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, c)


def test_unknown_scorer_lists_registered_names():
    assert {"fastv", "pdrop", "position", "random", "sparsevlm", "uniform", "v2drop"} <= set(v2drop.list_scorers())
    with pytest.raises(
        ValueError, match=re.escape("Unknown scorer 'nope'. Registered scorers: " + ", ".join(v2drop.list_scorers()))
    ):
        build_scorer("nope")
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['metirc'\].*metric"):
        build_scorer("v2drop", metirc="l1")
    with pytest.raises(ValueError, match="metric must be one of"):
        build_scorer("v2drop", metric="l3")


def test_none_kwargs_keep_defaults():
    assert build_scorer("v2drop", metric=None).metric == "l2"


def test_registering_a_scorer_is_one_small_class(tiny):
    @register_scorer("test-first-tokens")
    @dataclasses.dataclass
    class FirstTokens(Scorer):
        """Keep the first vision tokens."""

        def score(self, state):
            return -state.vision_idx.float()

    assert "test-first-tokens" in v2drop.list_scorers("test-*")
    lvlm = tiny("llava")
    from v2drop.testing import image, prompt_for

    out = lvlm.generate(
        [prompt_for(lvlm, "how many ?")],
        [image(0)],
        method=Method("test-first-tokens", schedule=Schedule.one_shot(2, 0.25)),
        max_new_tokens=1,
    )
    kept = out.traces[0].stages[0]["kept"]
    first_vision = out.prompt_ids[0].index(lvlm.adapter.image_token_id)
    assert kept == list(range(first_vision, first_vision + 16))
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("test-first-tokens")(type("Other", (Scorer,), {}))


def test_registrations_do_not_leak_between_tests():
    """The conftest fixture removed the scorer the test above registered (when run after it)."""
    assert "test-first-tokens" not in v2drop.list_scorers()


def test_registry_restore_undoes_a_registration():
    from v2drop.scorers import SCORERS

    saved = SCORERS.snapshot()
    register_scorer("test-temporary")(type("Temporary", (Scorer,), {}))
    assert "test-temporary" in v2drop.list_scorers()
    SCORERS.restore(saved)
    assert "test-temporary" not in v2drop.list_scorers() and v2drop.list_scorers() == sorted(saved)


def test_v2drop_needs_a_previous_layer():
    with pytest.raises(ValueError, match="stage layer must be >= 1"):
        Method("v2drop", schedule=Schedule.one_shot(0, 0.5))
    Method("random", schedule=Schedule.one_shot(0, 0.5))  # a scorer without that need may drop before layer 0


def test_uniform_table_lookup_equals_the_bitwise_definition():
    """The cached tables give exactly the scores of the bitwise loops, for every 12-bit row/column and any frame."""
    from v2drop.scorers.baselines import _bit_reverse, _interleave, _trailing_zeros

    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.arange(4096), torch.randint(0, 4096, (904,), generator=gen)])
    coords = torch.stack([torch.randint(-1, 600, (5000,), generator=gen), values, values.flip(0)], -1)[None]
    scores = build_scorer("uniform").score(state(torch.zeros(1, 5000, 2), coords=coords))
    frame, row, col = coords.unbind(-1)
    level = torch.minimum(_trailing_zeros(row), _trailing_zeros(col)).clamp(max=15)
    spread = _interleave(_bit_reverse(row), _bit_reverse(col)).float() / float(1 << 24)
    expected = level.float() * 4 - spread * 2 - _bit_reverse(frame.clamp(min=0), bits=8).float() / 256.0 * 1e-3
    assert torch.equal(scores, expected)
