"""The ``served_throughput`` objective: a trial's requests/s when its method is served by vLLM through the plugin.

The trial's method runs in an offline ``vllm.LLM`` (``v2drop.integrations.vllm.offline_throughput``:
the plugin, prefix caching off, ``eval.max_new_tokens`` greedy tokens, ``eval.warmup`` requests
untimed, then every trial sample submitted at once; vLLM's engine in its own process with
``OMP_NUM_THREADS=eval.threads``; batch size, KV-cache space and context length from ``served:``). Methods the
plugin cannot run (drops inside the decoder by other scorers than V²Drop, FastV, PDrop and SparseVLM, the pre-LLM
scorers of ``v2drop.integrations.vllm.REFUSED_SCORERS``, ``position_policy: preserve`` before the LLM;
``v2drop.integrations.vllm_inllm``) are pruned before any evaluation, the plugin's reason recorded as the trial's
``pruned_reason``. On a Qwen2-VL / Qwen2.5-VL checkpoint the plugin's Qwen models serve the trial (pre-LLM methods
and V²Drop's, FastV's and PDrop's decoder stages; SparseVLM's only on LLaVA-1.5) and their rules prune
(``v2drop.integrations.vllm_qwen.check_qwen_method``).
vLLM lives in its own environment (``docs/serving.md``); without it, choosing the objective is an error.
"""

from __future__ import annotations

import importlib.util
import os

SERVED = "served_throughput"  # the objective's name in OBJECTIVES


def check_served(objectives: list[str]) -> None:
    """Raise ValueError when ``served_throughput`` is chosen and vLLM cannot be imported."""
    if SERVED in objectives and importlib.util.find_spec("vllm") is None:
        raise ValueError(
            f"objective {SERVED!r} needs vLLM, which lives in its own environment: build it with "
            "`bash scripts/vllm_env.sh` and run the sweep with that environment's python (docs/serving.md)"
        )


def served_reason(method, model: str | None = None) -> str | None:
    """Why the vLLM plugin cannot run ``method`` on checkpoint ``model`` (a bundled name, directory or hub id; None:
    LLaVA-1.5) — its ``check_method`` message, its Qwen models' ``check_qwen_method`` one on a Qwen2-VL / Qwen2.5-VL
    checkpoint — or None when it can."""
    from v2drop.bundled import LOCAL_MODELS
    from v2drop.integrations.vllm import check_method
    from v2drop.integrations.vllm_qwen import check_qwen_method, family_of

    path = str(LOCAL_MODELS.get(model, model)) if model is not None else None
    check = check_qwen_method if path is not None and family_of(path) is not None else check_method
    try:
        check(method)
    except ValueError as err:
        return str(err)
    return None


def served_throughput(cfg, lvlm, method, samples: list) -> dict:
    """``method`` served by vLLM on ``samples`` (the trial's): requests/s, output tokens/s and the answers."""
    from v2drop.bundled import LOCAL_MODELS
    from v2drop.integrations.vllm import offline_throughput

    if cfg.eval.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(cfg.eval.threads)  # vLLM's worker keeps torch at this count
    prompts = [lvlm.format_prompt(s.question, n_images=len(s.images)) for s in samples]
    return offline_throughput(
        str(LOCAL_MODELS.get(cfg.model, cfg.model)),
        method,
        prompts,
        samples,
        max_new_tokens=cfg.eval.max_new_tokens,
        warmup=cfg.eval.warmup,
        dtype=cfg.eval.dtype,
        max_num_seqs=cfg.served.max_num_seqs,
        kv_cache_gib=cfg.served.kv_cache_gib,
        max_model_len=cfg.served.max_model_len,
    )
