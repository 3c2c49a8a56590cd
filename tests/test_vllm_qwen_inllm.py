"""V²Drop's decoder stages inside vLLM's Qwen2-VL and Qwen2.5-VL (``v2drop.integrations.vllm_inllm``): the same kept
tokens at every stage and the same greedy tokens as v2drop's engine, in prefill and over forced decode steps, one
request at a time and in batches mixing prefill and decode, with the original M-RoPE positions (the preset's policy)
and with renumbered ones, on tiny random checkpoints with Qwen's real image processing (``testing.build_real(...,
vllm=True)``).

The routing tests run anywhere; the served tests run in the vLLM environment (``bash scripts/vllm_env.sh``,
docs/serving.md) and are skipped where vLLM is not installed.
"""

import os

import pytest

import v2drop
from v2drop import testing
from v2drop.integrations import vllm_inllm
from v2drop.integrations.vllm_qwen import QWEN_ARCHITECTURES, engine_args_for, qwen_engine_args, qwen_method

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
SIZES = [(448, 336), (392, 392), (336, 448), (420, 280)]  # (width, height): 192, 196, 192 and 150 merged tokens
QUESTIONS = ["what is the digit ?", "how many ?", "what is the colour of the digit in row 2 column 3 ?", "where ?"]
MAX_TOKENS = 6
# (position policy, vLLM's max_num_seqs): the preset's original positions two at a time (of 4 requests: later prompts
# prefill next to earlier requests' decode tokens), renumbered one at a time
RUNS = [("preserve", 2), ("renumber", 1)]


def _method(policy: str):
    """V²Drop's Qwen2-VL preset (77.8% removed) at the tiny model's depth (stages 1/2/3 of 4, keeping 0.25, 0.05 and
    0 of the tokens present, at least one) with ``policy`` positions."""
    data = v2drop.Method.from_preset("v2drop-qwen2vl-778", depth=4).to_dict()
    return v2drop.Method.from_dict({**data, "position_policy": policy})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_qwen_in_llm_route_is_chosen(family, tmp_path):
    """V²Drop's decoder stages get the family's in-LLM architecture, also through a checkpoint's model type; a
    pre-LLM method keeps the pre-LLM architecture; attention-scored decoder stages are refused, naming why."""
    base = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family]
    args = qwen_engine_args(_method("preserve"), family)["hf_overrides"]
    assert args["architectures"] == [vllm_inllm.QWEN_ARCHITECTURES[base]]
    assert qwen_method(args["v2drop_method"]) == _method("preserve")
    assert qwen_engine_args("v2drop-qwen2vl-778", family)["hf_overrides"]["architectures"] == args["architectures"]
    pre = qwen_engine_args("divprune-llava15-64", family)["hf_overrides"]["architectures"]
    assert pre == [QWEN_ARCHITECTURES[base]]
    lvlm = testing.build_real(family, "eager", vllm=True)
    lvlm.model.config.save_pretrained(tmp_path)
    assert engine_args_for(str(tmp_path), _method("renumber"))["hf_overrides"]["architectures"] == args["architectures"]
    with pytest.raises(ValueError, match="does not serve between decoder layers"):
        qwen_engine_args("dart-qwen2vl-778", family)
    with pytest.raises(ValueError, match="Qwen2-VL / Qwen2.5-VL use M-RoPE"):  # LLaVA-1.5 serves FastV's rows
        qwen_engine_args("fastv-llava15-128", family)


def test_the_served_objective_prunes_by_the_qwen_rules_on_a_qwen_checkpoint(tmp_path):
    """On a Qwen checkpoint the served-throughput sweep prunes by the Qwen models' rules: V²Drop's decoder stages and
    uniform keeping the original positions run there (the latter not on LLaVA), VisionZip is refused (no [CLS])."""
    from v2drop.search.served import served_reason

    testing.build_real("qwen2_vl", "eager", vllm=True).model.config.save_pretrained(tmp_path)
    uniform = v2drop.Method.from_dict(
        {"scorer": "uniform", "schedule": {"stages": [["pre_llm", 0.25]]}, "position_policy": "preserve"}
    )
    assert served_reason(_method("preserve"), str(tmp_path)) is None
    assert served_reason(uniform, str(tmp_path)) is None
    assert "use position_policy 'renumber'" in served_reason(uniform, "proxy")
    assert "no [CLS] token" in served_reason(v2drop.Method.from_preset("visionzip-llava15-64"), str(tmp_path))
    assert served_reason(v2drop.Method.from_preset("visionzip-llava15-64"), "proxy") is None


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    """Family -> (the engine's outputs per policy and without dropping; vLLM's (token ids, traces, step counts) per
    policy). Request i decodes MAX_TOKENS - (i % 3) tokens, EOS ignored, so in batches some finish while others
    decode and prompts prefill in the same steps as decode tokens."""
    vllm = pytest.importorskip(
        "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh)"
    )
    family = request.param
    path = tmp_path_factory.mktemp(family)
    lvlm = testing.build_real(family, "eager", vllm=True)
    testing.save_for_vllm(lvlm, path)
    prompts = [testing.prompt_for(lvlm, q) for q in QUESTIONS]
    images = [testing.photo(i, *size) for i, size in enumerate(SIZES)]
    # the engine first: vLLM's CPU worker pins torch's threads for the rest of the process
    engine = {
        policy: lvlm.generate(prompts, [[i] for i in images], method=_method(policy), max_new_tokens=MAX_TOKENS)
        for policy, _ in RUNS
    }
    engine["none"] = lvlm.generate(prompts, [[i] for i in images], method=None, max_new_tokens=MAX_TOKENS)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    requests = [
        {"prompt": p, "multi_modal_data": {"image": i}, "multi_modal_uuids": {"image": [str(n)]}}
        for n, (p, i) in enumerate(zip(prompts, images))
    ]
    params = [
        vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS - i % 3, ignore_eos=True)
        for i in range(len(prompts))
    ]
    out = {}
    for policy, max_num_seqs in RUNS:
        llm = vllm.LLM(
            model=str(path),
            dtype="float32",
            max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=2**28,
            max_model_len=2048,
            seed=0,
            **vllm_inllm.ENGINE_KWARGS,
            **qwen_engine_args(_method(policy), family),
        )
        llm.apply_model(lambda model: model.v2drop_traces.clear())  # drop the traces of vLLM's profiling run
        llm.apply_model(lambda model: model.v2drop_steps.update(prefill=0, decode=0, mixed=0))
        outputs = llm.generate(requests, params, use_tqdm=False)
        out[policy] = (
            [list(o.outputs[0].token_ids) for o in outputs],
            llm.apply_model(lambda model: list(model.v2drop_traces))[0],
            llm.apply_model(lambda model: dict(model.v2drop_steps))[0],
            [list(o.prompt_token_ids) for o in outputs],
        )
        del llm
    return engine, out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("policy", [policy for policy, _ in RUNS])
