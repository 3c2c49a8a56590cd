"""The vLLM plugin on the bundled proxy: no dropping and pre-LLM methods answer as v2drop's engine does, keep the same
tokens, and in-LLM methods the plugin cannot score are refused with the reason (V²Drop's, FastV's and PDrop's decoder
stages: test_vllm_inllm.py).

Runs in the vLLM environment (``bash scripts/vllm_env.sh``, docs/serving.md); skipped where vLLM is not installed.
"""

import os

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed: it lives in its own environment (bash scripts/vllm_env.sh, docs/serving.md)"
)

import v2drop  # noqa: E402
from v2drop.benchmarks import get_benchmark  # noqa: E402
from v2drop.bundled import LOCAL_MODELS  # noqa: E402
from v2drop.integrations.vllm import ARCHITECTURE, check_method, engine_args, kept_per_image  # noqa: E402
from v2drop.method import resolve_method  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_SAMPLES = 8
# random at DivPrune's pre-LLM schedule: its per-prompt seed travels from vLLM's processor to the model; HoloV reads
# the recomputed [CLS] attention, VisPruner also the tower's features, HiPrune the received attention of two tower
# layers; VidCom2 and frame_pool treat the image as one frame (frame_pool adds pooled tokens in place of the image's);
# CDPruner reads its prompt's instruction, whose ids travel from vLLM's processor to the model
METHODS = [
    "none",
    "divprune-llava15-64",
    "visionzip-llava15-64",
    "random:divprune-llava15-64",
    "holov-llava15-64",
    "vispruner-llava15-64",
    "hiprune-llava15-64",
    "vidcom2-llava15-64",
    "frame_pool-llava15-64",
    "cdpruner-llava15-192",
    "cdpruner-llava15-128",
    "cdpruner-llava15-64",
]


def _method(name: str, depth: int | None = None):
    """A preset, ``scorer:schedule`` or ``none`` (as experiments.serve_bench reads them)."""
    scorer, _, schedule = name.partition(":")
    method = resolve_method(scorer, schedule or None)
    return method.rescaled(depth) if depth is not None else method


@pytest.fixture(scope="module")
def samples():
    return get_benchmark("digits").load("test", N_SAMPLES)


@pytest.fixture(scope="module")
def engine(samples):
    """Method -> v2drop's engine output on the samples (run before any vLLM engine: vLLM's CPU worker pins torch's
    threads for the rest of the process)."""
    lvlm = v2drop.load("proxy")
    prompts = [lvlm.format_prompt(s.question) for s in samples]
    out = {}
    for name in METHODS:
        method = _method(name, lvlm.depth)
        out[name] = lvlm.generate(prompts, [list(s.images) for s in samples], method=method, max_new_tokens=8)
    return prompts, out


def _served_llm(name: str):
    """An in-process ``vllm.LLM`` on the proxy running method ``name`` in the plugin, its profiling traces dropped."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its traces are readable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    llm = vllm.LLM(
        model=str(LOCAL_MODELS["proxy"]),
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=2**28,
        seed=0,
        **engine_args(_method(name).to_dict()),
    )
    llm.apply_model(lambda model: model.v2drop_traces.clear())  # drop the traces of vLLM's profiling run
    return llm


def _serve(llm, requests: list[dict]) -> tuple[list[str], list[list[int]], list[dict]]:
    """Greedy answers, prompt ids and the per-image traces of ``requests`` (8 new tokens)."""
    outputs = llm.generate(requests, vllm.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    traces = llm.apply_model(lambda model: list(model.v2drop_traces))[0]
    llm.apply_model(lambda model: model.v2drop_traces.clear())
    return [o.outputs[0].text.strip() for o in outputs], [list(o.prompt_token_ids) for o in outputs], traces


class _Served(dict):
    """Method -> (answers, prompt ids, per-image traces) from vLLM with the plugin, each served on first use (so a
    ``-k`` selection starts only the engines it needs)."""

    def __init__(self, requests):
        super().__init__()
        self.requests = requests

    def __missing__(self, name):
        llm = _served_llm(name)
        self[name] = _serve(llm, self.requests)
        del llm
        return self[name]


@pytest.fixture(scope="module")
def served(engine, samples):
    """Method -> (answers, prompt ids, per-image traces) from vLLM with the plugin, in-process."""
    prompts, _ = engine
    # digits asks several questions about one image; a uuid per request keeps vLLM from reusing an image's features
    return _Served(
        [
            {"prompt": p, "multi_modal_data": {"image": s.images[0]}, "multi_modal_uuids": {"image": [s.id]}}
            for p, s in zip(prompts, samples)
        ]
    )


@pytest.mark.parametrize("name", METHODS)
def test_vllm_answers_as_the_engine(name, engine, served):
    """Greedy answers equal the engine's; prompts are the engine's with the image cut to the method's kept count."""
    _, out = engine
    answers, prompt_ids, _ = served[name]
    assert answers == out[name].texts
    method = _method(name)
    image_id = v2drop.load("proxy").model.config.image_token_index
    for served_ids, engine_ids in zip(prompt_ids, out[name].prompt_ids):
        engine_ids = list(engine_ids)
        n = engine_ids.count(image_id)
        first = engine_ids.index(image_id)
        k = kept_per_image(method, n)
        assert served_ids == engine_ids[:first] + [image_id] * k + engine_ids[first + n :]


