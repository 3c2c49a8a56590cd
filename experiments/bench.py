"""Side-by-side efficiency benchmark of every method: latency, speedup vs the FLOPs limit, scoring, memory, throughput.

    python -m experiments.bench [--model proxy] [--repeats 5] [--threads 2] [--budget 128] [--output runs/bench]

All figures come from one run: every variant is timed in interleaved rounds after warm-up and
medians are compared, with one fixed thread count. On a CPU absolute times are noise; the ratios
are the figures. Inputs: one image (the image proxy) and a long multi-frame input (≥ 2,000
vision tokens). Methods are fitted to the same average budget (``--budget`` of 576).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import v2drop
from v2drop import checks
from v2drop.budgets import budget_method, scorer_variants, with_scorer_args
from v2drop.cli import parse_config, run
from v2drop.config import config_to_dict
from v2drop.cost import environment, sample_prefill_flops
from v2drop.method import Method
from v2drop.tables import write_table


def prompt_inputs(lvlm, n_images: int, batch: int = 1) -> dict:
    """A prompt with ``n_images`` images (digits scenes when the benchmark is there, else noise)."""
    try:
        from v2drop.benchmarks import get_benchmark

        name = "digits-video" if n_images > 1 else "digits"
        sample = get_benchmark(name).load("test", 1)[0]
        images = list(sample.images)[:n_images]
        question = sample.question
    except Exception:  # noqa: BLE001 - the benchmark is optional here
        size = getattr(lvlm.processor.image_processor, "crop_size", {"height": 64})["height"]
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n_images)]
        question = "how many digits are there?"
    while len(images) < n_images:
        images = images + images[: n_images - len(images)]
    prompt = lvlm.format_prompt(question, n_images=n_images)
    return lvlm.prepare([prompt] * batch, [images] * batch)


@dataclass
class TimingOptions:
    """What every timing benchmark sets: the model, the budget, the long input, the rounds."""

    model: str = "proxy"  # model for v2drop.load, or 'random' for a random-weight LLaVA
    budget: int = 128  # paper budget (of 576) every method is fitted to
    repeats: int = 5  # timed rounds (interleaved over the methods, after warm-up)
    max_new_tokens: int = 4  # greedy tokens generated per run
    frames: int = 8  # images in the long input
    threads: int = 2  # torch CPU threads (fixed for every run)
    output: str = "runs/bench"  # directory for the JSON and markdown figures

    def __post_init__(self):
        for f in fields(self):
            if f.type in (int, "int"):
                checks.check_int("--" + f.name.replace("_", "-"), getattr(self, f.name), 1)


@dataclass
class BenchConfig(TimingOptions):
    """``experiments.bench``'s options."""

    batch: int = 8  # batch size of the throughput test


CONFIG = BenchConfig


def check_bench_args(args: TimingOptions) -> None:
    """Before any model loads: ``output`` writable and ``model`` (unless ``random``) a loadable config."""
    checks.check_writable(args.output, directory=True)
    if args.model != "random":
        checks.model_config(args.model)


def _flops(lvlm, out, method) -> float:
    """Analytic prefill FLOPs of the first sample of ``out``."""
    return sample_prefill_flops(lvlm.adapter.text_config, out.traces[0], len(out.prompt_ids[0]), method.scorer)


def time_methods(lvlm, inputs, methods: dict, repeats: int, new_tokens: int, memory: bool = False) -> dict:
    """Median prefill/generation/scoring seconds (and peak memory) per method, interleaved rounds."""
    runs = {k: [] for k in methods}
    for method in methods.values():  # warm-up
        lvlm.generate_from_inputs(inputs, method, new_tokens, stop_at_eos=False)
    for _ in range(repeats):
        for label, method in methods.items():
            runs[label].append(
                lvlm.generate_from_inputs(inputs, method, new_tokens, stop_at_eos=False, measure_memory=memory)
            )
    out = {}
    for label, outs in runs.items():
        med = lambda key, outs=outs: statistics.median(getattr(o, key) for o in outs)  # noqa: E731
        out[label] = {
            "prefill_s": med("prefill_seconds"),
            "generation_s": med("generate_seconds"),
            "scoring_s": med("scoring_seconds"),
            "drop_stage_s": med("drop_seconds"),
            "flops": _flops(lvlm, outs[0], methods[label]),
            "avg_vision_tokens": outs[0].traces[0].average_vision_tokens,
            "vision_tokens": outs[0].traces[0].vision_tokens_per_layer[0],
        }
        if memory:
            out[label]["peak_memory_mb"] = statistics.median(o.peak_memory_bytes for o in outs) / 2**20
    return out