def test_vllm_qwen_keeps_the_engines_tokens_at_every_stage(policy, served):
    """vLLM schedules the whole prompt (every image token), and each request's kept prompt positions at stages 1, 2 and
    3 are the engine's."""
    engine, out = served
    _, traces, _, prompt_ids = out[policy]
    assert prompt_ids == [list(ids) for ids in engine[policy].prompt_ids]
    assert len(traces) == len(QUESTIONS)
    for trace, expected in zip(traces, engine[policy].traces):
        assert [s["layer"] for s in trace["stages"]] == [1, 2, 3]
        assert [s["kept"] for s in trace["stages"]] == [s["kept"] for s in expected.stages]
    # 0.25 of 192, 196, 192, 150 tokens; then 0.05 of those (at least 1); then at least 1
    assert [[len(s["kept"]) for s in t["stages"]] for t in traces] == [[48, 2, 1], [49, 2, 1], [48, 2, 1], [37, 1, 1]]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("policy", [policy for policy, _ in RUNS])
def test_vllm_qwen_decodes_as_the_engine(policy, served):
    """Greedy tokens equal the engine's for every request and forced length (EOS ignored): the later layers attend
    only to the kept tokens at the engine's M-RoPE positions, in prefill and in every decode step, also in steps that
    prefill other requests. The control: the other position policy (the same kept tokens at the first stage, other
    positions after it) and no dropping give other tokens: the positions and the drops both show in the answers."""
    engine, out = served
    tokens, _, steps, _ = out[policy]
    assert [len(t) for t in tokens] == [MAX_TOKENS - i % 3 for i in range(len(QUESTIONS))]
    assert tokens == [ids[: len(t)] for ids, t in zip(engine[policy].generated_ids, tokens)]
    other = "renumber" if policy == "preserve" else "preserve"
    # the first stage keeps the same tokens under both policies (positions change only after it)
    assert [t.stages[0]["kept"] for t in engine[other].traces] == [t.stages[0]["kept"] for t in engine[policy].traces]
    assert sum(t != ids[: len(t)] for t, ids in zip(tokens, engine[other].generated_ids)) >= 2
    assert sum(t != ids[: len(t)] for t, ids in zip(tokens, engine["none"].generated_ids)) >= 2
    max_num_seqs = dict(RUNS)[policy]
    assert steps["prefill"] > 0 and steps["decode"] > 0
    assert (steps["mixed"] > 0) == (max_num_seqs > 1)  # one request at a time never mixes


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_served_throughput_on_a_qwen_checkpoint(tmp_path):
    """The served_throughput objective on a Qwen2-VL checkpoint: no dropping, DivPrune before the LLM and V²Drop's
    decoder stages are served through the plugin's Qwen models (requests/s on the front); VisionZip is pruned with
    the Qwen models' reason."""
    pytest.importorskip("vllm", reason="vLLM is not installed: it lives in its own environment")
    import optuna
    from reference_helpers import served_sweep

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    path = tmp_path / "qwen2_vl"
    testing.save_for_vllm(testing.build_real("qwen2_vl", "eager", vllm=True), path)
    result, by_label = served_sweep(
        tmp_path,
        "served-qwen",
        str(path),
        ["divprune-llava15-64", "visionzip-llava15-64", "v2drop-qwen2vl-778"],
        ["divprune", "visionzip", "v2drop"],
        ["divprune", "visionzip"],
    )
    pruned = by_label["visionzip-llava15-64"]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert "no [CLS] token" in pruned.user_attrs["pruned_reason"]
    for label in ("none", "divprune-llava15-64", "v2drop-qwen2vl-778"):
        trial = by_label[label]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.values[1] == trial.user_attrs["metrics"]["served_requests_per_s"] > 0
    assert result["front"] and all(r["served_throughput"] > 0 for r in result["front"])
