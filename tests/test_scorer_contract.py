"""The contract every registered scorer meets, so a new scorer is tested by being registered.

For each name in ``list_scorers()`` (every module of ``v2drop.scorers``, entry points, or registered
by an importing package): scores have shape (B, V) and a float dtype; kept sets are deterministic,
the same in a batch as alone (with the same generated tokens, on every family of ``v2drop.testing.FAMILIES``),
and the same under eager and sdpa attention; a schedule that keeps everything reproduces the model without
dropping exactly (on every family). A scorer a family cannot run refuses it with its reason.
"""

import re

import pytest
import torch
from reference_helpers import transformers_generate

from v2drop import Method, Schedule, build_scorer, list_scorers
from v2drop.schedule import PRE_LLM
from v2drop.testing import FAMILIES, batch_for

# Parameters for scorers that cannot be built from defaults alone (name -> kwargs).
SCORER_KWARGS: dict[str, dict] = {  # scorers whose defaults would test too little
    "given": {"keep": (0, 3, 5, 7)},
    "dart": {
        "pivot_image": 1,
        "pivot_text": 1,
    },  # 4 + 4 pivots would leave nothing to claim on the tiny Qwen images (4-9 tokens)
    "composite": {"parts": [{"name": "v2drop", "weight": 0.6}, {"name": "fastv", "weight": 0.4}], "combine": "zscore"},
    "staged": {"pre_llm": {"name": "visionzip"}, "llm": {"name": "divprune"}},
}
# Scorers that run only on some families and refuse the others with a ValueError naming why (name -> (families,
# message)).
FAMILY_SUPPORT: dict[str, tuple] = {
    name: (("llava", "llava_next"), "no \\[CLS\\] token") for name in ("visionzip", "vispruner", "hiprune", "holov")
} | {"downsample": (("llava",), "cannot re-encode")}
# Scorers that run at the pre-LLM stage only: their schedules' stages all move there (one stage, the first keep).
PRE_LLM_ONLY = ("downsample",)
FAMILY_SUPPORT["flowcut"] = (("llava",), "vision-encoder stages")
SCHEDULE = Schedule.progressive([2, 4], [0.5, 0.5])
# Scorers that run only inside the vision encoder: their stage (the tiny LLaVA's tower is read at hidden_states[1]).
ENCODER_STAGES = {"flowcut": ["vision:1"]}
# VScan scans and merges in the encoder, then runs PDrop's rule in the LLM: both stage kinds.
FAMILY_SUPPORT["vscan"] = (("llava",), "vision-encoder stages")
ENCODER_STAGES["vscan"] = ["vision:1", 2]
SCORERS = list_scorers()


def method(name: str, schedule: Schedule = SCHEDULE) -> Method:
    """A fresh method with a fresh scorer instance (nothing carried over between runs)."""
    if name in PRE_LLM_ONLY:
        schedule = Schedule.one_shot(PRE_LLM, schedule.stages[0].keep, schedule.keep_mode)
    elif name in ENCODER_STAGES:  # the same keep values at the scorer's encoder stages
        layers = ENCODER_STAGES[name]
        schedule = Schedule.progressive(layers, [s.keep for s in schedule.stages][: len(layers)])
    return Method(build_scorer(name, **SCORER_KWARGS.get(name, {})), schedule=schedule)


def stage_layers(name: str) -> tuple:
    """The stage layers ``method(name)`` runs."""
    return (PRE_LLM,) if name in PRE_LLM_ONLY else SCHEDULE.layers


def refuses(name: str, family: str) -> bool:
    """True when ``name`` does not run on ``family`` (the test then asserts the clear error instead)."""
    return name in FAMILY_SUPPORT and family not in FAMILY_SUPPORT[name][0]


def kept(out) -> list:
    """Per sample, per stage, the kept (and added) prompt indices."""
    return [t.stages for t in out.traces]


