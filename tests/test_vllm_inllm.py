"""V²Drop's, FastV's, PDrop's and SparseVLM's decoder stages inside vLLM (``v2drop.integrations.vllm_inllm``) on the
bundled proxy: the same kept tokens at every stage and the same greedy tokens as v2drop's engine, in prefill and over
forced decode steps, one request at a time and in batches, with the original and with renumbered positions, also for
requests vLLM preempts and recomputes. FastV's, PDrop's and SparseVLM's attention rows are recomputed from vLLM's own
layers (``v2drop.integrations.vllm_attention``): equal to the rows transformers' layers give, and a different layer's
rows keep different tokens. SparseVLM's raters come from the layer-0 embeddings (raters from a later layer's input keep
other tokens) and its recycled tokens join the rows with the engine's values and positions.

Runs in the vLLM environment (``bash scripts/vllm_env.sh``, docs/serving.md); skipped where vLLM is not installed.
"""

import os

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh, docs/serving.md)"
)

import v2drop  # noqa: E402
from v2drop.attention import attention_rows  # noqa: E402
from v2drop.benchmarks import get_benchmark  # noqa: E402
from v2drop.bundled import LOCAL_MODELS  # noqa: E402
from v2drop.integrations import vllm_attention, vllm_inllm  # noqa: E402
from v2drop.integrations.vllm import ARCHITECTURE, engine_args, image_requests, offline_llm  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_SAMPLES = 8
MAX_TOKENS = 8
# (position policy, vLLM's max_num_seqs): the preset's original positions in batches of 4, renumbered one at a time
RUNS = [("preserve", 4), ("renumber", 1)]
# attention-scored presets at the proxy's depth, run in batches of 4 -> (stage layers, kept of 256 at each)
ATTENTION = {
    "fastv-llava15-128": ([1], [98]),
    "pdrop-llava15-128": ([1, 3, 6, 9], [100, 50, 25, 12]),
    "composite-v2drop-fastv-llava15-128": ([1, 6, 8], [71, 17, 1]),  # V²Drop's L2 variation and FastV's rows, ranked
    # raters' rows of layer l-1, recycled tokens added (the trace's "merged"), renumbered positions
    "sparsevlm-llava15-128": ([1, 3, 6], [256, 110, 36]),
    "sparsevlm-llava15-64": ([1, 3, 6], [66, 30, 17]),
    "sparsevlm-llava15-64:preserve": ([1, 3, 6], [66, 30, 17]),  # original positions (recycled: their sources')
}
# SparseVLM's presets: their negative control chooses the raters from the first stage layer's input (``_late_raters``)
SPARSEVLM = [name for name in ATTENTION if name.startswith("sparsevlm")]
# the negative control: each preset's schedule scored by the other scorer, i.e. the rows of the wrong layer
# (FastV reads layer l-1's rows, PDrop layer l's)
WRONG_LAYER = {"fastv-llava15-128": "pdrop", "pdrop-llava15-128": "fastv"}


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


def _preset(name: str, scorer: str | None = None):
    """Preset ``name`` at the proxy's depth (``name:policy``: with that position policy), its scorer replaced by
    ``scorer`` when given."""
    name, _, policy = name.partition(":")
    data = v2drop.Method.from_preset(name, depth=12).to_dict()
    data = {**data, "position_policy": policy} if policy else data
    return v2drop.Method.from_dict(data if scorer is None else {**data, "scorer": {"name": scorer}})


def _late_raters(lvlm, name, prompts, images) -> list:
    """Per prompt (one at a time: no padding), the engine's trace of preset ``name`` (SparseVLM) with its raters chosen
    by ``select_raters`` from the input of the first stage's layer (that layer's input in the undropped model, read by
    a forward pre-hook) instead of the layer-0 embeddings: what the in-LLM loop would do with the stage's hidden
    states. The raters differ from the embeddings' on every prompt."""
    from v2drop.scorers.base import scorer_params
    from v2drop.scorers.sparsevlm import SparseVLMScorer

    method = _preset(name)
    first = method.schedule.stages[0].layer
    traces = []
    for prompt, image in zip(prompts, images):
        captured, chosen = [], {}
        handle = lvlm.adapter.layers[first].register_forward_pre_hook(
            lambda module, args, kwargs, captured=captured: captured.append(args[0].clone()) and None, with_kwargs=True
        )
        lvlm.generate([prompt], [image], method=None, max_new_tokens=1)
        handle.remove()
        scorer = SparseVLMScorer(**scorer_params(method.scorer))

        def late_queries(embeds, vision, mask, scorer=scorer, late=captured[0], chosen=chosen):
            chosen["embeds"] = SparseVLMScorer.attention_queries(scorer, embeds, vision, mask)
            chosen["late"] = SparseVLMScorer.attention_queries(scorer, late, vision, mask)
            return chosen["late"]

        scorer.attention_queries = late_queries
        late = v2drop.Method(scorer, schedule=method.schedule, position_policy=method.position_policy)
        traces.append(lvlm.generate([prompt], [image], method=late, max_new_tokens=1).traces[0])
        assert not torch.equal(chosen["embeds"][0], chosen["late"][0])
    return traces


