"""The pre-LLM stage (layer -1, ``pre_llm`` in YAML): schedules, validation, the engine, traces and FLOPs."""

import pytest
import torch

from v2drop import Method, Schedule
from v2drop.cost import layer_flops, sample_prefill_flops
from v2drop.schedule import PRE_LLM, Stage
from v2drop.scorers import build_scorer
from v2drop.scorers.divprune import greedy_diverse_order
from v2drop.testing import batch_for


def test_schedule_reads_pre_llm_and_writes_minus_one():
    schedule = Schedule.from_dict({"keep_mode": "absolute", "stages": [["pre_llm", 32], [2, 16]]})
    assert schedule.stages[0] == Stage(PRE_LLM, 32) and schedule.pre_llm == Stage(-1, 32)
    assert schedule.to_dict()["stages"] == [[-1, 32.0], [2, 16.0]]
    assert Schedule.from_dict(schedule.to_dict()) == schedule
    assert Schedule.from_dict({"stages": [{"layer": "pre_llm", "keep": 0.5}]}).layers == (-1,)
    assert schedule.tokens_per_layer(4, 64) == [32, 32, 16, 16]  # the pre-LLM stage shrinks every decoder layer
    assert schedule.rescaled(4, 8).layers == (-1, 4)
    assert Schedule.one_shot(2, 0.5).pre_llm is None
    assert Schedule.progressive(["pre_llm", 3], [0.5, 0.5]) == Schedule((Stage("pre_llm", 0.5), Stage(3, 0.5)))


@pytest.mark.parametrize(
    "stages, message",
    [
        ([[2, 0.5], ["pre_llm", 0.5]], "strictly increase"),
        ([[-2, 0.5]], "pre_llm"),
        ([["before", 0.5]], "'before'"),
    ],
)
def test_bad_pre_llm_stages_are_clear_errors(stages, message):
    with pytest.raises(ValueError, match=message):
        Schedule.from_dict({"stages": stages})


@pytest.mark.parametrize("name", ["v2drop", "fastv", "pdrop", "sparsevlm"])
def test_scorers_that_read_a_decoder_layer_refuse_the_pre_llm_stage(name):
    with pytest.raises(ValueError, match="pre-LLM"):
        Method(name, schedule={"stages": [["pre_llm", 0.5]]})


@pytest.mark.parametrize("name", ["random", "uniform", "position", "divprune", "visionzip"])
def test_scorers_that_read_the_features_accept_it(name):
    assert Method(name, schedule={"stages": [["pre_llm", 0.5]]}).schedule.pre_llm is not None


def test_a_pre_llm_stage_keeping_everything_is_the_model_without_dropping(tiny):
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 2, "llava")
    inputs = lvlm.prepare(prompts, images)
    base = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=4, stop_at_eos=False)
    out = lvlm.generate_from_inputs(
        inputs, Method("divprune", schedule={"stages": [["pre_llm", 1.0]]}), max_new_tokens=4, stop_at_eos=False
    )
    assert torch.equal(out.first_logits, base.first_logits) and out.generated_ids == base.generated_ids
    assert all(t.vision_tokens_per_layer == [64] * lvlm.depth and t.stages[0]["layer"] == -1 for t in out.traces)


def test_mixed_scorer_schedule_end_to_end(tiny):
    """VisionZip before the LLM, V²Drop at layers 2 and 4, defined as config data only; each stage runs its own
    scorer."""
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 3, "llava")
    data = {
        "scorer": {"name": "staged", "pre_llm": {"name": "visionzip"}, "llm": {"name": "v2drop", "metric": "l1"}},
        "schedule": {"keep_mode": "absolute", "stages": [["pre_llm", 32], [2, 12], [4, 4]]},
    }
    method = Method.from_dict(data)
    assert Method.from_dict(method.to_dict()) == method
    out = lvlm.generate(prompts, images, method=method, max_new_tokens=2)
    first = lvlm.generate(
        prompts,
        images,
        method=Method("visionzip", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 32]]}),
        max_new_tokens=1,
    )
    for trace, alone in zip(out.traces, first.traces):
        assert [s["layer"] for s in trace.stages] == [-1, 2, 4]
        assert (
            trace.stages[0] == alone.stages[0]
        )  # the pre-LLM stage is VisionZip's, 32 = 26 dominant (+[CLS]) + 5 contextual
        assert len(trace.stages[0]["kept"]) == 26 and len(trace.stages[0]["merged"]) == 6
        assert trace.vision_tokens_per_layer == [32, 32, 12, 12, 4, 4]
        assert len(trace.stages[1]["kept"]) == 12 and "merged" not in trace.stages[1]  # V²Drop keeps, never merges
        assert set(trace.stages[2]["kept"]) <= set(trace.stages[1]["kept"])
    # V²Drop at layer 2 ranks by the l1 update of layer 1: a staged v2drop part gets the previous hidden states it
    # declares
    scorer = method.scorer.at(2)
    assert scorer.needs_prev_hidden and scorer.metric == "l1" and method.scorer.at(-1).vision_request() is not None