@pytest.mark.parametrize("name", METHODS[1:])
def test_vllm_keeps_the_engines_tokens(name, engine, served):
    """Each image's kept (and, for VisionZip, merged-into; for frame_pool, each pooled cell's first) token indices are
    the engine's for that sample."""
    _, out = engine
    image_id = v2drop.load("proxy").model.config.image_token_index

    def as_image_indices(stage, first):
        return tuple(p - first for p in stage["kept"]), tuple(p - first for p in stage.get("merged", []))

    expected = sorted(
        as_image_indices(trace.stages[0], list(ids).index(image_id))
        for trace, ids in zip(out[name].traces, out[name].prompt_ids)
    )
    got = sorted(as_image_indices(stage, 0) for stage in served[name][2])
    assert len(got) == N_SAMPLES
    assert got == expected
    assert all(len(kept) + len(merged) == kept_per_image(_method(name), 576) for kept, merged in got)


def _kept_sets(out, image_id: int) -> list[tuple]:
    """Each sample's kept image-token indices in an engine output."""
    return [
        tuple(p - list(ids).index(image_id) for p in trace.stages[0]["kept"])
        for trace, ids in zip(out.traces, out.prompt_ids)
    ]


def test_vllm_cdpruner_one_image_under_several_prompts(engine, samples):
    """CDPruner keeps an image's tokens by their relevance to the prompt's instruction: the digits samples ask five
    (then three) questions about one image, sent in one batch under one uuid per image, then without uuids (vLLM
    hashes the image's pixels). Each prompt gets the engine's kept set and answer (the instruction ids enter the
    image's cache key, so no prompt reuses another's features), and the eight kept sets differ.

    Negative control: the engine's kept sets of the same images under a prompt with no instruction (``USER:
    <image>``, every relevance one) are none of the served ones, so the instruction ids change the kept set."""
    name = "cdpruner-llava15-64"
    prompts, out = engine
    lvlm = v2drop.load("proxy")
    image_id = lvlm.model.config.image_token_index
    images = [s.id.rsplit("-", 1)[0] for s in samples]  # test-0-exist -> test-0: the sample's image
    assert len(set(images)) == 2
    expected = sorted(_kept_sets(out[name], image_id))
    assert len(set(expected)) == N_SAMPLES  # the engine keeps a different set for each question of an image
    bare = lvlm.generate(
        ["USER: <image>"] * N_SAMPLES,
        [list(s.images) for s in samples],
        method=_method(name, lvlm.depth),
        max_new_tokens=1,
    )
    assert not set(_kept_sets(bare, image_id)) & set(expected)
    llm = _served_llm(name)
    for uuids in (True, False):
        requests = [
            {"prompt": p, "multi_modal_data": {"image": s.images[0]}}
            | ({"multi_modal_uuids": {"image": [image]}} if uuids else {})
            for p, s, image in zip(prompts, samples, images)
        ]
        answers, _, traces = _serve(llm, requests)
        assert answers == out[name].texts
        got = sorted(tuple(stage["kept"]) for stage in traces)
        assert got == expected
    del llm


