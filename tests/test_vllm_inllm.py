"""V²Drop's decoder stages inside vLLM (``v2drop.integrations.vllm_inllm``) on the bundled proxy: the same kept tokens
at every stage and the same greedy tokens as v2drop's engine, in prefill and over forced decode steps, one request at
a time and in batches, with the original and with renumbered positions.

Runs in the vLLM environment (``bash scripts/vllm_env.sh``, docs/serving.md); skipped where vLLM is not installed.
"""

import os

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh, docs/serving.md)"
)

import v2drop  # noqa: E402
from v2drop.benchmarks import get_benchmark  # noqa: E402
from v2drop.bundled import LOCAL_MODELS  # noqa: E402
from v2drop.integrations import vllm_inllm  # noqa: E402
from v2drop.integrations.vllm import ARCHITECTURE, engine_args, image_requests, offline_llm  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_SAMPLES = 8
MAX_TOKENS = 8
# (position policy, vLLM's max_num_seqs): the preset's original positions in batches of 4, renumbered one at a time
RUNS = [("preserve", 4), ("renumber", 1)]


def _method(policy: str):
    """V²Drop's 128-token preset at the proxy's depth (stages 1/6/8 of 12) with ``policy`` positions."""
    data = v2drop.Method.from_preset("v2drop-llava15-128", depth=12).to_dict()
    return v2drop.Method.from_dict({**data, "position_policy": policy})


@pytest.fixture(scope="module")
def samples():
    return get_benchmark("digits").load("test", N_SAMPLES)


@pytest.fixture(scope="module")
def engine(samples):
    """(prompts, policy -> engine output with EOS, policy -> output of MAX_TOKENS forced tokens, no-drop forced output);
    run before any vLLM engine (vLLM's CPU worker pins torch's threads for the rest of the process)."""
    lvlm = v2drop.load("proxy")
    prompts = [lvlm.format_prompt(s.question) for s in samples]
    images = [list(s.images) for s in samples]
    answers, forced = {}, {}
    for policy, _ in RUNS:
        answers[policy] = lvlm.generate(prompts, images, method=_method(policy), max_new_tokens=MAX_TOKENS)
        forced[policy] = lvlm.generate(
            prompts, images, method=_method(policy), max_new_tokens=MAX_TOKENS, stop_at_eos=False
        )
    none = lvlm.generate(prompts, images, method=None, max_new_tokens=MAX_TOKENS, stop_at_eos=False)
    return prompts, answers, forced, none


@pytest.fixture(scope="module")
def served(engine, samples):
    """Policy -> (answers, forced token ids, per-request traces, step counts) from vLLM with the in-LLM architecture,
    in-process. The forced requests decode MAX_TOKENS - (i % 4) tokens each, so in batches some finish while others
    decode and new prompts prefill in the same steps as decode tokens."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    prompts = engine[0]
    out = {}
    for policy, max_num_seqs in RUNS:
        llm = offline_llm(str(LOCAL_MODELS["proxy"]), _method(policy), max_num_seqs=max_num_seqs, kv_cache_gib=0.25)
        llm.apply_model(lambda model: model.v2drop_traces.clear())
        greedy = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        answers = llm.generate(image_requests(prompts, samples, "eos"), greedy, use_tqdm=False)
        traces = llm.apply_model(lambda model: list(model.v2drop_traces))[0]
        llm.apply_model(lambda model: model.v2drop_steps.update(prefill=0, decode=0, mixed=0))
        forced = [
            vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS - i % 4, ignore_eos=True)
            for i in range(len(prompts))
        ]
        tokens = llm.generate(image_requests(prompts, samples, "forced"), forced, use_tqdm=False)
        out[policy] = (
            [o.outputs[0].text.strip() for o in answers],
            [list(o.outputs[0].token_ids) for o in tokens],
            traces,
            llm.apply_model(lambda model: dict(model.v2drop_steps))[0],
        )
        del llm
    return out


@pytest.mark.parametrize("policy", [policy for policy, _ in RUNS])
def test_vllm_keeps_the_engines_tokens_at_every_stage(policy, engine, served):
    """Each request's kept prompt positions at stages 1, 6 and 8 are the engine's (71, 17 and 1 of 256)."""
    _, answers, _, _ = engine
    traces = served[policy][2]
    assert len(traces) == N_SAMPLES
    for trace, expected in zip(traces, answers[policy].traces):
        assert [s["layer"] for s in trace["stages"]] == [1, 6, 8]
        assert [s["kept"] for s in trace["stages"]] == [s["kept"] for s in expected.stages]
        assert [len(s["kept"]) for s in trace["stages"]] == [71, 17, 1]


@pytest.mark.parametrize("policy", [policy for policy, _ in RUNS])
def test_vllm_answers_and_decodes_as_the_engine(policy, engine, served):
    """Greedy answers equal the engine's, and so do up to MAX_TOKENS forced tokens (EOS ignored): every decode step's
    later layers attend only to the kept tokens, also in steps that prefill other requests. Most forced continuations
    differ from the undropped model's."""
    _, answers, forced, none = engine
    texts, tokens, _, steps = served[policy]
    assert texts == answers[policy].texts
    assert [len(t) for t in tokens] == [MAX_TOKENS - i % 4 for i in range(N_SAMPLES)]
    assert tokens == [ids[: len(t)] for ids, t in zip(forced[policy].generated_ids, tokens)]
    assert sum(t != n[: len(t)] for t, n in zip(tokens, none.generated_ids)) >= N_SAMPLES // 2
    max_num_seqs = dict(RUNS)[policy]
    assert steps["prefill"] > 0 and steps["decode"] > 0
    assert (steps["mixed"] > 0) == (max_num_seqs > 1)  # one request at a time never mixes


