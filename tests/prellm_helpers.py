"""Scaffolding shared by the tests of the pre-LLM scorers (VisPruner, HiPrune, CDPruner): hand-made states, tiny
and proxy runs, and the checks every ``<scorer>-llava15-<budget>`` preset must pass."""

from __future__ import annotations

import torch

import v2drop
from v2drop import Method
from v2drop.benchmarks import get_benchmark
from v2drop.scorers import LayerState, Scorer, VisionFeatures
from v2drop.testing import batch_for


def prellm_state(
    hidden: torch.Tensor,
    n_vision: int,
    coords: torch.Tensor | None = None,
    vision: VisionFeatures | None = None,
) -> LayerState:
    """A one-sample pre-LLM state: ``hidden`` (1, T, D), its vision tokens at prompt positions 1..``n_vision``."""
    T = hidden.shape[1]
    return LayerState(
        layer_idx=-1,
        hidden=hidden,
        vision_idx=torch.arange(1, n_vision + 1)[None],
        vision_valid=torch.ones(1, n_vision, dtype=torch.bool),
        vision_coords=torch.zeros(1, n_vision, 3, dtype=torch.long) if coords is None else coords,
        orig_idx=torch.arange(T)[None],
        attention_mask=torch.ones(1, T),
        sample_keys=torch.zeros(1, dtype=torch.long),
        layer=None,
        vision=vision,
    )


def kept_by(scorer: Scorer, state: LayerState, k: int) -> list[int]:
    """The vision tokens ``scorer`` keeps of the one sample of ``state`` at a count of ``k``."""
    return scorer.select(state, scorer.score(state), [k]).keep[0].tolist()


def pre_llm_run(lvlm, family: str, scorer: str, k: int, **params):
    """(inputs, output) of two samples of ``family`` run on ``lvlm`` with ``scorer`` keeping ``k`` before the LLM."""
    prompts, images = batch_for(lvlm, 2, family)
    inputs = lvlm.prepare(prompts, images)
    method = Method(
        scorer,
        schedule={"keep_mode": "absolute", "stages": [["pre_llm", k]]},
        position_policy="renumber",
        **params,
    )
    return inputs, lvlm.generate_from_inputs(inputs, method, max_new_tokens=2, stop_at_eos=False)


def check_preset(scorer: str, budget: int) -> Method:
    """The ``<scorer>-llava15-<budget>`` preset, checked to keep ``budget`` of 576 tokens before every one of 32
    layers from a pre-LLM stage on."""
    method = Method.from_preset(f"{scorer}-llava15-{budget}")
    assert method.scorer_name == scorer
    assert method.schedule.pre_llm is not None and method.schedule.tokens_per_layer(32, 576) == [budget] * 32
    return method


def check_proxy_run(scorer: str, budget: int) -> None:
    """The ``<scorer>-llava15-<budget>`` preset on the bundled proxy (256 vision tokens a digits image) keeps
    ``min(budget, 256)`` of them from the pre-LLM stage on."""
    lvlm = v2drop.load("proxy")
    sample = get_benchmark("digits").load("test", 1)[0]
    out = lvlm.generate(
        [lvlm.format_prompt(sample.question)],
        [list(sample.images)],
        method=f"{scorer}-llava15-{budget}",
        max_new_tokens=2,
    )
    trace = out.traces[0]
    assert trace.vision_tokens == 256
    count = min(budget, 256)
    assert len(trace.stages[0]["kept"]) == count and trace.vision_tokens_per_layer == [count] * lvlm.depth