def test_instruction_ids_and_images_batched_with_instructions():
    """The instruction is the prompt after its last vision token (a system prompt and the text between images are not
    part of it); images batched with instructions of different lengths (left-padded) keep what each keeps alone, and
    each image's instruction, not its neighbour's, decides its kept set."""
    import torch

    from v2drop.integrations.vllm import instruction_ids, prune_images

    assert instruction_ids([1, 5, 9, 32000, 7, 32000, 8, 2], 32000) == [8, 2]  # after the second image
    assert instruction_ids([1, 9, 32000], 32000) == []
    assert instruction_ids([4, 151655, 6, 151656, 7, 8], (151655, 151656)) == [7, 8]  # an image pad, then a video pad
    method = _method("cdpruner-llava15-64").rescaled(2)
    gen = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 256, 16, generator=gen)
    texts = [torch.randn(m, 16, generator=gen) for m in (3, 0, 5)]
    kept, traces = prune_images(method, projected, None, None, instructions=texts)
    assert kept.shape == (3, 64, 16)
    for b in range(3):
        alone, trace = prune_images(method, projected[b : b + 1], None, None, instructions=texts[b : b + 1])
        assert torch.equal(kept[b], alone[0]) and traces[b] == trace[0]
        assert torch.equal(kept[b], projected[b, trace[0]["kept"]])
    swapped, _ = prune_images(method, projected[:1], None, None, instructions=texts[2:])
    assert not torch.equal(swapped[0], kept[0])


def test_in_llm_methods_are_refused_with_the_reason():
    """DART drops inside the decoder by layer l-1's cached keys: refused before any engine starts, naming why."""
    with pytest.raises(ValueError, match="drops tokens inside the decoder"):
        engine_args("dart-llava15-64")
    with pytest.raises(ValueError, match="not supported by the vLLM plugin: it keeps whole frames"):
        check_method(
            v2drop.Method.from_dict(
                {
                    "scorer": "frames",
                    "schedule": {"stages": [["pre_llm", 64]], "keep_mode": "absolute"},
                    "position_policy": "renumber",
                }
            )
        )
    # pre-LLM scorers whose kept count follows the image, not the budget: vLLM fixes the placeholder count first
    for preset in ("holitom-llava15-64", "fastvid-llava15-64"):
        with pytest.raises(ValueError, match="close to, not exactly, the budget"):
            engine_args(preset)
    assert engine_args("none")["hf_overrides"]["architectures"] == [ARCHITECTURE]


def test_received_attention_beyond_the_built_tower_is_refused():
    """vLLM builds LLaVA-1.5's tower up to its selection layer (23 of 24 for vision_feature_layer -2): received
    attention of layer 24 (-1) cannot be recomputed and is refused, naming the layer, before the tower runs."""
    from types import SimpleNamespace

    from v2drop.integrations.vllm import tower_state
    from v2drop.scorers import VisionRequest

    tower = SimpleNamespace(encoder=SimpleNamespace(layers=[None] * 23))  # only the built layers' count is read
    with pytest.raises(ValueError, match=r"tower layers \{-1: 24\}.*only up to its feature-selection layer \(23 of 24"):
        tower_state(tower, None, VisionRequest(received_layers=(0.375, None, -1)), 24, -2)


def test_serve_bench_server_sweeps_concurrency(tmp_path):
    """--server: vLLM's OpenAI server on 127.0.0.1 answers as the engine at each concurrency; attention-scored in-LLM
    methods refused."""
    from experiments import serve_bench

    out = serve_bench.main(
        [
            *("--server", "--limit", "4", "--max-concurrency", "2", "--warmup", "1", "--threads", "2"),
            *("--methods", "divprune-llava15-64,dart-llava15-64", "--store", str(tmp_path / "store")),
            *("--output", str(tmp_path / "out.json"), "--table", str(tmp_path / "table.md")),
        ]
    )
    served = out["methods"]["divprune-llava15-64"]
    assert served["server"] and list(served["concurrency"]) == ["1", "2"]
    for figures in served["concurrency"].values():
        assert figures["agreement_with_engine"] == 1.0
        assert figures["requests_per_s"] > 0 and figures["output_tokens_per_s"] > 0
        assert 0 < figures["ttft_p50_s"] <= figures["ttft_p99_s"] <= figures["wall_s"]
    assert out["methods"]["dart-llava15-64"]["supported"] is False
    assert "drops tokens inside the decoder" in out["methods"]["dart-llava15-64"]["reason"]
    table = (tmp_path / "table.md").read_text()
    assert "OMP_NUM_THREADS=2" in table and "| divprune-llava15-64 | 2 |" in table
    assert serve_bench.concurrency_levels(8) == [1, 2, 4, 8] and serve_bench.concurrency_levels(6) == [1, 2, 4, 6]


