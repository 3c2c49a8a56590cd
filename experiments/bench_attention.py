"""Cost of attention-based scoring on a long prompt: rows alone vs the faithful full attention map.

    python -m experiments.bench_attention [--model random] [--frames 8] [--budget 128] [--repeats 5] [--threads 2]

One long input (``--frames`` images; 8 × 256 = 2,048 vision tokens with the default random-weight
LLaVA of hidden 512 and 8 layers), every method fitted to the same average budget. Peak memory of
the LLM part and prefill time of: no dropping, V²Drop, FastV computing its one row beside sdpa,
FastV faithful (reading its row from layer K−1's full attention map), and the same pair for SparseVLM
and PDrop's row. All variants run interleaved in one process after warm-up; medians and the
ratios to no dropping are printed (on a CPU, the ratios are the figures).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import v2drop
from experiments.bench import TimingOptions, check_bench_args, prompt_inputs, time_methods
from v2drop.budgets import budget_method, with_scorer_args
from v2drop.cli import parse_config, run
from v2drop.config import config_to_dict
from v2drop.cost import environment
from v2drop.method import Method
from v2drop.tables import write_table


@dataclass
class AttentionBenchConfig(TimingOptions):
    """``experiments.bench_attention``'s options."""

    model: str = "random"  # 'random' (random-weight LLaVA, hidden 512, 8 layers) or a v2drop.load name
    max_new_tokens: int = 2
    output: str = "runs/bench_attention"


CONFIG = AttentionBenchConfig


def main(argv=None) -> dict:
    """Measure, print the table with ratios, write ``bench_attention.{json,md}``."""
    return run(_main, argv)


def _main(argv) -> dict:
    args = parse_config(AttentionBenchConfig, argv, __doc__)
    check_bench_args(args)
    torch.set_num_threads(args.threads)
    if args.model == "random":
        from v2drop.testing import random_llava

        lvlm = random_llava(hidden=512, layers=8, image_size=64, patch=4)
    else:
        lvlm = v2drop.load(args.model)
    inputs = prompt_inputs(lvlm, args.frames)
    n_vision = int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())
    if n_vision < 2000:
        print(f"note: only {n_vision} vision tokens; the issue asks for >= 2,000 (raise --frames)")
    fit = lambda prefix: budget_method(prefix, args.budget, lvlm.depth, n_vision)  # noqa: E731
    methods = {
        "none": Method.none(),
        "v2drop": fit("v2drop"),
        "fastv rows": fit("fastv"),
        "fastv faithful": with_scorer_args(fit("fastv"), faithful=True),
        "sparsevlm rows": fit("sparsevlm"),
        "sparsevlm faithful": with_scorer_args(fit("sparsevlm"), faithful=True),
        "pdrop rows": fit("pdrop"),
    }
    print(
        f"{lvlm.name}: {n_vision} vision tokens, {inputs['input_ids'].shape[1]} prompt tokens, "
        f"{len(methods)} methods x {args.repeats} interleaved rounds"
    )
    timings = time_methods(lvlm, inputs, methods, args.repeats, args.max_new_tokens)
    memory = time_methods(
        lvlm, inputs, methods, max(1, args.repeats // 2), args.max_new_tokens, memory=True
    )  # the CPU sampler slows what it wraps: its own rounds
    for label, t in timings.items():
        t["peak_memory_mb"] = memory[label]["peak_memory_mb"]
    base = timings["none"]
    rows = [
        {
            "method": label,
            "avg_vision_tokens": t["avg_vision_tokens"],
            "prefill_ms": t["prefill_s"] * 1e3,
            "prefill_vs_none": t["prefill_s"] / base["prefill_s"],
            "peak_memory_mb": t["peak_memory_mb"],
            "memory_vs_none": t["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] else float("nan"),
            "scoring_share": t["scoring_s"] / t["prefill_s"],
        }
        for label, t in timings.items()
    ]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(lvlm)
    md = [
        f"{env['model']} ({env['dtype']}, {env['attn_implementation']}), {n_vision} vision tokens, budget "
        f"{args.budget}/576, "
        f"torch {env['torch']} ({env['torch_threads']} threads), medians of {args.repeats} rounds.",
        "",
        write_table(rows, out / "bench_attention"),
    ]
    (out / "bench_attention.md").write_text("\n".join(md))
    (out / "bench_attention.json").write_text(
        json.dumps({"environment": env, "args": config_to_dict(args), "rows": rows}, indent=2, default=str)
    )
    print("\n".join(md))
    return {"rows": rows}


if __name__ == "__main__":
    main()
