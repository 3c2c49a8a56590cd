"""Time to first token of a widened random Qwen2-VL in vLLM, one request at a time: no dropping against V²Drop's
decoder stages (``v2drop-qwen2vl-778`` at the model's depth), each request's first token checked against the engine's.

Run in the vLLM environment from the repository root (docs/serving.md, "In-LLM dropping on Qwen2-VL and Qwen2.5-VL")::

    PYTHONPATH=$PWD /path/to/vllm-venv/bin/python scripts/qwen_inllm_ttft.py --dir /tmp/wide-qwen2vl

The checkpoint (built at ``--dir`` if absent): ``testing.build_real("qwen2_vl", vllm=True)``'s tower and image
processing (patch 14, merge 2) under a decoder ``--width`` wide (heads of 64) and ``--depth`` layers deep, random
weights. Each request asks one question about one random ``--side`` × ``--side`` photo; two untimed requests first.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def build(path: str, width: int, depth: int) -> None:
    """Save the widened random Qwen2-VL at ``path`` (vLLM's tokenizer settings, ``testing.save_for_vllm``)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from v2drop import testing
    from v2drop.lvlm import LVLM

    base = testing.build_real("qwen2_vl", "eager", vllm=True)
    cfg = base.model.config.to_dict()
    text = {k: v for k, v in cfg["text_config"].items() if k not in ("layer_types", "max_window_layers")}
    text.update(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    )
    ids = {k: cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
    torch.manual_seed(0)
    config = Qwen2VLConfig(text_config=text, vision_config=dict(cfg["vision_config"], hidden_size=width), **ids)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    model.set_attn_implementation("eager")
    testing.save_for_vllm(LVLM(model, base.processor, name="wide-qwen2vl"), path)


def main(argv: list[str] | None = None) -> dict:
    """Measure and print (and return) per method: TTFT (vLLM's request metrics) and the ``generate`` call's wall time
    (p50 and each request's), agreement of the first token with the engine's, prompt tokens, tower and drop seconds
    per image."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (built when it holds no config.json)")
    parser.add_argument("--width", type=int, default=768, help="decoder width (heads of 64)")
    parser.add_argument("--depth", type=int, default=12, help="decoder layers")
    parser.add_argument("--side", type=int, default=672, help="image side in pixels (672: 576 vision tokens)")
    parser.add_argument("--requests", type=int, default=6, help="timed requests per method")
    parser.add_argument("--rounds", type=int, default=2, help="engine starts per method (alternating)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of vLLM's worker")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: its timers readable
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        build(args.dir, args.width, args.depth)
    import numpy as np

    import v2drop
    from v2drop import testing

    methods = {
        "none": v2drop.Method.none(),
        "v2drop": v2drop.Method.from_preset("v2drop-qwen2vl-778", depth=args.depth),
    }
    lvlm = v2drop.load(args.dir)
    prompt = testing.prompt_for(lvlm, "what is the digit ?")
    images = [testing.photo(100 + i, args.side, args.side) for i in range(args.requests + 2)]
    # the engine first (vLLM's CPU worker pins torch's threads for the rest of the process)
    engine = {
        name: [lvlm.generate([prompt], [[im]], method=m, max_new_tokens=1).generated_ids[0] for im in images]
        for name, m in methods.items()
    }
    del lvlm
    import vllm

    from v2drop.integrations import vllm_inllm
    from v2drop.integrations.vllm_qwen import qwen_engine_args

    out = {name: {"ttft_s": [], "wall_s": [], "agree": 0, "tower_s": 0.0, "prune_s": 0.0} for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            llm = vllm.LLM(
                model=args.dir,
                dtype="float32",
                max_num_seqs=1,
                kv_cache_memory_bytes=2**30,
                max_model_len=4096,
                seed=0,
                disable_log_stats=False,  # request metrics (TTFT)
                **vllm_inllm.ENGINE_KWARGS,  # the same settings with and without dropping
                **qwen_engine_args(method, "qwen2_vl"),
            )
            params = vllm.SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            for i, image in enumerate(images):
                request = {
                    "prompt": prompt,
                    "multi_modal_data": {"image": image},
                    "multi_modal_uuids": {"image": [str(i)]},
                }
                start = time.perf_counter()
                o = llm.generate([request], params, use_tqdm=False)[0]
                if i >= 2:  # two untimed requests
                    out[name]["wall_s"].append(time.perf_counter() - start)  # the call: processing included
                    out[name]["ttft_s"].append(o.metrics.first_token_latency)
                    out[name]["agree"] += list(o.outputs[0].token_ids) == engine[name][i]
            out[name]["prompt_tokens"] = len(o.prompt_token_ids)
            seconds = llm.apply_model(lambda model: dict(model.v2drop_seconds))[0]
            out[name]["tower_s"] += seconds["tower"] / seconds["images"] / args.rounds
            out[name]["prune_s"] += seconds["prune"] / seconds["images"] / args.rounds
            del llm
    result = {
        name: {
            "ttft_p50_s": float(np.median(r["ttft_s"])),
            "ttft_s": [round(t, 3) for t in r["ttft_s"]],
            "wall_p50_s": float(np.median(r["wall_s"])),
            "wall_s": [round(t, 3) for t in r["wall_s"]],
            "first_token_agreement_with_engine": r["agree"] / len(r["ttft_s"]),
            "prompt_tokens": r["prompt_tokens"],
            "tower_s_per_image": r["tower_s"],
            "prune_s_per_image": r["prune_s"],
        }
        for name, r in out.items()
    }
    result["load_average_at_start"] = load
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"wall time {time.perf_counter() - t0:.0f} s")