def test_serve_bench_on_a_local_benchmark_copy_within_max_model_len(tmp_path):
    """--data-dir serves a real benchmark's local copy (the POPE fixture) as the engine answers it; --max-model-len
    bounds vLLM's requests: DivPrune's 64-token prompts fit in 160 tokens, the unpruned 256-token ones are refused."""
    from pathlib import Path

    from vllm.exceptions import VLLMValidationError

    from experiments import serve_bench
    from v2drop.integrations.vllm import image_requests, offline_llm
    from v2drop.lvlm import InputBuilder, load_processor

    pope = str(Path(__file__).parent / "fixtures" / "realbench" / "pope")
    out = serve_bench.main(
        [
            *("--benchmark", "pope", "--data-dir", pope, "--limit", "4", "--methods", "divprune-llava15-64"),
            *("--max-model-len", "160", "--repeats", "1", "--warmup", "0", "--store", str(tmp_path / "store")),
        ]
    )
    served = out["methods"]["divprune-llava15-64"]
    assert served["requests"] == 4 and served["agreement_with_engine"] == 1.0
    assert 64 < served["prompt_tokens_mean"] < 160 and out["config"]["data_dir"] == pope
    samples = get_benchmark("pope", data_dir=pope).load(None, 1)
    prompt = InputBuilder(load_processor(str(LOCAL_MODELS["proxy"]))).format_prompt(samples[0].question, n_images=1)
    llm = offline_llm(str(LOCAL_MODELS["proxy"]), _method("none"), max_model_len=160)
    with pytest.raises(VLLMValidationError, match=r"\(length 2\d\d\) is longer than the maximum model length of 160"):
        llm.generate(image_requests([prompt], samples, "long"), vllm.SamplingParams(max_tokens=1), use_tqdm=False)


def test_sweep_served_throughput_objective(tmp_path):
    """A sweep with the served_throughput objective: served trials (pre-LLM, and V²Drop's decoder stages) get
    requests/s, in-LLM ones the plugin cannot score (uniform on V²Drop's stages) are pruned with the reason, and the
    front carries the objective."""
    from reference_helpers import check_served_front, served_sweep

    result, by_label = served_sweep(
        tmp_path,
        "served",
        "proxy",
        ["divprune-llava15-64", "uniform-llava15-128", "v2drop-llava15-128"],
        ["divprune", "uniform", "v2drop"],
        ["divprune"],
    )
    served = ["none", "divprune-llava15-64", "v2drop-llava15-128"]
    check_served_front(result, by_label, "uniform-llava15-128", "drops tokens inside the decoder", served)


@pytest.mark.parametrize(
    "frames, rows, cols, channels, q, seed",
    [(8, 4, 4, 32, 0.75, 0), (16, 6, 8, 64, 0.75, 1), (4, 12, 12, 48, 0.5, 2), (32, 7, 7, 16, 0.875, 3)],
)
def test_vidcom2_keeps_what_vllms_own_vidcom2_keeps(frames, rows, cols, channels, q, seed):
    """VidCom2 against the implementation vLLM ships (``vllm.multimodal.video_prune.vidcom2``, the VidCom2 authors'
    port, installed from PyPI, not vendored): on the same random video features (T frames of rows × cols merged tokens,
    frames with different contents), ``vidcom2_keep`` keeps exactly the tokens of vLLM's ``compute_retention_mask`` at
    the same count. Retentions ``1 − q`` whose count is a whole number of tokens, so both share one base ratio."""
    import torch
    from vllm.multimodal.video_prune.vidcom2 import compute_retained_tokens_count, compute_retention_mask

    from v2drop.scorers.vidcom2 import vidcom2_keep

    g = torch.Generator().manual_seed(seed)
    per_frame = rows * cols
    offsets = torch.randn(frames, 1, channels, generator=g) * torch.rand(frames, 1, 1, generator=g) * 3
    features = (torch.randn(frames, per_frame, channels, generator=g) + offsets).reshape(-1, channels)
    target = compute_retained_tokens_count(per_frame, frames, q)
    assert target == frames * per_frame * (1 - q)  # a whole count: v2drop's share target / n is vLLM's 1 − q
    theirs = compute_retention_mask(features, (frames, rows * 2, cols * 2), 2, q).nonzero().flatten()
    ours = vidcom2_keep(features, torch.arange(frames).repeat_interleave(per_frame), target)
    assert theirs.numel() == target
    assert ours.tolist() == theirs.tolist()