@pytest.mark.parametrize("name", SCORERS)
def test_scores_are_float_and_one_per_vision_token(tiny, name):
    lvlm = tiny("qwen2_vl")  # samples with different vision counts: the padded (B, V) layout is exercised
    prompts, images = batch_for(lvlm, 3, "qwen2_vl")
    m = method(name)
    if refuses(name, "qwen2_vl"):
        with pytest.raises(ValueError, match=FAMILY_SUPPORT[name][1]):
            lvlm.generate(prompts, images, method=m, max_new_tokens=1)
        return
    calls = []
    score = m.scorer.score
    m.scorer.score = lambda state: calls.append((state, score(state))) or calls[-1][1]
    out = lvlm.generate(prompts, images, method=m, max_new_tokens=1)
    assert len(calls) == len(stage_layers(name))
    for (state, scores), layer in zip(calls, stage_layers(name)):
        assert state.layer_idx == layer
        assert scores.shape == state.vision_idx.shape and scores.dtype.is_floating_point
        present = [t.vision_tokens if layer == PRE_LLM else t.vision_tokens_per_layer[layer - 1] for t in out.traces]
        assert state.vision_valid.sum(1).tolist() == present


@pytest.mark.parametrize("name", SCORERS)
def test_kept_sets_are_deterministic(tiny, name):
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 2, "llava")
    first = lvlm.generate(prompts, images, method=method(name), max_new_tokens=3)
    second = lvlm.generate(prompts, images, method=method(name), max_new_tokens=3)
    assert kept(first) == kept(second)
    assert first.generated_ids == second.generated_ids


@pytest.mark.parametrize("name", SCORERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_keeps_what_each_sample_keeps_alone(tiny, family, name):
    """Every stage runs on every sample of a padded batch of different vision counts, and each sample keeps the
    same tokens and generates the same two tokens as alone; a scorer a family cannot run refuses it by name."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 3, family)
    if refuses(name, family):
        with pytest.raises(ValueError, match=FAMILY_SUPPORT[name][1]):
            lvlm.generate(prompts, images, method=method(name), max_new_tokens=1)
        return
    batch = lvlm.generate(prompts, images, method=method(name), max_new_tokens=2, stop_at_eos=False)
    assert all(len(t.stages) == len(method(name).schedule.stages) for t in batch.traces)
    for i in range(3):
        alone = lvlm.generate(
            prompts[i : i + 1], images[i : i + 1], method=method(name), max_new_tokens=2, stop_at_eos=False
        )
        assert kept(alone)[0] == kept(batch)[i]
        assert alone.generated_ids[0] == batch.generated_ids[i]


@pytest.mark.parametrize("name", SCORERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_is_the_model_without_dropping(tiny, family, name):
    """Stages that keep every token give the engine's no-drop logits bit for bit and transformers' own greedy tokens
    and first logits (its ``generate``), with every vision token present in every layer."""
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 2, family)
    keep_all = method(name, Schedule.progressive([2, 4], [1.0, 1.0]))
    if refuses(name, family):  # refused by name, or (downsample: nothing to re-encode) run as the model
        try:
            lvlm.generate(prompts, images, method=keep_all, max_new_tokens=1)
        except ValueError as err:
            assert re.search(FAMILY_SUPPORT[name][1], str(err)), err
            return
    inputs = lvlm.prepare(prompts, images)
    base = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=4, stop_at_eos=False)
    out = lvlm.generate_from_inputs(inputs, keep_all, max_new_tokens=4, stop_at_eos=False)
    ref_logits, ref_tokens = transformers_generate(lvlm, inputs, 4)
    assert out.generated_ids == base.generated_ids == ref_tokens
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(out.first_logits, base.first_logits)  # bit-identical to the engine without a method
    assert all(t.vision_tokens > 0 and t.vision_tokens_per_layer == [t.vision_tokens] * lvlm.depth for t in out.traces)
    assert all(len(t.stages) == len(method(name).schedule.stages) for t in out.traces)  # every stage ran
    if family == "llava":
        assert all(t.vision_tokens == 64 for t in out.traces)


@pytest.mark.parametrize("name", SCORERS)
def test_eager_and_sdpa_keep_the_same_tokens(tiny, name):
    prompts, images = batch_for(tiny("llava"), 2, "llava")
    eager = tiny("llava", "eager").generate(prompts, images, method=method(name), max_new_tokens=1)
    sdpa = tiny("llava", "sdpa").generate(prompts, images, method=method(name), max_new_tokens=1)
    assert kept(eager) == kept(sdpa)