@pytest.fixture(scope="module")
def attention_engine(samples):
    """Preset -> (engine output with EOS, output of MAX_TOKENS forced tokens[, forced output with the wrong layer's
    rows for FastV and PDrop; traces with raters from a later layer for SparseVLM]); before any vLLM engine, as
    ``engine``."""
    lvlm = v2drop.load("proxy")
    prompts = [lvlm.format_prompt(s.question) for s in samples]
    images = [list(s.images) for s in samples]
    out = {}
    for name in ATTENTION:
        runs = [(_preset(name), True), (_preset(name), False)]
        if name in WRONG_LAYER:
            runs.append((_preset(name, WRONG_LAYER[name]), False))
        out[name] = tuple(
            lvlm.generate(prompts, images, method=method, max_new_tokens=MAX_TOKENS, stop_at_eos=eos)
            for method, eos in runs
        )
        if name in SPARSEVLM:
            out[name] = (*out[name], _late_raters(lvlm, name, prompts, images))
    return out


def _vllm_rows(model, hidden, layer_idx, query):
    """Head-averaged attention rows of ``query`` over ``hidden`` (1, L, D) at vLLM's decoder layer ``layer_idx``,
    positions 0 .. L-1, through the in-LLM plugin's stage adapter."""
    adapter = vllm_attention.StageAdapter(model.language_model.model.layers, model.language_model.model.norm)
    positions = torch.arange(hidden.shape[1])[None]
    rope = adapter.layer_rope(adapter.rope(hidden, positions), layer_idx)
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    return attention_rows(adapter.layers[layer_idx], hidden, rope, mask, query)


def _serve(llm, prompts, samples) -> tuple:
    """(answers, forced token ids, per-request traces, step counts of the forced run) of ``llm`` on the prompts:
    greedy answers, then MAX_TOKENS - (i % 4) forced tokens each (prefills and decode steps mix)."""
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
    return (
        [o.outputs[0].text.strip() for o in answers],
        [list(o.outputs[0].token_ids) for o in tokens],
        traces,
        llm.apply_model(lambda model: dict(model.v2drop_steps))[0],
    )


@pytest.fixture(scope="module")
def attention_served(attention_engine, engine, samples):
    """Preset -> (answers, forced token ids, per-request traces, step counts, {layer: attention rows of a random
    input}) from vLLM with the in-LLM architecture, 4 requests at a time, decoding MAX_TOKENS - (i % 4) forced
    tokens each (prefills and decode steps mix)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    prompts = engine[0]
    hidden = torch.randn(1, 40, 128, generator=torch.Generator().manual_seed(0))
    query = torch.tensor([[39, 20]])
    out = {}
    for name in ATTENTION:
        llm = offline_llm(str(LOCAL_MODELS["proxy"]), _preset(name), max_num_seqs=4, kv_cache_gib=0.25)
        rows = {
            layer: llm.apply_model(lambda model, layer=layer: _vllm_rows(model, hidden, layer, query))[0]
            for layer in (2, 3)
        }
        out[name] = (*_serve(llm, prompts, samples), (hidden, query, rows))
        del llm
    return out


@pytest.fixture(scope="module")
def served(engine, attention_engine, samples):
    """Policy -> (answers, forced token ids, per-request traces, step counts) from vLLM with the in-LLM architecture,
    in-process. The forced requests decode MAX_TOKENS - (i % 4) tokens each, so in batches some finish while others
    decode and new prompts prefill in the same steps as decode tokens."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    prompts = engine[0]
    out = {}
    for policy, max_num_seqs in RUNS:
        llm = offline_llm(str(LOCAL_MODELS["proxy"]), _method(policy), max_num_seqs=max_num_seqs, kv_cache_gib=0.25)
        out[policy] = _serve(llm, prompts, samples)
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


