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
    item_kept_count,
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
GIVEN = [0, 3, 5, 7, 20, 40]  # the oracle's token indices (every image has at least 48 tokens)


def _pre_llm(scorer, keep: float = 0.25, mode: str = "relative") -> dict:
    """``scorer`` (a name or scorer config data) on a pre-LLM schedule keeping ``keep`` of each image, renumbered."""
    schedule = {"stages": [["pre_llm", keep]], "keep_mode": mode}
    return {"scorer": scorer, "schedule": schedule, "position_policy": "renumber"}


# none, DivPrune's preset (renumbered positions, its 64 of 576 as a share of each image), uniform keeping the
# original positions, CDPruner (its prompt's instruction ids travel from vLLM's processor to the model), random (its
# prompt's seed travels so), VidCom2 (an image is one frame) and the pooling controls (their kept count: the cells of
# the pooled grid of each image's non-square grid) and the oracle keeping exactly its 6 given tokens
METHODS = {
    "none": "none",
    "divprune": "divprune-llava15-64",
    "uniform-preserve": UNIFORM_PRESERVE,
    "cdpruner": "cdpruner-llava15-64",
    "random": _pre_llm("random"),
    "vidcom2": _pre_llm("vidcom2"),
    "frame_pool": _pre_llm("frame_pool", 0.23),
    "pool": _pre_llm("pool", 0.3),
    "given": _pre_llm({"name": "given", "keep": GIVEN}, 6, "absolute"),
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


def test_pooled_counts_are_the_grids_cells():
    """``pool`` and ``frame_pool`` keep the cells of each image's pooled grid (hand-worked on Qwen's non-square grids);
    the other scorers keep the stage's count."""
    pool, frame_pool = qwen_method(_pre_llm("pool", 0.3)), qwen_method(_pre_llm("frame_pool", 0.3))
    # 6 x 8 = 48 tokens, k = 14: pool's target_grid h = isqrt(14 * 6 // 8) = 3, w = 14 // 3 = 4 -> 12 cells;
    # frame_pool's pooled_grid: the most cells of at most 14 (2 x 7 = 14)
    assert item_kept_count(pool, (1, 6, 8)) == 12
    assert item_kept_count(frame_pool, (1, 6, 8)) == 14
    # 5 x 10 = 50, k = 15: pool h = isqrt(15 * 5 // 10) = 2, w = 7 -> 14; frame_pool 3 x 5 = 15
    assert item_kept_count(pool, (1, 5, 10)) == 14
    assert item_kept_count(frame_pool, (1, 5, 10)) == 15
    # 7 x 7 = 49, k = 14: pool h = isqrt(14) = 3, w = 4 -> 12; frame_pool 2 x 7 = 14
    assert item_kept_count(pool, (1, 7, 7)) == 12
    assert item_kept_count(frame_pool, (1, 7, 7)) == 14
    # a video of 2 frames of 2 x 2, k = 2: pool shares 1 + 1 -> 1 x 1 each; frame_pool 1 cell per frame
    assert item_kept_count(pool, (2, 2, 2)) == 2
    assert item_kept_count(frame_pool, (2, 2, 2)) == 2
    # k = 11 of 48 (keep 0.23): frame_pool's 2 x 5 = 10 on 6 x 8 (a square grid's rule would give 1 x 11)
    assert item_kept_count(qwen_method(_pre_llm("frame_pool", 0.23)), (1, 6, 8)) == 10
    assert item_kept_count(qwen_method(_pre_llm("vidcom2")), (1, 6, 8)) == 12
    assert item_kept_count(qwen_method("none"), (1, 6, 8)) == 48


def test_unsupported_methods_are_refused_with_the_reason():
    """Scorers reading [CLS], of a kept count not fixed by the budget, re-encoding or in the encoder; DivPrune keeping
    positions; attention-scored decoder stages; unknown families. The engine's Qwen pre-LLM scorers pass."""
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        qwen_engine_args("visionzip-llava15-64")
    for scorer in ("vispruner", "hiprune", "holov"):
        with pytest.raises(ValueError, match=r"no \[CLS\] token"):
            check_qwen_method(qwen_method(_pre_llm(scorer)))
    for scorer in ("holitom", "fastvid"):
        with pytest.raises(ValueError, match="not exactly, the budget"):
            check_qwen_method(qwen_method(_pre_llm(scorer)))
    with pytest.raises(ValueError, match="one image is one frame"):
        check_qwen_method(qwen_method(_pre_llm("frames")))
    with pytest.raises(ValueError, match="re-encode"):
        check_qwen_method(qwen_method(_pre_llm("downsample")))
    with pytest.raises(ValueError, match="vision-encoder stages"):
        check_qwen_method(qwen_method({"scorer": "flowcut", "schedule": {"stages": [["vision:1", 0.25]]}}))
    with pytest.raises(ValueError, match="before its images are encoded"):
        check_qwen_method(qwen_method({**_pre_llm("random"), "position_policy": "preserve"}))
    with pytest.raises(ValueError, match="combines other scorers"):
        check_qwen_method(qwen_method(_pre_llm({"name": "composite", "parts": [{"name": "divprune"}]})))
    for scorer in ("random", "given", "vidcom2", "frame_pool", "pool"):
        check_qwen_method(qwen_method(_pre_llm(scorer)))
    with pytest.raises(ValueError, match="before its images are encoded"):
        check_qwen_method(qwen_method({**UNIFORM_PRESERVE, "scorer": "divprune"}))
    with pytest.raises(ValueError, match="does not serve between decoder layers"):
        qwen_engine_args("dart-qwen2vl-778")  # decoder stages scored by attention (V²Drop's: test_vllm_qwen_inllm.py)
    with pytest.raises(ValueError, match="family must be one of"):
        qwen_engine_args("none", "llava")


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
    """Family, the engine's outputs and a function giving vLLM's (answers, prompt ids, per-image traces) of a method of
    ``METHODS`` (served on first use, so a test of one method serves only it), on three prompts with one image each;
    ``random`` also on a fourth prompt: the first image under the second prompt's question."""
    vllm = pytest.importorskip(
        "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh)"
    )
    family = request.param
    path = tmp_path_factory.mktemp(family)
    lvlm = tiny_qwen(family, path)
    prompts, images = _samples(lvlm)
    shared = ([prompts[1]], [images[0]])  # random: one image under two prompts
    # the engine first: vLLM's CPU worker pins torch's threads for the rest of the process
    engine = {
        name: lvlm.generate(
            prompts + shared[0] if name == "random" else prompts,
            [[i] for i in (images + shared[1] if name == "random" else images)],
            method=qwen_method(spec),
            max_new_tokens=6,
        )
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
    params = vllm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = {}

    def serve(name):
        """vLLM's outputs of ``METHODS[name]``."""
        if name in out:
            return out[name]
        pairs = list(zip(prompts, images)) + (list(zip(*shared)) if name == "random" else [])
        requests = [{"prompt": p, "multi_modal_data": {"image": i}} for p, i in pairs]
        llm = vllm.LLM(
            model=str(path),
            dtype="float32",
            enforce_eager=True,
            enable_prefix_caching=False,
            kv_cache_memory_bytes=2**28,
            max_model_len=2048,
            seed=0,
            **qwen_engine_args(METHODS[name], family),
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
        return out[name]

    return lvlm, engine, serve


def _item_trace(stage: dict, offset: int) -> dict:
    """A pre-LLM trace entry's kept (and merged: pooled tokens' places) positions, ``offset`` taken off."""
    return {key: [p - offset for p in stage[key]] for key in ("kept", "merged") if key in stage}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_vllm_qwen_answers_as_the_engine(name, served):
    """Greedy tokens equal the engine's; prompts are the engine's with each image's run cut to its kept count;
    each image keeps (or pools to) the engine's tokens."""
    lvlm, engine, serve = served
    generated, prompt_ids, traces = serve(name)
    assert generated == engine[name].generated_ids
    method = qwen_method(METHODS[name])
    image_id = lvlm.model.config.image_token_id
    grids = [(1, 6, 8), (1, 7, 7), (1, 5, 10)] + ([(1, 6, 8)] if name == "random" else [])
    counts = [item_kept_count(method, grid) for grid in grids]
    for served_ids, engine_ids, count in zip(prompt_ids, engine[name].prompt_ids, counts, strict=True):
        engine_ids = list(engine_ids)
        n, first = engine_ids.count(image_id), engine_ids.index(image_id)
        assert served_ids == engine_ids[:first] + [image_id] * count + engine_ids[first + n :]
    if method.drops:
        expected = [
            _item_trace(trace.stages[0], list(ids).index(image_id))
            for trace, ids in zip(engine[name].traces, engine[name].prompt_ids)
        ]
        assert [_item_trace(t, 0) for t in traces] == expected
        assert [len(e["kept"]) + len(e.get("merged", [])) for e in expected] == counts
    else:
        assert traces == []
    if name in ("pool", "frame_pool"):  # every kept token is pooled, on a grid smaller than the image's
        assert all(not e["kept"] and e["merged"] for e in expected)
        assert counts[:3] == ([12, 12, 14] if name == "pool" else [10, 10, 10])  # the stage's count: 14, 14, 15 / 11
    if name == "given":  # exactly the given tokens
        assert [e["kept"] for e in expected] == [GIVEN] * 3
    if name == "random":  # the first image under two prompts: the engine's two (different) kept sets, both served
        assert expected[3] == _item_trace(traces[3], 0) and expected[3]["kept"] != expected[0]["kept"]
    if name == "uniform-preserve":  # the same kept tokens at renumbered positions give other tokens: positions matter
        assert generated != engine["uniform-renumbered"].generated_ids
    if name == "cdpruner":  # under another prompt's question an image keeps other tokens: the instruction matters
        rotated = [
            [p - list(ids).index(image_id) for p in trace.stages[0]["kept"]]
            for trace, ids in zip(engine["cdpruner-rotated"].traces, engine["cdpruner-rotated"].prompt_ids)
        ]
        assert sum(a != b["kept"] for a, b in zip(rotated, expected)) >= 2