def latency_rows(kind: str, timings: dict) -> list[dict]:
    """Rows with speedups over no dropping and their share of the FLOPs-ideal speedup."""
    base = timings["none"]
    rows = []
    for label, t in timings.items():
        ideal = base["flops"] / t["flops"]
        speed = base["prefill_s"] / t["prefill_s"]
        rows.append(
            {
                "input": kind,
                "method": label,
                "vision_tokens": t["vision_tokens"],
                "avg_vision_tokens": t["avg_vision_tokens"],
                "prefill_ms": t["prefill_s"] * 1e3,
                "generation_ms": t["generation_s"] * 1e3,
                "prefill_speedup": speed,
                "generation_speedup": base["generation_s"] / t["generation_s"],
                "ideal_speedup_flops": ideal,
                "speedup_over_ideal": speed / ideal,
                "scoring_share": t["scoring_s"] / t["prefill_s"],
                "drop_stage_share": t["drop_stage_s"] / t["prefill_s"],
            }
        )
    return rows


def main(argv=None) -> dict:
    """Run every measurement and write ``bench.json`` and ``bench.md``."""
    return run(_main, argv)


def _main(argv) -> dict:
    args = parse_config(BenchConfig, argv, __doc__)
    check_bench_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "random":
        from v2drop.testing import random_llava

        lvlm = random_llava()
    else:
        lvlm = v2drop.load(args.model)
    report = {"environment": environment(lvlm), "args": config_to_dict(args)}

    rows = []
    for kind, n_images in (("image", 1), (f"{args.frames} frames", args.frames)):
        inputs = prompt_inputs(lvlm, n_images)
        n_vision = int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())
        methods = {"none": Method.none()}
        for label, (prefix, overrides) in scorer_variants().items():
            method = budget_method(prefix, args.budget, lvlm.depth, n_vision, **overrides)
            if method is not None:
                methods[label] = method
        print(f"[{kind}] {n_vision} vision tokens, {len(methods)} methods, {args.repeats} rounds")
        rows += latency_rows(kind, time_methods(lvlm, inputs, methods, args.repeats, args.max_new_tokens))
    report["latency"] = rows
    md = [
        "## Latency at the same budget (medians; speedups over no dropping)",
        "",
        write_table(rows, out / "bench_latency"),
    ]

    # Peak memory on the long input: V²Drop vs FastV faithful (full attention map) vs FastV rows vs none.
    long_inputs = prompt_inputs(lvlm, args.frames)
    n_vision = int(lvlm.adapter.vision_mask(long_inputs["input_ids"]).sum())
    memory_methods = {"none": Method.none(), "v2drop": budget_method("v2drop", args.budget, lvlm.depth, n_vision)}
    fastv = budget_method("fastv", args.budget, lvlm.depth, n_vision)
    if fastv is not None:
        memory_methods["fastv-rows"] = fastv
        memory_methods["fastv-faithful"] = with_scorer_args(fastv, faithful=True)
    mem = time_methods(lvlm, long_inputs, memory_methods, max(1, args.repeats // 2), args.max_new_tokens, memory=True)
    mem_rows = [
        {
            "method": k,
            "peak_memory_mb": v["peak_memory_mb"],
            "vs_none": v["peak_memory_mb"] / mem["none"]["peak_memory_mb"],
            "prefill_ms": v["prefill_s"] * 1e3,
        }
        for k, v in mem.items()
    ]
    report["memory"] = mem_rows
    md += [
        "",
        f"## Peak memory of the LLM part, {n_vision} vision tokens",
        "",
        write_table(mem_rows, out / "bench_memory"),
    ]

    # Throughput: batch 1 vs batch N, with and without dropping.
    tp_rows = []
    for batch in (1, args.batch):
        inputs = prompt_inputs(lvlm, 1, batch)
        n_vision = int(lvlm.adapter.vision_mask(inputs["input_ids"][:1]).sum())
        ms = {"none": Method.none(), "v2drop": budget_method("v2drop", args.budget, lvlm.depth, n_vision)}
        t = time_methods(lvlm, inputs, ms, max(1, args.repeats // 2), args.max_new_tokens)
        for label, v in t.items():
            tp_rows.append({"batch": batch, "method": label, "samples_per_s": batch / v["generation_s"]})
    report["throughput"] = tp_rows
    md += ["", "## Throughput (generation, samples per second)", "", write_table(tp_rows, out / "bench_throughput")]
    env = report["environment"]
    md.insert(
        0,
        f"Machine: {env['processor']}, {env['cpu_count']} cores, torch {env['torch']} ({env['torch_threads']} "
        "threads), "
        f"{env['model']} ({env['dtype']}, {env['attn_implementation']}), budget {args.budget}/576.\n",
    )
    (out / "bench.md").write_text("\n".join(md))
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