def test_slots_follow_the_block_table():
    """A position's slot is its block's id times the block size plus its offset in the block (hand-worked)."""
    row = torch.tensor([7, 2, 5])
    got = vllm_inllm.slots(row, torch.tensor([0, 3, 4, 9, 11]), block_size=4)
    assert got.tolist() == [28, 31, 8, 21, 23]


def test_the_in_llm_route_is_chosen_or_refused_with_the_reason():
    """V²Drop's decoder stages get the in-LLM architecture; pre-LLM methods keep theirs; attention-scored decoder
    stages and schedules mixing a pre-LLM stage with decoder stages are refused, naming why."""
    v2drop_args = engine_args(_method("preserve").to_dict())["hf_overrides"]
    assert v2drop_args["architectures"] == [vllm_inllm.ARCHITECTURE]
    assert engine_args("divprune-llava15-64")["hf_overrides"]["architectures"] == [ARCHITECTURE]
    with pytest.raises(ValueError, match="attention weights"):
        engine_args("fastv-llava15-128")
    mixed = v2drop.Method.from_dict(
        {"scorer": "uniform", "schedule": {"stages": [["pre_llm", 0.5], [2, 0.5]]}, "position_policy": "renumber"}
    )
    with pytest.raises(ValueError, match="not both in one method"):
        engine_args(mixed.to_dict())


def test_serve_bench_runs_v2drop_in_vllm(tmp_path):
    """experiments.serve_bench runs V²Drop in vLLM and reports its agreement with the engine."""
    from experiments import serve_bench

    out = serve_bench.main(
        [
            *("--limit", "4", "--warmup", "1", "--repeats", "1", "--threads", "2", "--max-num-seqs", "4"),
            *("--methods", "v2drop-llava15-128", "--store", str(tmp_path / "store")),
            *("--kv-cache-gib", "0.25", "--output", str(tmp_path / "out.json")),
        ]
    )
    result = out["methods"]["v2drop-llava15-128"]
    assert result["supported"] and result["agreement_with_engine"] == 1.0
    assert result["prompt_tokens_mean"] > 256  # the whole prompt is scheduled: the drops happen inside the decoder
    assert result["requests_per_s"] > 0 and result["prune_ms_per_image"] > 0


def test_two_images_per_prompt_drop_as_the_engine():
    """With two images per prompt the budget is the request's (512 vision tokens -> 143, 35, 1), as the engine's per
    sample: the same kept positions at every stage and the same 6 forced tokens, two requests at a time."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    samples = get_benchmark("digits").load("test", 12)
    lvlm = v2drop.load("proxy")
    method = _method("preserve")
    pairs = [(samples[i], samples[i + 5]) for i in range(4)]
    prompts = [lvlm.format_prompt(a.question, n_images=2) for a, _ in pairs]
    images = [[a.images[0], b.images[0]] for a, b in pairs]
    expected = lvlm.generate(prompts, images, method=method, max_new_tokens=6, stop_at_eos=False)
    llm = offline_llm(str(LOCAL_MODELS["proxy"]), method, max_num_seqs=2, kv_cache_gib=0.25)
    llm.apply_model(lambda model: model.v2drop_traces.clear())
    requests = [
        {"prompt": p, "multi_modal_data": {"image": im}, "multi_modal_uuids": {"image": [f"{i}/0", f"{i}/1"]}}
        for i, (p, im) in enumerate(zip(prompts, images))
    ]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(requests, params, use_tqdm=False)
    traces = llm.apply_model(lambda model: list(model.v2drop_traces))[0]
    del llm
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected.generated_ids
    assert [[s["kept"] for s in t["stages"]] for t in traces] == [
        [s["kept"] for s in e.stages] for e in expected.traces
    ]
    assert [len(s["kept"]) for s in traces[0]["stages"]] == [143, 35, 1]
