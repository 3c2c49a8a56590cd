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
import torch

import v2drop
from v2drop import testing
from v2drop.attention import attention_rows
from v2drop.integrations import vllm_attention, vllm_inllm
from v2drop.integrations.vllm_qwen import QWEN_ARCHITECTURES, engine_args_for, qwen_engine_args, qwen_method
from v2drop.presets import get_preset

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
SIZES = [(448, 336), (392, 392), (336, 448), (420, 280)]  # (width, height): 192, 196, 192 and 150 merged tokens
QUESTIONS = ["what is the digit ?", "how many ?", "what is the colour of the digit in row 2 column 3 ?", "where ?"]
MAX_TOKENS = 6
# (position policy, vLLM's max_num_seqs): the preset's original positions two at a time (of 4 requests: later prompts
# prefill next to earlier requests' decode tokens), renumbered one at a time
RUNS = [("preserve", 2), ("renumber", 1)]


# FastV, PDrop and the V²Drop-FastV composite at the tiny model's depth -> (position policy, stage layers, kept at each
# stage of the four images' 192, 196, 192 and 150 tokens), run two requests at a time
ATTENTION = {
    "fastv": ("preserve", [1], [[32], [33], [32], [25]]),  # 98/576 of each image before layer 1 (layer 0's rows)
    "pdrop": ("renumber", [1, 2, 3], [[75, 37, 18], [77, 38, 19], [75, 37, 18], [58, 29, 14]]),
    "composite": ("preserve", [1, 2, 3], [[53, 13, 1], [54, 13, 1], [53, 13, 1], [42, 10, 1]]),
}


def _attention_method(name: str):
    """FastV's, PDrop's or the V²Drop-FastV composite's preset at the tiny model's 4 layers, a preset's absolute
    counts turned into the same share of each image as ``qwen_method`` turns them (of its 576 reference tokens).

    ``fastv-llava15-128`` (stage 2 of 32 keeping 98) becomes stage 1 keeping 98/576 = 0.170;
    ``composite-v2drop-fastv-llava15-128`` moves to stages 1/2/3 (0.28, 0.25, 0). ``pdrop-llava15-128``'s four stages
    (2/8/16/24) do not fit 4 layers, so its first three keeps (0.393, then lambda = 0.5 twice) go before layers 1, 2
    and 3, with the preset's renumbered positions.
    """
    if name == "pdrop":
        data = v2drop.Method.from_preset("pdrop-llava15-128").to_dict()
        stages = [[1, 0.393], [2, 0.5], [3, 0.5]]
        return v2drop.Method.from_dict({**data, "schedule": {"stages": stages}, "reference_depth": 4})
    preset = {"fastv": "fastv-llava15-128", "composite": "composite-v2drop-fastv-llava15-128"}[name]
    method = v2drop.Method.from_preset(preset, depth=4)
    if method.schedule.keep_mode == "absolute":
        schedule = method.schedule.to_relative(get_preset(preset).reference_vision_tokens)
        method = v2drop.Method.from_dict({**method.to_dict(), "schedule": schedule.to_dict()})
    return method


def _method(policy: str):
    """V²Drop's Qwen2-VL preset (77.8% removed) at the tiny model's depth (stages 1/2/3 of 4, keeping 0.25, 0.05 and
    0 of the tokens present, at least one) with ``policy`` positions."""
    data = v2drop.Method.from_preset("v2drop-qwen2vl-778", depth=4).to_dict()
    return v2drop.Method.from_dict({**data, "position_policy": policy})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_qwen_in_llm_route_is_chosen(family, tmp_path):
    """V²Drop's, FastV's and PDrop's decoder stages (and their composite) get the family's in-LLM architecture, also
    through a checkpoint's model type; a pre-LLM method keeps the pre-LLM architecture; DART's decoder stages are
    refused, naming why."""
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
    for name in ATTENTION:  # FastV's and PDrop's rows are recomputed with the layers' M-RoPE
        assert qwen_engine_args(_attention_method(name), family)["hf_overrides"]["architectures"] == [
            vllm_inllm.QWEN_ARCHITECTURES[base]
        ]
    assert qwen_engine_args("fastv-llava15-128", family)["hf_overrides"]["architectures"] == args["architectures"]


