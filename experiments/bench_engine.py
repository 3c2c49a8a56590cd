"""Engine overhead benchmark: our loop vs ``model.generate`` with no dropping, and V²Drop's scoring share.

    python -m experiments.bench_engine [--model proxy] [--repeats 7] [--threads 2]

Without ``--model`` a random-weight LLaVA (``v2drop.testing.random_llava``: Llama decoder, hidden
512, 12 layers, 576 vision tokens) is built from a config, so the figures are about the engine,
not about a checkpoint.
Runs are interleaved (A, B, A, B, ...) after warm-up and the medians compared: on a CPU,
absolute times are noise and only the ratios measured side by side mean anything.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import v2drop
from v2drop import Method, checks
from v2drop.cli import parse_config, run
from v2drop.cost import Timer
from v2drop.testing import random_llava  # noqa: F401  (also importable from here, as before)


def _timed(fn) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    with Timer() as timer:
        fn()
    return timer.seconds


@dataclass
class EngineBenchConfig:
    """``experiments.bench_engine``'s options."""

    model: str | None = None  # a model name for v2drop.load; None = a random LLaVA built here
    preset: str = "v2drop-llava15-128"  # V²Drop preset (rescaled to the model's depth)
    repeats: int = 7  # timed runs per variant, after one warm-up
    max_new_tokens: int = 8  # greedy tokens generated per run
    threads: int = 2  # torch CPU threads (fixed for every run)
    output: str | None = None  # write the figures as JSON here

    def __post_init__(self):
        checks.check_int("--repeats", self.repeats, 1)
        checks.check_int("--max-new-tokens", self.max_new_tokens, 1)
        checks.check_int("--threads", self.threads, 1)


CONFIG = EngineBenchConfig


def main(argv=None) -> dict:
    """Run the benchmark and print (and return) the ratios."""
    return run(_main, argv)


def _main(argv) -> dict:
    args = parse_config(EngineBenchConfig, argv, __doc__)
    checks.check_presets([args.preset], "--preset")
    if args.output:
        checks.check_writable(args.output)
    if args.model:
        checks.model_config(args.model)
    torch.set_num_threads(args.threads)

    lvlm = v2drop.load(args.model) if args.model else random_llava()
    lvlm.model.generation_config.eos_token_id = None
    size = getattr(lvlm.processor.image_processor, "crop_size", {"height": 96})["height"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    prompt = lvlm.format_prompt(" ".join(f"w{i}" for i in range(20)))
    inputs = lvlm.prepare([prompt], [image])
    method = Method.from_preset(args.preset, depth=lvlm.depth)
    n = args.max_new_tokens

    def hf():
        """``model.generate`` without dropping."""
        with torch.no_grad():
            lvlm.model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)

    def ours(m=Method.none()):  # noqa: B008 (a frozen dataclass: one shared default is safe)
        """Our engine with method ``m``."""
        return lvlm.generate_from_inputs(inputs, m, max_new_tokens=n, stop_at_eos=False)

    hf(), ours(), ours(method)  # warm-up
    t_hf, t_ours, prefill_none, prefill_drop, scoring, drop_stage = [], [], [], [], [], []
    for _ in range(args.repeats):
        t_hf.append(_timed(hf))
        t_ours.append(_timed(ours))
        prefill_none.append(ours().prefill_seconds)
        out = ours(method)
        prefill_drop.append(out.prefill_seconds)
        scoring.append(out.scoring_seconds)
        drop_stage.append(out.drop_seconds)
    med = statistics.median
    figures = {
        "model": lvlm.name,
        "depth": lvlm.depth,
        "vision_tokens": int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum()),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "threads": args.threads,
        "repeats": args.repeats,
        "preset": args.preset,
        "schedule_layers": list(method.schedule.layers),
        "engine_over_generate": med(t_ours) / med(t_hf),
        "scoring_share_of_prefill": med(scoring) / med(prefill_drop),
        "drop_stage_share_of_prefill": med(drop_stage) / med(prefill_drop),
        "prefill_speedup_with_dropping": med(prefill_none) / med(prefill_drop),
        "median_seconds": {
            "generate": med(t_hf),
            "engine": med(t_ours),
            "prefill_none": med(prefill_none),
            "prefill_v2drop": med(prefill_drop),
            "scoring_v2drop": med(scoring),
        },
    }
    print(
        f"model {figures['model']} ({figures['depth']} layers, {figures['vision_tokens']} vision tokens), "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"engine (no dropping) / model.generate, prefill + {n} tokens : {figures['engine_over_generate']:.3f}")
    print(
        f"V²Drop scoring / prefill ({args.preset})                 : {figures['scoring_share_of_prefill'] * 100:.3f}%"
    )
    print(
        "V²Drop whole drop stages (score, select, rebuild) / prefill : "
        f"{figures['drop_stage_share_of_prefill'] * 100:.3f}%"
    )
    print(f"prefill speedup with V²Drop                              : x{figures['prefill_speedup_with_dropping']:.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
