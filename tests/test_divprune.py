"""DivPrune: the greedy max–min cosine-distance subset, by hand and on every family's projected vision tokens.

Official definition: vbdi/divprune, LLaVA/llava/model/llava_arch.py lines 147-171 (``pairwise_cosine_similarity``
and ``DivPrune``): distances 1 − cos (line 155); the first pick maximises the second-smallest entry of a column, i.e.
the distance to the nearest other token (line 165); each later pick maximises the minimum distance to the tokens
already picked (lines 162, 167); ``torch.argmax`` picks (line 169). It runs on the projected vision tokens before the
LLM (lines 365-381).
"""

import pytest
import torch

import v2drop
from v2drop import Method
from v2drop.benchmarks import get_benchmark
from v2drop.scorers.divprune import greedy_diverse_order
from v2drop.testing import FAMILIES, batch_for


def test_hand_made_order():
    """a=(1,0), b=(1,1), c=(0,1), d=(−1,0). Cosine distances: ab 0.293, ac 1, ad 2, bc 0.293, bd 1.707, cd 1.

    First pick (llava_arch.py:165): nearest-other distances a 0.293, b 0.293, c 0.293, d 1 -> d.
    Then (llava_arch.py:167) distance to {d}: a 2, b 1.707, c 1 -> a; to {d, a}: b 0.293, c 1 -> c; then b.
    So DivPrune keeps {a, d} for a budget of 2 and {a, c, d} for 3.
    """
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert greedy_diverse_order(x).tolist() == [3, 0, 2, 1]


def test_order_matches_the_definition_step_by_step():
    """On random features, every pick is the argmax of the min distance to the picked set, recomputed from scratch."""
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1 - unit @ unit.T
    expected = []
    for i in range(40):
        if i == 0:
            scores = torch.stack([torch.cat([dist[j, :j], dist[j, j + 1 :]]).min() for j in range(40)])
        else:
            scores = dist[expected].min(dim=0).values.clone()
            scores[expected] = float("-inf")
        expected.append(int(scores.argmax()))
    assert greedy_diverse_order(x).tolist() == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_keeps_the_greedy_subset_of_the_projected_features(tiny, family):
    """On every family: the kept set is the first k picks over the layer-0 embeddings of each sample's vision tokens."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 2, family)
    inputs = lvlm.prepare(prompts, images)
    k = 3
    method = Method(
        "divprune", schedule={"keep_mode": "absolute", "stages": [["pre_llm", k]]}, position_policy="renumber"
    )
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=2, stop_at_eos=False)
    with torch.no_grad():
        embeds = lvlm.adapter.embed(inputs)
    vision = lvlm.adapter.vision_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    pad = (inputs["attention_mask"] == 0).sum(1)
    for b, trace in enumerate(out.traces):
        positions = vision[b].nonzero().flatten()
        order = greedy_diverse_order(embeds[b, positions])[:k]
        assert trace.stages[0]["layer"] == -1
        assert trace.stages[0]["kept"] == sorted((positions[order] - pad[b]).tolist())
        assert trace.vision_tokens_per_layer == [min(k, trace.vision_tokens)] * lvlm.depth


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets_keep_their_budget(budget):
    method = Method.from_preset(f"divprune-llava15-{budget}")
    assert method.scorer_name == "divprune" and method.position_policy == "renumber"
    assert method.schedule.pre_llm is not None and method.schedule.tokens_per_layer(32, 576) == [budget] * 32


def test_runs_on_the_bundled_proxy():
    lvlm = v2drop.load("proxy")
    sample = get_benchmark("digits").load("test", 1)[0]
    out = lvlm.generate(
        [lvlm.format_prompt(sample.question)], [list(sample.images)], method="divprune-llava15-64", max_new_tokens=2
    )
    assert out.traces[0].vision_tokens == 256
    assert out.traces[0].vision_tokens_per_layer == [64] * lvlm.depth
