"""Sweep trial time with and without the per-sample vision cache (``v2drop.vision_cache``), side by side.

    python -m experiments.bench_sweep [--models proxy random-llava15] [--limit 16] [--batch-size 4]
                                      [--methods none v2drop-llava15-128 visionzip-llava15-64] [--repeats 2]
                                      [--threads 1]

A trial is what a sweep's objective runs: ``evaluate`` on the trial sample under one method (with
the sweep's default trial settings: warm-up, CPU memory pass). Each method's trial runs without
the cache and with a warm cache (filled by one trial first, timed as "cold"), interleaved; the
medians are compared. Times are the process's CPU seconds (all threads): on a shared machine the
wall clock mostly measures the other processes; the wall-clock medians are reported next to them.
``random-llava15`` is a random-weight LLaVA-1.5-shaped model: 336px images
and patch 14 (576 vision tokens), a CLIP ViT-L/14 tower of the real depth (24 layers) and the
real projector/decoder proportions, every width divided by ``--width-divisor`` and only
``--decoder-layers`` decoder layers (the real model has 32), so it runs in minutes on a CPU.
On a CPU, absolute times are noise; only the ratios measured side by side mean anything.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from v2drop import Method, checks
from v2drop.cli import parse_config, run


def random_llava15(width_divisor: int = 4, decoder_layers: int = 4):
    """LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336 tower, 4096-wide Llama decoder) with every width divided by
    ``width_divisor``.
    """
    from transformers import CLIPVisionConfig

    from v2drop.testing import random_llava

    d = width_divisor
    tower = CLIPVisionConfig(
        hidden_size=1024 // d,
        intermediate_size=4096 // d,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768 // d,
    )
    lvlm = random_llava(hidden=4096 // d, layers=decoder_layers, image_size=336, patch=14, vision=tower)
    lvlm.name = f"random-llava15-w1/{d}-l{decoder_layers}"
    return lvlm


@dataclass
class SweepBenchConfig:
    """``experiments.bench_sweep``'s options."""

    models: list[str] = field(
        default_factory=lambda: ["proxy", "random-llava15"]
    )  # v2drop.load names, or random-llava15
    benchmark: str = "digits"  # registered benchmark
    split: str = "validation"  # benchmark split the trial samples come from
    limit: int = 16  # trial samples
    batch_size: int = 4  # samples per generate call
    max_new_tokens: int = 3  # greedy tokens generated per answer
    methods: list[str] = field(
        default_factory=lambda: ["none", "v2drop-llava15-128", "visionzip-llava15-64"]
    )  # presets (or none), one trial each
    repeats: int = 2  # timed trials per method and variant
    threads: int = 1  # torch CPU threads (1: on a shared machine, idle threads spinning would count as CPU time)
    width_divisor: int = 4  # random-llava15: every width of LLaVA-1.5-7B divided by this
    decoder_layers: int = 4  # random-llava15: decoder layers
    output: str | None = None  # write the figures as JSON here

    def __post_init__(self):
        for name in ("limit", "batch_size", "max_new_tokens", "repeats", "threads", "width_divisor", "decoder_layers"):
            checks.check_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)


CONFIG = SweepBenchConfig


def main(argv=None) -> dict:
    """Run the benchmark, print the trial times side by side (and return them)."""
    return run(_main, argv)


def _main(argv) -> dict:
    from v2drop.benchmarks import get_benchmark

    args = parse_config(SweepBenchConfig, argv, __doc__)
    checks.check_presets([m for m in args.methods if m != "none"], "--methods")
    for name in args.models:
        if name != "random-llava15":
            checks.model_config(name)
    if args.output:
        checks.check_writable(args.output)
    bench = get_benchmark(args.benchmark)
    samples = bench.load(bench.resolve_split(args.split), args.limit)
    torch.set_num_threads(args.threads)
    figures = {
        "benchmark": args.benchmark,
        "samples": len(samples),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "models": [],
    }
    for name in args.models:
        figures["models"].append(_bench_model(name, args, bench, samples))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


def _bench_model(name: str, args, bench, samples) -> dict:
    """Interleaved trials of every method without and with a warm cache on one model."""
    import v2drop
    from v2drop.evaluation import EvalConfig, evaluate
    from v2drop.search import SweepConfig
    from v2drop.search.data import eval_fields
    from v2drop.vision_cache import VisionCache

    lvlm = random_llava15(args.width_divisor, args.decoder_layers) if name == "random-llava15" else v2drop.load(name)
    settings = {
        **eval_fields(SweepConfig()),
        "limit": len(samples),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
    }
    config = EvalConfig(model=name, benchmark=args.benchmark, progress=False, **settings)
    methods = {m: Method.resolve(m, depth=lvlm.depth) for m in args.methods}
    cache = VisionCache()

    def trial(method, with_cache: bool) -> tuple[float, float]:
        """(CPU seconds, wall seconds) of one trial."""
        cpu, wall = time.process_time(), time.perf_counter()
        with cache.attached(lvlm) if with_cache else contextlib.nullcontext():
            evaluate(lvlm, bench, method, config, samples=samples)
        return time.process_time() - cpu, time.perf_counter() - wall

    trial(
        methods[args.methods[0]], False
    )  # warm-up: first-call costs (allocator, Lightning imports) out of the figures
    cold = trial(methods[args.methods[0]], True)[0]  # the sweep's first trial: fills the cache
    times = {m: {"plain": [], "cached": []} for m in methods}
    walls = {"plain": [], "cached": []}
    for _ in range(args.repeats):
        for m, method in methods.items():
            for variant in ("plain", "cached"):
                cpu, wall = trial(method, variant == "cached")
                times[m][variant].append(cpu)
                walls[variant].append(wall)
    med = statistics.median
    n_vision = int(
        lvlm.adapter.vision_mask(lvlm.prepare([lvlm.format_prompt("w1")], [samples[0].images[0]])["input_ids"]).sum()
    )
    rows = [
        {
            "method": m,
            "plain_s": med(t["plain"]),
            "cached_s": med(t["cached"]),
            "speedup": med(t["plain"]) / med(t["cached"]),
        }
        for m, t in times.items()
    ]
    all_plain = [x for t in times.values() for x in t["plain"]]
    all_cached = [x for t in times.values() for x in t["cached"]]
    out = {
        "model": lvlm.name,
        "depth": lvlm.depth,
        "vision_tokens": n_vision,
        "cold_cached_trial_s": cold,
        "rows": rows,
        "speedup": med(all_plain) / med(all_cached),
        "cache_entries": len(cache),
        "cache_mb": cache.bytes / 2**20,
        "wall_s": {k: med(v) for k, v in walls.items()},
    }
    print(
        f"\n{lvlm.name}: {lvlm.depth} decoder layers, {n_vision} vision tokens per image; {len(samples)} samples of "
        f"{args.benchmark}, batch {args.batch_size}; median of {args.repeats}; cache {len(cache)} entries, "
        f"{out['cache_mb']:.1f} MiB"
    )
    print(f"{'trial CPU seconds':<24} {'no cache (s)':>13} {'cache (s)':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['method']:<24} {r['plain_s']:>13.2f} {r['cached_s']:>10.2f} {r['speedup']:>8.2f}x")
    print(
        f"{'all trials':<24} {med(all_plain):>13.2f} {med(all_cached):>10.2f} {out['speedup']:>8.2f}x   "
        f"(first, cache-filling trial: {cold:.2f} s)"
    )
    print(f"{'wall clock, all trials':<24} {out['wall_s']['plain']:>13.2f} {out['wall_s']['cached']:>10.2f}")
    return out


if __name__ == "__main__":
    main()