@pytest.mark.parametrize("name", list(ATTENTION))
def test_vllm_keeps_the_engines_tokens_by_attention(name, attention_engine, attention_served):
    """FastV (layer 0's row of the last prompt token, before layer 1), PDrop (layer l's row, before layers 1/3/6/9,
    renumbered positions), a composite of V²Drop and FastV (before layers 1/6/8) and SparseVLM (its raters' rows of
    layer l-1, before layers 1/3/6, renumbered positions): each request's kept prompt positions at every stage are
    the engine's, and so are SparseVLM's recycled tokens (the prompt positions whose places they take)."""
    layers, counts = ATTENTION[name]
    expected = attention_engine[name][0].traces
    traces = attention_served[name][2]
    assert len(traces) == N_SAMPLES
    for trace, want in zip(traces, expected):
        assert [s["layer"] for s in trace["stages"]] == layers
        assert trace["stages"] == want.stages  # kept and, where a stage added tokens, "merged"
        assert [len(s["kept"]) for s in trace["stages"]] == counts
        if name in SPARSEVLM:  # every request gets recycled tokens at a stage that drops
            assert all(s.get("merged") for s in trace["stages"] if len(s["kept"]) < 256)


@pytest.mark.parametrize("name", list(ATTENTION))
def test_vllm_answers_and_decodes_by_attention_as_the_engine(name, attention_engine, attention_served):
    """Greedy answers and up to MAX_TOKENS forced tokens equal the engine's, in steps mixing prefills and decodes."""
    answers, forced = attention_engine[name][:2]
    texts, tokens, _, steps, _ = attention_served[name]
    assert texts == answers.texts
    assert [len(t) for t in tokens] == [MAX_TOKENS - i % 4 for i in range(N_SAMPLES)]
    assert tokens == [ids[: len(t)] for ids, t in zip(forced.generated_ids, tokens)]
    assert steps["prefill"] > 0 and steps["decode"] > 0 and steps["mixed"] > 0


@pytest.mark.parametrize("name", list(WRONG_LAYER))
def test_the_wrong_layers_rows_keep_other_tokens(name, attention_engine, attention_served):
    """Negative control: the engine scoring the same schedule with the other layer's rows (FastV's l-1 vs PDrop's l)
    keeps a different set at the first stage than vLLM's run on most samples, so equal kept sets pin the layer."""
    traces = attention_served[name][2]
    wrong = attention_engine[name][2].traces
    differ = sum(t["stages"][0]["kept"] != w.stages[0]["kept"] for t, w in zip(traces, wrong))
    assert differ >= N_SAMPLES // 2


@pytest.mark.parametrize("name", SPARSEVLM)
def test_raters_from_a_later_layer_keep_other_tokens(name, attention_engine, attention_served):
    """Negative control: the engine choosing SparseVLM's raters from the first stage layer's input (as the loop would
    from its current hidden states) instead of the layer-0 embeddings keeps or recycles other tokens than vLLM's run
    on at least some samples (on all 8 of these), so equal traces pin the embeddings as the raters' source."""
    traces = attention_served[name][2]
    late = attention_engine[name][2]
    assert sum(t["stages"] != w.stages for t, w in zip(traces, late)) >= N_SAMPLES // 2


def test_vllm_layers_give_the_engines_attention_rows(attention_served):
    """The stage adapter's rows over vLLM's layers (fused qkv, RoPE cache) equal ``attention_rows`` over transformers'
    layers of the same checkpoint on one random input, per layer; the neighbouring layer's rows are far off."""
    hidden, query, rows = attention_served["fastv-llava15-128"][4]
    adapter = v2drop.load("proxy").adapter
    positions = torch.arange(hidden.shape[1])[None]
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    for layer, got in rows.items():
        with torch.no_grad():
            rope = adapter.layer_rope(adapter.rope(hidden, positions), layer)
            want = attention_rows(adapter.layers[layer], hidden, rope, mask, query)
        assert got.shape == (1, 2, 40)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert float(got[0, 1, 21:].abs().max()) == 0.0  # causal: query 20 sees keys 0..20 only
    assert float((rows[2] - rows[3]).abs().max()) > 1e-2


