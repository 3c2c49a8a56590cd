"""References the engine is checked against, shared by the family tests: transformers' own models run with hooks
(dropped tokens masked as keys, attention rows read from the eager forward) and a mask-based V2Drop on the adapter's
layers. Each runs the slow, obvious way, so a test compares the engine's kept sets, logits and tokens with it."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from v2drop import Method, Schedule, select_keep
from v2drop.scorers.fastv import FastVScorer
from v2drop.scorers.pdrop import PDropScorer


@torch.no_grad()
def transformers_generate(lvlm, inputs, max_new_tokens: int):
    """transformers' greedy ``generate``: (first-step logits, new tokens); its logits, not a bare forward's: it
    gives left-padded samples positions from the attention mask (a forward without ``position_ids`` shifts them by
    the padding, which RoPE undoes only up to float error)."""
    out = lvlm.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.logits[0].float(), out.sequences[:, inputs["input_ids"].shape[1] :].tolist()


@torch.no_grad()
def masked_transformers_generate(lvlm_eager, inputs, schedule: Schedule, max_new_tokens: int):
    """V²Drop on transformers' own eager model: a pre-hook on every decoder layer sees the input transformers gives
    it (DeepStack additions of the layer before included); at a stage layer it keeps the top-k of the L2 variation
    from the previous layer's input among the vision tokens still alive, and from then on the dropped tokens are
    masked as keys in that layer's own mask (as transformers builds it: Gemma 3's image blocks both ways and local
    windows included), in prefill and at every decoding step, where a sliding-window layer's mask covers only the
    last keys its cache holds. Returns (first logits, tokens, kept)."""
    a = lvlm_eager.adapter
    pad = inputs["attention_mask"].bool()
    B, L = pad.shape
    vision = a.vision_mask(inputs["input_ids"]) & pad
    n_orig = vision.sum(1).tolist()
    offsets = (~pad).sum(1).tolist()
    stage_at = {s.layer: i for i, s in enumerate(schedule.stages)}
    alive, alive_at, prev, kept, calls = pad.clone(), {}, {}, [[] for _ in range(B)], {}

    def hook(layer_idx):
        def pre(module, args, kwargs):
            nonlocal alive
            hidden = args[0] if args else kwargs["hidden_states"]
            calls[layer_idx] = calls.get(layer_idx, 0) + 1
            if calls[layer_idx] == 1:  # the prefill
                assert hidden.shape[1] == L
                if layer_idx in stage_at:
                    var = (hidden.float() - prev["hidden"].float()).norm(dim=-1)
                    alive = alive.clone()
                    for b in range(B):
                        cand = (vision[b] & alive[b]).nonzero().flatten()
                        k = schedule.kept_count(stage_at[layer_idx], cand.numel(), n_orig[b])
                        keep = cand[select_keep(var[b, cand], k)]
                        alive[b, cand] = False
                        alive[b, keep] = True
                        kept[b].append((keep - offsets[b]).tolist())
                alive_at[layer_idx] = alive
                prev["hidden"] = hidden
            mask = kwargs["attention_mask"]
            total = L + calls[layer_idx] - 1  # keys so far: the prompt, then one per decoding step
            every = torch.cat([alive_at[layer_idx], torch.ones(B, total - L, dtype=torch.bool)], dim=1)
            keys = every[:, -mask.shape[-1] :]  # a local layer's cache holds only the last keys
            kwargs["attention_mask"] = mask.masked_fill(~keys[:, None, None, :], torch.finfo(mask.dtype).min)
            return args, kwargs

        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(a.layers)]
    try:
        out = lvlm_eager.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    finally:
        for h in handles:
            h.remove()
    return out.logits[0].float(), out.sequences[:, L:].tolist(), kept


def check_attention_scorer_keeps_eager_top(lvlm, eager, inputs, kind: str, drop_layer: int, keep: int):
    """Kept sets of FastV / PDrop at ``drop_layer`` against the top-k of transformers' eager attention (head mean)
    from the last prompt token of layer ``drop_layer - 1`` (FastV) or ``drop_layer`` (PDrop)."""
    seen = []
    source = eager.adapter.layers[drop_layer - 1 if kind == "fastv" else drop_layer]
    handle = source.self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1]))
    try:
        with torch.no_grad():
            eager.model(**inputs)
    finally:
        handle.remove()
    reference = seen[0].float().mean(1)[:, -1]
    scorer = FastVScorer() if kind == "fastv" else PDropScorer()
    schedule = Schedule.one_shot(drop_layer, keep, keep_mode="absolute")
    out = lvlm.generate_from_inputs(inputs, Method(scorer, schedule=schedule), max_new_tokens=2)
    vision = lvlm.adapter.vision_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    offsets = (inputs["attention_mask"] == 0).sum(1)
    for b in range(len(vision)):
        positions = vision[b].nonzero().flatten()
        expected = positions[select_keep(reference[b, positions], keep)] - offsets[b]
        assert out.traces[b].stages[0]["kept"] == expected.tolist()


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean (B, Q, K) -> additive (B, 1, Q, K) mask."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def reference_generate(lvlm, inputs, schedule: Schedule, max_new_tokens: int, metric: str = "l2"):
    """V²Drop written the slow, obvious way: the full sequence runs through every layer, and from a
    drop layer on the dropped tokens are removed from every query's keys (prefill and decode)."""
    a = lvlm.adapter
    ids, pad = inputs["input_ids"], inputs["attention_mask"].bool()
    B, L = ids.shape
    h = a.embed(inputs)
    pos = a.position_ids(inputs)
    rope = a.rope(h, pos)
    vision = a.vision_mask(ids) & pad
    n_orig = vision.sum(1).tolist()
    alive = pad.clone()
    stage_at = {s.layer: i for i, s in enumerate(schedule.stages)}
    cache = DynamicCache(config=a.text_config)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    kept, alive_at, prev = [[] for _ in range(B)], [], None
    for layer_idx, layer in enumerate(a.layers):
        if layer_idx in stage_at:
            diff = h.float() - prev.float()
            if metric == "l2":
                var = diff.norm(dim=-1)
            elif metric == "l1":
                var = diff.abs().sum(-1)
            else:
                var = 1 - torch.nn.functional.cosine_similarity(h.float(), prev.float(), dim=-1)
            for b in range(B):
                cand = (vision[b] & alive[b]).nonzero().flatten()
                k = schedule.kept_count(stage_at[layer_idx], cand.numel(), n_orig[b])
                keep = cand[select_keep(var[b, cand], k)]
                alive[b, cand] = False
                alive[b, keep] = True
                offset = int((~pad[b]).sum())
                kept[b].append((keep - offset).tolist())
        alive_at.append(alive.clone())
        mask = _additive(causal[None] & alive[:, None, :], h.dtype)
        prev = h
        h = layer(h, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=True)
    first_logits = a.lm_head(a.norm(h[:, -1])).float()
    return first_logits, greedy_decode(a, first_logits, cache, alive_at, pos, pad, max_new_tokens), kept


