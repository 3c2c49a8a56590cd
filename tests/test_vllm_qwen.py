"""The vLLM plugin's Qwen2-VL / Qwen2.5-VL models: placeholders, kept rows, M-RoPE positions and greedy answers as
v2drop's engine gives them, on tiny random checkpoints with Qwen's real image processing (patch 14, merge 2).

The position tests run anywhere (``mrope_positions`` imports nothing from vLLM); the served tests run in the vLLM
environment (``bash scripts/vllm_env.sh``, docs/serving.md) and are skipped where vLLM is not installed.
"""

import os

import pytest
import torch

from v2drop import testing
from v2drop.integrations.vllm_qwen import (
    QWEN_ARCHITECTURES,
    check_qwen_method,
    kept_count,
    mrope_positions,
    qwen_engine_args,
    qwen_method,
)
from v2drop.lvlm import LVLM
from v2drop.method import Method

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
SIZES = [(224, 168), (196, 196), (280, 140)]  # (width, height): 6x8, 7x7 and 5x10 merged tokens
QUESTIONS = ["what is the digit ?", "how many ?", "what is the colour of the digit in row 2 column 3 ?"]
UNIFORM_PRESERVE = {"scorer": "uniform", "schedule": {"stages": [["pre_llm", 0.25]]}, "position_policy": "preserve"}
POSITION_PRESERVE = {"scorer": "position", "schedule": {"stages": [["pre_llm", 0.3]]}, "position_policy": "preserve"}
# none, DivPrune's preset (renumbered positions, its 64 of 576 as a share of each image), uniform keeping the
# original positions and CDPruner (its prompt's instruction ids travel from vLLM's processor to the model)
METHODS = {
    "none": "none",
    "divprune": "divprune-llava15-64",
    "uniform-preserve": UNIFORM_PRESERVE,
    "cdpruner": "cdpruner-llava15-64",
}


def tiny_qwen(family: str, path=None, seed: int = 0) -> LVLM:
    """A tiny random Qwen2-VL / Qwen2.5-VL with vLLM's head size and Qwen's real image processing
    (``testing.build_real(..., vllm=True)``: 4 decoder layers of width 64, a 2-layer tower, patch 14, merge 2); saved
    for vLLM to ``path`` when given (``testing.save_for_vllm``)."""
    lvlm = testing.build_real(family, "eager", seed, vllm=True)
    if path is not None:
        testing.save_for_vllm(lvlm, path)
    return lvlm


def _samples(lvlm):
    """Three prompts, each with one image of another size."""
    prompts = [testing.prompt_for(lvlm, q) for q in QUESTIONS]
    return prompts, [testing.photo(i, *size) for i, size in enumerate(SIZES)]


def test_presets_keep_their_share_of_each_image():
    """An absolute preset written for 576 tokens keeps the same share of a Qwen image; a relative keep stays."""
    method = qwen_method("divprune-llava15-64")
    assert method.schedule.keep_mode == "relative"
    assert [kept_count(method, n) for n in (576, 48, 49, 50, 9)] == [64, 5, 5, 5, 1]
    assert kept_count(qwen_method(UNIFORM_PRESERVE), 48) == 12
    assert kept_count(qwen_method("none"), 48) == 48
    absolute = {"scorer": "divprune", "schedule": {"stages": [["pre_llm", 20]], "keep_mode": "absolute"}}
    assert [kept_count(qwen_method(absolute), n) for n in (48, 12)] == [20, 12]  # counts given as data stay counts
    args = qwen_engine_args("divprune-llava15-64", "qwen2_5_vl")["hf_overrides"]
    assert args["architectures"] == [QWEN_ARCHITECTURES["Qwen2_5_VLForConditionalGeneration"]]
    assert Method.from_dict(args["v2drop_method"]) == method


def test_unsupported_methods_are_refused_with_the_reason():
    """VisionZip (no [CLS]), random (prompt seed), DivPrune keeping positions, attention-scored decoder stages, unknown
    families."""
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        qwen_engine_args("visionzip-llava15-64")
    with pytest.raises(ValueError, match="seeded from the whole prompt"):
        check_qwen_method(qwen_method(_random()))
    with pytest.raises(ValueError, match="before its images are encoded"):
        check_qwen_method(qwen_method({**UNIFORM_PRESERVE, "scorer": "divprune"}))
    with pytest.raises(ValueError, match="does not serve between decoder layers"):
        qwen_engine_args("dart-qwen2vl-778")  # decoder stages scored by attention (V²Drop's: test_vllm_qwen_inllm.py)
    with pytest.raises(ValueError, match="family must be one of"):
        qwen_engine_args("none", "llava")