def test_pre_llm_flops(tiny):
    """Decoder layers over text + k vision tokens, plus DivPrune's 2·n²·D + 3·n·D + 2·n² on the n prompt vision
    tokens."""
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 1, "llava")
    method = Method("divprune", schedule={"keep_mode": "absolute", "stages": [["pre_llm", 16]]})
    out = lvlm.generate(prompts, images, method=method, max_new_tokens=1)
    cfg = lvlm.adapter.text_config
    n_prompt = len(out.prompt_ids[0])
    text, n, d, m = n_prompt - 64, 64, cfg.hidden_size, cfg.intermediate_size
    expected = lvlm.depth * layer_flops(text + 16, d, m) + 2 * n * n * d + 3 * n * d + 2 * n * n
    assert sample_prefill_flops(cfg, out.traces[0], n_prompt, method.scorer) == pytest.approx(expected)
    staged = Method(
        "staged",
        pre_llm={"name": "divprune"},
        llm={"name": "random"},
        schedule={"keep_mode": "absolute", "stages": [["pre_llm", 16], [3, 8]]},
    )
    out = lvlm.generate(prompts, images, method=staged, max_new_tokens=1)
    expected = (
        3 * layer_flops(text + 16, d, m) + 3 * layer_flops(text + 8, d, m) + 2 * n * n * d + 3 * n * d + 2 * n * n
    )
    assert sample_prefill_flops(cfg, out.traces[0], n_prompt, staged.scorer) == pytest.approx(
        expected
    )  # random costs 0


def test_a_composite_can_mix_a_feature_scorer_into_the_pre_llm_stage(tiny):
    """A composite of DivPrune and VisionZip runs before the LLM; with all weight on DivPrune it keeps DivPrune's
    set."""
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 1, "llava")
    inputs = lvlm.prepare(prompts, images)
    scorer = build_scorer(
        "composite", parts=[{"name": "divprune", "weight": 1.0}, {"name": "visionzip", "weight": 0.0}]
    )
    assert scorer.vision_request() is not None
    out = lvlm.generate_from_inputs(
        inputs, Method(scorer, schedule={"keep_mode": "absolute", "stages": [["pre_llm", 8]]}), max_new_tokens=1
    )
    with torch.no_grad():
        embeds = lvlm.adapter.embed(inputs)[0]
    positions = (inputs["input_ids"][0] == lvlm.model.config.image_token_id).nonzero().flatten()
    assert out.traces[0].stages[0]["kept"] == sorted(positions[greedy_diverse_order(embeds[positions])[:8]].tolist())


@pytest.mark.parametrize(
    "preset, layers",
    [("visionzip-v2drop-llava15-128", [-1, 1, 6, 8]), ("composite-v2drop-fastv-llava15-128", [1, 6, 8])],
)
def test_yaml_only_presets_run_on_the_bundled_proxy(preset, layers):
    """The composite and the mixed-scorer presets are YAML only; on the 12-layer proxy their decoder stages move, the
    pre-LLM one stays.
    """
    import v2drop
    from v2drop.benchmarks import get_benchmark

    lvlm = v2drop.load("proxy")
    samples = get_benchmark("digits").load("test", 2)
    out = lvlm.generate(
        [lvlm.format_prompt(s.question) for s in samples],
        [list(s.images) for s in samples],
        method=preset,
        max_new_tokens=2,
    )
    for trace in out.traces:
        assert [s["layer"] for s in trace.stages] == layers
        expected = Method.from_preset(preset, depth=lvlm.depth).schedule.tokens_per_layer(lvlm.depth, 256)
        assert trace.vision_tokens_per_layer == expected  # VisionZip's merged tokens are counted among the kept ones