@torch.no_grad()
def greedy_decode(a, logits, cache, alive_at, pos, pad, max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens (B, max_new_tokens) after a prefill run layer by layer by hand: ``logits`` (B, V) of the last
    prompt token, ``cache`` the layers' KV cache, ``alive_at`` each layer's (B, L) live prompt keys, ``pos`` the
    prompt's position ids and ``pad`` (B, L) its padding; each step runs the adapter's layers on one new token."""
    B = logits.shape[0]
    p = pos if pos.dim() == 3 else pos[None]
    next_pos = p.masked_fill(~pad[None].expand_as(p), -1).amax(dim=(0, 2)) + 1
    tokens = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        tokens.append(token)
        if step == max_new_tokens - 1:
            break
        h = a.inner.get_input_embeddings()(token[:, None])
        rope = a.rope(h, a.decode_position_ids(next_pos + step))
        new = torch.ones(B, step + 1, dtype=torch.bool)
        for layer_idx, layer in enumerate(a.layers):
            mask = _additive(torch.cat([alive_at[layer_idx], new], 1)[:, None, :], h.dtype)
            h = layer(h, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=True)
        logits = a.lm_head(a.norm(h[:, -1])).float()
    return torch.stack(tokens, 1).tolist()


def video_embeddings(lvlm, inputs):
    """A Qwen video prompt's input embeddings with the video features in place (1, L, D), its vision mask (L,), the
    vision tokens' prompt positions and their (t, h, w) coordinates, as the merge references start from."""
    vision = lvlm.adapter.vision_mask(inputs["input_ids"])[0]
    positions_v = vision.nonzero().flatten()
    with torch.no_grad():
        model = lvlm.model.model
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        video = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        video = torch.cat(list(video)) if isinstance(video, (list, tuple)) else video
        embeds[0, vision] = video.to(embeds.dtype)
    coords = lvlm.adapter.vision_coords(inputs, lvlm.adapter.vision_mask(inputs["input_ids"]))[0, positions_v]
    return embeds, vision, positions_v, coords


def language_model_logits(lvlm, inputs, embeds, keep, values) -> torch.Tensor:
    """The first-token logits of the language model on the prompt's tokens ``keep`` (L,) with input embeddings
    ``values`` (L, D) and the prompt's own position ids of those tokens (``preserve``)."""
    ids = lvlm.adapter.position_ids(inputs)
    with torch.no_grad():
        hidden = lvlm.model.model.language_model(
            inputs_embeds=values[None, keep].to(embeds.dtype), position_ids=ids[:, :, keep], use_cache=False
        ).last_hidden_state
        return lvlm.model.lm_head(hidden[:, -1]).float()


def served_sweep(tmp_path, study: str, model: str, presets: list[str], scorers: list[str], pre_llm: list[str]):
    """A 4-trial accuracy / served_throughput sweep of ``model`` (the presets enqueued, then ``scorers`` searched,
    those of ``pre_llm`` before the LLM and renumbered) on 4 digits samples: (its result, trials by label)."""
    import optuna

    from v2drop.search import SweepConfig, make_storage, run_sweep

    cfg = SweepConfig.from_dict(
        {
            "study": study,
            "model": model,
            "trials": 4,
            "objectives": ["accuracy", "served_throughput"],
            "enqueue_presets": presets,
            "search": {
                "scorers": {name: {} for name in scorers},
                "scorer_kinds": {name: ["pre-llm"] for name in pre_llm},
                "position_policy": {name: "renumber" for name in pre_llm},
            },
            "eval": {"limit": 4, "batch_size": 4, "max_new_tokens": 3, "warmup": 1},
            "served": {"max_num_seqs": 8, "kv_cache_gib": 0.5, "max_model_len": 2048},  # reach vLLM's own arguments
            "confirm": {"limit": 4},
            "run_dir": str(tmp_path / "run"),
            "store": str(tmp_path / "store"),
            "wandb": {"mode": "disabled"},
        }
    )
    result = run_sweep(cfg, progress=False)
    trials = optuna.load_study(study_name=study, storage=make_storage(cfg)).trials
    return result, {t.user_attrs.get("label"): t for t in trials}


def check_served_front(result, by_label: dict, pruned: str, reason: str, served: list[str]) -> None:
    """Assert a ``served_sweep``: trial ``pruned`` was pruned with ``reason`` in its ``pruned_reason``, the ``served``
    trials completed with their served requests/s as the second objective, and the front carries it."""
    import optuna

    trial = by_label[pruned]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert reason in trial.user_attrs["pruned_reason"]
    for label in served:
        trial = by_label[label]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.values[1] == trial.user_attrs["metrics"]["served_requests_per_s"] > 0
    assert result["front"] and all(r["served_throughput"] > 0 for r in result["front"])


def preempting_run(model: str, engine_args: dict, requests: list, expected, text_config, tokens: int) -> tuple:
    """``requests`` served by vLLM's in-LLM architecture (``engine_args``) with ``tokens`` forced tokens each and a KV
    cache of two of the longest prompts (``expected``: the engine's output on them) plus one block, so decoding runs
    out of blocks and vLLM preempts requests and recomputes them: (token ids, per-prefill traces, preemptions)."""
    import vllm

    from v2drop.integrations import vllm_inllm

    block = 32  # the CPU attention backend's block sizes are multiples of 32
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    block_bytes = text_config.num_hidden_layers * 2 * kv_heads * head_dim * 4 * block  # float32 keys and values
    longest = max(len(ids) for ids in expected.prompt_ids)
    llm = vllm.LLM(
        model=model,
        dtype="float32",
        max_num_seqs=len(requests),
        block_size=block,
        kv_cache_memory_bytes=(2 * -(-longest // block) + 1) * block_bytes,
        max_model_len=longest + tokens,
        disable_log_stats=False,  # the preemption counter
        seed=0,
        **vllm_inllm.ENGINE_KWARGS,
        **engine_args,
    )
    llm.apply_model(lambda model: model.v2drop_traces.clear())  # vLLM's profiling run
    params = vllm.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outputs = llm.generate(requests, params, use_tqdm=False)
    traces = llm.apply_model(lambda model: list(model.v2drop_traces))[0]
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    del llm
    return [list(o.outputs[0].token_ids) for o in outputs], traces, preemptions


def check_recomputed_as_the_engine(served: tuple, expected, n_requests: int) -> None:
    """Assert a ``preempting_run`` preempted, and that every prefill (recomputed ones too) kept the engine's tokens of
    a prompt of its length and every request decoded the engine's tokens."""
    tokens, traces, preemptions = served
    recomputed = [t for t in traces if t["generated"] > 0]
    assert preemptions > 0 and len(recomputed) == preemptions and len(traces) == n_requests + preemptions
    engine_kept = [[s["kept"] for s in e.stages] for e in expected.traces]
    first = [[s["kept"] for s in t["stages"]] for t in traces if t["generated"] == 0]
    assert sorted(map(str, first)) == sorted(map(str, engine_kept))
    for trace in recomputed:  # the engine's kept tokens for a prompt of that length
        kept = [s["kept"] for s in trace["stages"]]
        assert any(kept == k and trace["prompt_length"] == len(ids) for k, ids in zip(engine_kept, expected.prompt_ids))
    assert tokens == expected.generated_ids