def _random():
    """``random`` on a pre-LLM schedule, renumbered."""
    return {"scorer": "random", "schedule": {"stages": [["pre_llm", 0.25]]}, "position_policy": "renumber"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "spec", ["none", "divprune-llava15-64", UNIFORM_PRESERVE, POSITION_PRESERVE], ids=["none", "div", "uni", "pos"]
)
def test_mrope_positions_are_the_engines(family, spec):
    """The plugin's M-RoPE positions of a pruned prompt are those the engine gives its kept tokens, and decoding
    continues where the engine's does (largest position + 1)."""
    lvlm = tiny_qwen(family)
    method = qwen_method(spec)
    image_id = lvlm.model.config.image_token_id
    merge = lvlm.model.config.vision_config.spatial_merge_size
    for prompt, image in zip(*_samples(lvlm)):
        inputs = lvlm.prepare([prompt], [[image]])
        full = lvlm.adapter.position_ids(inputs)[:, 0]  # (3, L): transformers' get_rope_index, the engine's
        out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1)
        ids = out.prompt_ids[0]
        vision = [i for i, t in enumerate(ids) if t == image_id]
        kept = out.traces[0].stages[0]["kept"] if method.drops else vision
        keep = sorted([i for i, t in enumerate(ids) if t != image_id] + list(kept))
        n = len(keep)
        renumber = method.drops and method.position_policy == "renumber"
        expected = torch.arange(n).expand(3, -1) if renumber else full[:, keep]
        t, h, w = inputs["image_grid_thw"][0].tolist()
        positions, delta = mrope_positions(method, n, [(vision[0], t, h // merge, w // merge, 1.0)])
        assert torch.equal(positions, expected)
        assert delta == int(expected.max()) + 1 - n
        if not renumber and method.drops:  # kept tokens keep their grid positions: not contiguous
            assert not torch.equal(positions, torch.arange(n).expand(3, -1))


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    """Family, the engine's outputs and vLLM's (answers, prompt ids, per-image traces) for every method in
    ``METHODS``, on three prompts with one image each."""
    vllm = pytest.importorskip(
        "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh)"
    )
    family = request.param
    path = tmp_path_factory.mktemp(family)
    lvlm = tiny_qwen(family, path)
    prompts, images = _samples(lvlm)
    # the engine first: vLLM's CPU worker pins torch's threads for the rest of the process
    engine = {
        name: lvlm.generate(prompts, [[i] for i in images], method=qwen_method(spec), max_new_tokens=6)
        for name, spec in METHODS.items()
    }
    # the control: uniform's kept tokens at renumbered positions answer otherwise
    renumbered = qwen_method({**UNIFORM_PRESERVE, "position_policy": "renumber"})
    engine["uniform-renumbered"] = lvlm.generate(prompts, [[i] for i in images], method=renumbered, max_new_tokens=6)
    # the control: CDPruner on each image under another prompt's question keeps another set
    rotated = prompts[1:] + prompts[:1]
    engine["cdpruner-rotated"] = lvlm.generate(
        rotated, [[i] for i in images], method=qwen_method(METHODS["cdpruner"]), max_new_tokens=1
    )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    requests = [{"prompt": p, "multi_modal_data": {"image": i}} for p, i in zip(prompts, images)]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = {}
    for name, spec in METHODS.items():
        llm = vllm.LLM(
            model=str(path),
            dtype="float32",
            enforce_eager=True,
            enable_prefix_caching=False,
            kv_cache_memory_bytes=2**28,
            max_model_len=2048,
            seed=0,
            **qwen_engine_args(spec, family),
        )
        llm.apply_model(lambda model: model.v2drop_traces.clear())  # drop the traces of vLLM's profiling run
        outputs = llm.generate(requests, params, use_tqdm=False)
        traces = llm.apply_model(lambda model: list(model.v2drop_traces))[0]
        out[name] = (
            [list(o.outputs[0].token_ids) for o in outputs],
            [list(o.prompt_token_ids) for o in outputs],
            traces,
        )
        del llm
    return lvlm, engine, out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_vllm_qwen_answers_as_the_engine(name, served):
    """Greedy tokens equal the engine's; prompts are the engine's with each image's run cut to its kept count;
    each image keeps the engine's tokens."""
    lvlm, engine, out = served
    generated, prompt_ids, traces = out[name]
    assert generated == engine[name].generated_ids
    method = qwen_method(METHODS[name])
    image_id = lvlm.model.config.image_token_id
    for served_ids, engine_ids in zip(prompt_ids, engine[name].prompt_ids):
        engine_ids = list(engine_ids)
        n, first = engine_ids.count(image_id), engine_ids.index(image_id)
        assert served_ids == engine_ids[:first] + [image_id] * kept_count(method, n) + engine_ids[first + n :]
    if method.drops:
        expected = [
            [p - list(ids).index(image_id) for p in trace.stages[0]["kept"]]
            for trace, ids in zip(engine[name].traces, engine[name].prompt_ids)
        ]
        assert [list(t["kept"]) for t in traces] == expected
        assert [len(k) for k in expected] == [kept_count(method, 48), kept_count(method, 49), kept_count(method, 50)]
    else:
        assert traces == []
    if name == "uniform-preserve":  # the same kept tokens at renumbered positions give other tokens: positions matter
        assert generated != engine["uniform-renumbered"].generated_ids
    if name == "cdpruner":  # under another prompt's question an image keeps other tokens: the instruction matters
        rotated = [
            [p - list(ids).index(image_id) for p in trace.stages[0]["kept"]]
            for trace, ids in zip(engine["cdpruner-rotated"].traces, engine["cdpruner-rotated"].prompt_ids)
        ]
        assert sum(a != b for a, b in zip(rotated, expected)) >= 2