def test_the_served_objective_prunes_by_the_qwen_rules_on_a_qwen_checkpoint(tmp_path):
    """On a Qwen checkpoint the served-throughput sweep prunes by the Qwen models' rules: V²Drop's, FastV's and PDrop's
    decoder stages and uniform keeping the original positions run there (the latter not on LLaVA), VisionZip is
    refused (no [CLS])."""
    from v2drop.search.served import served_reason

    testing.build_real("qwen2_vl", "eager", vllm=True).model.config.save_pretrained(tmp_path)
    uniform = v2drop.Method.from_dict(
        {"scorer": "uniform", "schedule": {"stages": [["pre_llm", 0.25]]}, "position_policy": "preserve"}
    )
    assert served_reason(_method("preserve"), str(tmp_path)) is None
    for name in ATTENTION:
        assert served_reason(_attention_method(name), str(tmp_path)) is None
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
    from reference_helpers import check_served_front, served_sweep

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
    served = ["none", "divprune-llava15-64", "v2drop-qwen2vl-778"]
    check_served_front(result, by_label, "visionzip-llava15-64", "no [CLS] token", served)


def test_mrope_cos_sin_takes_each_section_from_its_row():
    """Hand-worked: with sections [1, 1, 2] of a rotary dimension of 8, a token's cos/sin take frequency 0 from its T
    position, 1 from its H position and 2-3 from its W position, doubled (neox); (B, L) positions read every
    frequency at the one row; a plain RoPE layer refuses 3-row positions."""
    from types import SimpleNamespace

    half = 100.0 + 10.0 * torch.arange(8.0)[:, None] + torch.arange(4.0)  # cache row p: cos 100 + 10p + j, sin -that
    rotary = type(vllm_attention.MROPE, (SimpleNamespace,), {})(
        cos_sin_cache=torch.cat((half, -half), dim=-1), mrope_section=[1, 1, 2]
    )
    layer = SimpleNamespace(self_attn=SimpleNamespace(rotary_emb=rotary))
    positions = torch.tensor([[[0, 1]], [[2, 3]], [[4, 5]]])  # (3, B=1, L=2): T, H, W rows
    cos, sin = vllm_attention.layer_cos_sin(layer, positions, torch.float32)
    assert cos.tolist() == [[[100, 121, 142, 143] * 2, [110, 131, 152, 153] * 2]]
    assert torch.equal(sin, -cos)
    cos, _ = vllm_attention.layer_cos_sin(layer, torch.tensor([[3]]), torch.float32)
    assert cos.tolist() == [[[130, 131, 132, 133] * 2]]
    plain = SimpleNamespace(self_attn=SimpleNamespace(rotary_emb=SimpleNamespace(cos_sin_cache=rotary.cos_sin_cache)))
    with pytest.raises(ValueError, match=r"RoPE positions must be \(B, L\)"):
        vllm_attention.layer_cos_sin(plain, positions, torch.float32)