def test_layers_whose_attention_cannot_be_recomputed_are_refused():
    """check_layers names the layer and why: heads split by tensor parallelism, per-head q/k norms, RoPE on part
    of each head or on interleaved pairs, a RoPE without a plain cos/sin cache, a multimodal RoPE other than vLLM's
    ``MRotaryEmbedding`` (layers described by their attributes, as vLLM's LlamaAttention has them; vLLM's own M-RoPE
    classes: tests/test_vllm_qwen_inllm.py)."""
    from types import SimpleNamespace

    def layer(**changes):
        rotary = SimpleNamespace(cos_sin_cache=torch.zeros(8, 32), is_neox_style=True, rotary_dim=32)
        attn = dict(num_heads=4, total_num_heads=4, head_dim=32, qkv_proj=object(), rotary_emb=rotary)
        for key, value in changes.items():
            if key in ("is_neox_style", "rotary_dim", "cos_sin_cache", "mrope_section"):
                setattr(rotary, key, value)
            else:
                attn[key] = value
        return SimpleNamespace(self_attn=SimpleNamespace(**attn), input_layernorm=object())

    vllm_attention.check_layers([layer(), layer()])
    for changes, reason in (
        ({"num_heads": 2}, "split by tensor parallelism"),
        ({"q_norm": object()}, "normalises queries and keys per head"),
        ({"rotary_dim": 16}, "part of each head"),
        ({"is_neox_style": False}, "interleaved pairs"),
        ({"cos_sin_cache": None}, "no plain cos/sin cache"),
        ({"mrope_section": [4, 6, 6]}, r"multimodal RoPE \(SimpleNamespace\) is not vLLM's MRotaryEmbedding"),
    ):
        with pytest.raises(ValueError, match=f"decoder layer 1: .*{reason}"):
            vllm_attention.check_layers([layer(), layer(**changes)])


def test_slots_follow_the_block_table():
    """A position's slot is its block's id times the block size plus its offset in the block (hand-worked)."""
    row = torch.tensor([7, 2, 5])
    got = vllm_inllm.slots(row, torch.tensor([0, 3, 4, 9, 11]), block_size=4)
    assert got.tolist() == [28, 31, 8, 21, 23]


def test_the_in_llm_route_is_chosen_or_refused_with_the_reason():
    """V²Drop's, FastV's, PDrop's and SparseVLM's decoder stages (and composites of the first three) get the in-LLM
    architecture; pre-LLM methods keep theirs; DART (cached keys), a composite with SparseVLM, SparseVLM
    on the Qwen models and schedules mixing a pre-LLM stage with decoder stages are refused, naming why."""
    from v2drop.integrations.vllm_qwen import check_qwen_method

    for method in (_method("preserve").to_dict(), *(_preset(n).to_dict() for n in ATTENTION), "sparsevlm-llava15-192"):
        assert engine_args(method)["hf_overrides"]["architectures"] == [vllm_inllm.ARCHITECTURE]
    assert engine_args("divprune-llava15-64")["hf_overrides"]["architectures"] == [ARCHITECTURE]
    with pytest.raises(ValueError, match="reads tower features, cached keys, grid coordinates, per-prompt seeds"):
        engine_args("dart-llava15-64")
    composite = v2drop.Method.from_dict(
        {
            "scorer": {"name": "composite", "parts": [{"name": "v2drop"}, {"name": "sparsevlm"}]},
            "schedule": {"stages": [[2, 0.5]]},
            "position_policy": "renumber",
        }
    )
    with pytest.raises(ValueError, match="A composite with sparsevlm is not served in-LLM"):
        engine_args(composite.to_dict())
    with pytest.raises(ValueError, match="runs in-LLM in vLLM on LLaVA-1.5 only"):
        check_qwen_method(_preset("sparsevlm-llava15-64"))
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


# preset -> position policy (None: its own); SparseVLM's raters and recycled rows in a recomputed prefill too
PREEMPTED = {"fastv-llava15-128": None, "v2drop-llava15-128": "renumber", "sparsevlm-llava15-128": None}


@pytest.mark.parametrize("name", list(PREEMPTED))
def test_preempted_requests_are_recomputed_as_the_engine(name):
    """A KV cache of two prompts' blocks and one more, eight requests of 24 forced tokens: vLLM preempts a decoding
    request and later prefills its prompt and generated tokens again. That prefill keeps the engine's tokens (FastV's
    query is the prompt's last token, not the last generated one) and every request decodes the engine's tokens."""
    from reference_helpers import check_recomputed_as_the_engine, preempting_run

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    method = _preset(name)
    if PREEMPTED[name]:
        method = v2drop.Method.from_dict({**method.to_dict(), "position_policy": PREEMPTED[name]})
    samples = get_benchmark("digits").load("test", N_SAMPLES)
    lvlm = v2drop.load("proxy")
    prompts = [lvlm.format_prompt(s.question) for s in samples]
    images = [list(s.images) for s in samples]
    expected = lvlm.generate(prompts, images, method=method, max_new_tokens=24, stop_at_eos=False)
    served = preempting_run(
        str(LOCAL_MODELS["proxy"]),
        engine_args(method.to_dict()),
        image_requests(prompts, samples, "preempt"),
        expected,
        lvlm.model.config.text_config,
        24,
    )
    check_recomputed_as_the_engine(served, expected, N_SAMPLES)