def test_mrope_cos_sin_rotate_as_vllms_mrope():
    """Queries and keys rotated with ``layer_cos_sin`` of (3, 1, L) positions equal vLLM's own
    ``MRotaryEmbedding.forward_native`` on the same (3, L) positions (Qwen2-VL's sections of the tiny models);
    vLLM's interleaved M-RoPE class and an interleaved ``MRotaryEmbedding`` are refused by ``check_layers``."""
    pytest.importorskip("vllm", reason="vLLM is not installed: it lives in its own environment")
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding, MRotaryEmbeddingInterleaved

    from v2drop.attention import rotate_half

    args = (32, 32, 512, 10000.0, True, torch.float32)
    with set_current_vllm_config(VllmConfig()):
        rotary = MRotaryEmbedding(*args, mrope_section=[4, 6, 6])
        interleaved = MRotaryEmbedding(*args, mrope_section=[4, 6, 6], mrope_interleaved=True)
        other = MRotaryEmbeddingInterleaved(*args, mrope_section=[4, 6, 6], mrope_interleaved=True)
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 500, (3, 9), generator=generator)
    q, k = torch.randn(9, 2 * 32, generator=generator), torch.randn(9, 32, generator=generator)
    want_q, want_k = rotary.forward_native(positions, q.clone(), k.clone())
    layer = SimpleNamespace(self_attn=SimpleNamespace(rotary_emb=rotary))
    cos, sin = vllm_attention.layer_cos_sin(layer, positions[:, None], torch.float32)  # (1, 9, 32)
    for x, want in ((q, want_q), (k, want_k)):
        heads = x.view(9, -1, 32).transpose(0, 1)[None]  # (1, H, 9, 32)
        got = (heads * cos[:, None] + rotate_half(heads) * sin[:, None])[0].transpose(0, 1).reshape(9, -1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    cos1, _ = vllm_attention.layer_cos_sin(layer, positions[:1], torch.float32)  # the T row on every section
    assert float((cos1 - cos).abs().max()) > 0.1

    def decoder(rope):
        attn = dict(num_heads=2, total_num_heads=2, head_dim=32, qkv_proj=object(), rotary_emb=rope)
        return SimpleNamespace(self_attn=SimpleNamespace(**attn), input_layernorm=object())

    vllm_attention.check_layers([decoder(rotary)])
    with pytest.raises(ValueError, match="interleaves the T/H/W frequencies"):
        vllm_attention.check_layers([decoder(interleaved)])
    with pytest.raises(ValueError, match="MRotaryEmbeddingInterleaved.* is not vLLM's MRotaryEmbedding"):
        vllm_attention.check_layers([decoder(other)])


def _vllm_rows(model, hidden, positions, layer_idx, query):
    """Head-averaged attention rows of ``query`` over ``hidden`` (1, L, D) at vLLM's decoder layer ``layer_idx``
    through the in-LLM plugin's stage adapter, at M-RoPE ``positions`` (3, 1, L) and (the negative control) with
    plain RoPE at their first row only."""
    adapter = vllm_attention.StageAdapter(model.language_model.model.layers, model.language_model.model.norm)
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    with torch.no_grad():
        return tuple(
            attention_rows(
                adapter.layers[layer_idx], hidden, adapter.layer_rope(adapter.rope(hidden, pos), layer_idx), mask, query
            )
            for pos in (positions, positions[0])
        )


@pytest.fixture(scope="module", params=FAMILIES)
def attention_served(request, tmp_path_factory):
    """Family -> (the engine's (greedy output, forced output) per ``ATTENTION`` method; vLLM's (greedy texts, forced
    token ids, traces, step counts) per method; (hidden, positions, query, the engine's rows per layer, the engine's
    rows without q/k biases per layer, vLLM's (M-RoPE rows, first-row RoPE rows) per layer)).

    The tiny checkpoint gets random q/k/v biases (transformers initialises them to zero), so equal rows cover them,
    and its generation config the tokenizer's EOS (which vLLM stops at). Greedy requests stop at EOS; forced request
    i decodes MAX_TOKENS - (i % 3) tokens, EOS ignored; two requests at a time, so prompts prefill in the same steps
    as other requests' decode tokens."""
    vllm = pytest.importorskip(
        "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh)"
    )
    family = request.param
    path = tmp_path_factory.mktemp(f"{family}-attention")
    lvlm = testing.build_real(family, "eager", vllm=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lvlm.adapter.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=generator))
    # the engine stops at the tokenizer's EOS as vLLM does (the tiny model's generation config names none)
    lvlm.model.generation_config.eos_token_id = lvlm.processor.tokenizer.eos_token_id
    testing.save_for_vllm(lvlm, path)
    prompts = [testing.prompt_for(lvlm, q) for q in QUESTIONS]
    images = [[testing.photo(i, *size)] for i, size in enumerate(SIZES)]
    # the engine first: vLLM's CPU worker pins torch's threads for the rest of the process
    engine = {
        name: tuple(
            lvlm.generate(prompts, images, method=_attention_method(name), max_new_tokens=MAX_TOKENS, stop_at_eos=eos)
            for eos in (True, False)
        )
        for name in ATTENTION
    }
    # rows of a random input at the first prompt's M-RoPE positions (transformers' get_rope_index: T/H/W rows differ)
    positions = lvlm.adapter.position_ids(lvlm.prepare(prompts[:1], images[:1]))  # (3, 1, L)
    length = positions.shape[-1]
    hidden = torch.randn(1, length, lvlm.model.config.text_config.hidden_size, generator=generator)
    query = torch.tensor([[length - 1, length // 2]])
    mask = torch.ones(1, length, dtype=torch.long)
    want, unbiased = {}, {}
    adapter = lvlm.adapter
    with torch.no_grad():
        for layer in (0, 2):
            rope = adapter.layer_rope(adapter.rope(hidden, positions), layer)
            want[layer] = attention_rows(adapter.layers[layer], hidden, rope, mask, query)
            attn = adapter.layers[layer].self_attn
            saved = attn.q_proj.bias.clone(), attn.k_proj.bias.clone()
            attn.q_proj.bias.zero_(), attn.k_proj.bias.zero_()
            unbiased[layer] = attention_rows(adapter.layers[layer], hidden, rope, mask, query)
            attn.q_proj.bias.copy_(saved[0]), attn.k_proj.bias.copy_(saved[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    requests = [
        {"prompt": p, "multi_modal_data": {"image": i[0]}, "multi_modal_uuids": {"image": [str(n)]}}
        for n, (p, i) in enumerate(zip(prompts, images))
    ]
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    forced = [
        vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS - i % 3, ignore_eos=True)
        for i in range(len(prompts))
    ]
    out, rows = {}, {}
    for name in ATTENTION:
        llm = vllm.LLM(
            model=str(path),
            dtype="float32",
            max_num_seqs=2,
            kv_cache_memory_bytes=2**28,
            max_model_len=2048,
            seed=0,
            **vllm_inllm.ENGINE_KWARGS,
            **qwen_engine_args(_attention_method(name), family),
        )
        if not rows:
            for layer in want:
                rows[layer] = llm.apply_model(
                    lambda model, layer=layer: _vllm_rows(model, hidden, positions, layer, query)
                )[0]
        llm.apply_model(lambda model: model.v2drop_traces.clear())  # drop the traces of vLLM's profiling run
        answers = llm.generate(requests, greedy, use_tqdm=False)
        traces = llm.apply_model(lambda model: list(model.v2drop_traces))[0]
        llm.apply_model(lambda model: model.v2drop_steps.update(prefill=0, decode=0, mixed=0))
        tokens = llm.generate(requests, forced, use_tqdm=False)
        out[name] = (
            [o.outputs[0].text.strip() for o in answers],
            [list(o.outputs[0].token_ids) for o in tokens],
            traces,
            llm.apply_model(lambda model: dict(model.v2drop_steps))[0],
        )
        del llm
    return engine, out, (hidden, positions, query, want, unbiased, rows)


@pytest.mark.integration
@pytest.mark.slow
def test_vllm_qwen_layers_give_the_engines_mrope_attention_rows(attention_served):
    """The stage adapter's rows over vLLM's Qwen layers (fused qkv with biases, M-RoPE cache) equal ``attention_rows``
    over transformers' layers (the engine's adapter, transformers' Qwen2-VL M-RoPE) at the same random hidden states and
    a real prompt's (3, 1, L) positions, whose T/H/W rows differ on the image. Negative controls: the q/k biases
    change the rows (so they are covered), and plain RoPE at the first (T) row only changes the rows and the top
    quarter of the image's keys."""
    _, _, (hidden, positions, query, want, unbiased, rows) = attention_served
    assert not torch.equal(positions[0], positions[1]) and not torch.equal(positions[1], positions[2])
    for layer, (got, first_row) in rows.items():
        assert got.shape == (1, 2, hidden.shape[1])
        torch.testing.assert_close(got, want[layer], rtol=1e-5, atol=1e-6)
        assert float(got[0, 1, query[0, 1] + 1 :].abs().max()) == 0.0  # causal
        assert float((got - unbiased[layer]).abs().max()) > 1e-3
        assert float((got - first_row).abs().max()) > 1e-3
        image = (positions[0, 0] != positions[1, 0]).nonzero()[:, 0]  # where H differs from T: image tokens
        k = image.numel() // 4
        top = set(got[0, 0, image].topk(k).indices.tolist())
        assert top != set(first_row[0, 0, image].topk(k).indices.tolist())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTENTION))
def test_vllm_qwen_keeps_the_engines_tokens_by_attention(name, attention_served):
    """FastV (layer 0's row of the last prompt token, before layer 1; original positions), PDrop (layer l's row, before
    layers 1/2/3; renumbered positions) and the V²Drop-FastV composite (stages 1/2/3): each request's kept prompt
    positions at every stage are the engine's."""
    engine, out, _ = attention_served
    _, layers, counts = ATTENTION[name]
    traces = out[name][2]
    assert len(traces) == len(QUESTIONS)
    for trace, want in zip(traces, engine[name][0].traces):
        assert [s["layer"] for s in trace["stages"]] == layers
        assert [s["kept"] for s in trace["stages"]] == [s["kept"] for s in want.stages]
    assert [[len(s["kept"]) for s in t["stages"]] for t in traces] == counts


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTENTION))
def test_vllm_qwen_decodes_by_attention_as_the_engine(name, attention_served):
    """Greedy answers (EOS stops) and up to MAX_TOKENS forced tokens (EOS ignored) equal the engine's, in steps that
    prefill a prompt next to another request's decode token."""
    engine, out, _ = attention_served
    answers, forced = engine[name]
    texts, tokens, _, steps = out[name]
    assert texts == [t.strip() for t in answers.texts]
    assert [len(t) for t in tokens] == [MAX_TOKENS - i % 3 for i in range(len(QUESTIONS))]
    assert tokens == [ids[: len(t)] for ids, t in zip(forced.generated_ids, tokens)]
    assert steps["prefill"] > 0 and steps["decode"] > 0 and steps["mixed"] > 0


# family -> the ATTENTION method run under preemption (FastV's query and PDrop's renumbered M-RoPE positions)
PREEMPTED = {"qwen2_vl": "fastv", "qwen2_5_vl": "pdrop"}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_preempted_qwen_requests_are_recomputed_as_the_engine(family, tmp_path):
    """A KV cache of two prompts' blocks and one more, four requests of 32 forced tokens: vLLM preempts decoding
    requests and prefills their prompt and generated tokens again (M-RoPE positions included). Every prefill keeps the
    engine's tokens and every request decodes the engine's tokens."""
    pytest.importorskip(
        "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh)"
    )
    from reference_helpers import check_recomputed_as_the_engine, preempting_run

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    lvlm = testing.build_real(family, "eager", vllm=True)
    testing.save_for_vllm(lvlm, tmp_path)
    method = _attention_method(PREEMPTED[family])
    prompts = [testing.prompt_for(lvlm, q) for q in QUESTIONS]
    images = [testing.photo(i, *size) for i, size in enumerate(SIZES)]
    expected = lvlm.generate(prompts, [[i] for i in images], method=method, max_new_tokens=32, stop_at_eos=False)
    requests = [
        {"prompt": p, "multi_modal_data": {"image": i}, "multi_modal_uuids": {"image": [str(n)]}}
        for n, (p, i) in enumerate(zip(prompts, images))
    ]
    text_config = getattr(lvlm.model.config, "text_config", lvlm.model.config)
    served = preempting_run(str(tmp_path), qwen_engine_args(method, family), requests, expected, text_config, 32)
    check_recomputed_as_the_engine(served, expected, len(QUESTIONS))
