"""Served throughput: v2drop's methods inside vLLM (offline ``vllm.LLM``), against v2drop's own engine.

    python -m experiments.serve_bench --model proxy --benchmark digits --limit 64 \
        --methods none,divprune-llava15-64,visionzip-llava15-64,v2drop-llava15-128 --output out.json

Runs in the vLLM environment (``bash scripts/vllm_env.sh``, ``docs/serving.md``). For every method
(a preset, ``scorer:schedule`` as ``experiments.evaluate``'s ``--method scorer --schedule preset``,
or ``none``): v2drop's engine answers the samples first, through the run store
(``experiments.evaluate``'s run, reused when already filed), then vLLM with the plugin
(``v2drop.integrations.vllm``) answers the same prompts greedily: ``warmup`` requests untimed, then
all samples submitted at once. Reported per method: requests/s and output tokens/s over the timed
run, TTFT p50/p99 from vLLM's request metrics (arrival to first token, so queueing counts), the
benchmark's accuracy, the share of answers equal to the engine's, and the plugin's time in the
vision tower (and its [CLS]-attention recompute) and in the drop stage. Methods that drop inside
the decoder get ``supported: false`` and the reason. Prefix caching is off and every request's images
get their own uuid (no vision features shared between questions on one image); torch and vLLM run on
``threads`` threads (``OMP_NUM_THREADS``), stated in the output. Each method's samples run
``repeats`` times; its figures come from the run of median wall time (all wall times are in the JSON).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from v2drop.cli import parse_config, run


@dataclass
class ServeBenchConfig:
    """The command's options."""

    model: str = "proxy"  # bundled name, local directory or hub id (a LLaVA-1.5-architecture model)
    benchmark: str = "digits"  # a registered benchmark name
    split: str | None = None  # benchmark split; None = the benchmark's default split
    limit: int | None = 64  # the first N samples; None = all
    methods: str = "none,divprune-llava15-64,visionzip-llava15-64"  # comma-separated presets, scorer:schedule or none
    max_new_tokens: int = 8  # greedy tokens per answer (vLLM and the engine)
    warmup: int = 2  # requests run untimed before each method's timed runs
    repeats: int = 3  # timed runs of all samples per method; the figures are the run of median wall time
    threads: int = 2  # torch / OpenMP threads of vLLM and of the engine
    max_num_seqs: int = 16  # vLLM's largest batch of running requests
    dtype: str = "float32"  # model dtype in vLLM (the engine runs its evaluate default, float32)
    kv_cache_gib: float = 1.0  # vLLM's CPU KV-cache space in GiB
    store: str | None = None  # run store for the engine's runs; None = $V2DROP_STORE, else runs/store
    output: str | None = None  # write the JSON result here
    table: str | None = None  # write the markdown table here


CONFIG = ServeBenchConfig


def main(argv=None) -> dict:
    """Parse arguments, run every method in vLLM and in the engine, print the table, write the files."""
    return run(_main, argv)


def _main(argv) -> dict:
    args = parse_config(ServeBenchConfig, argv, __doc__)
    started, load = time.perf_counter(), os.getloadavg()[0]
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        raise ValueError(
            f"--repeats and --threads must be >= 1 and --warmup >= 0, got {args.repeats}, {args.threads}, {args.warmup}"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "experiments.serve_bench needs vLLM, which lives in its own environment: build it with "
            "`bash scripts/vllm_env.sh` and run the command with that environment's python (docs/serving.md)"
        )
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # vLLM then keeps torch at this many threads
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its timers readable
    import torch
    from transformers import AutoConfig

    from v2drop.benchmarks import get_benchmark
    from v2drop.bundled import LOCAL_MODELS
    from v2drop.integrations import vllm as plugin
    from v2drop.lvlm import InputBuilder, load_processor

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--methods must name at least one method (comma-separated), got {args.methods!r}")
    path = str(LOCAL_MODELS.get(args.model, args.model))
    depth = AutoConfig.from_pretrained(path).text_config.num_hidden_layers
    methods = {name: _method(name).rescaled(depth) for name in names}
    reasons = {}
    for name, method in methods.items():
        try:
            plugin.check_method(method)
        except ValueError as err:
            reasons[name] = str(err)
    benchmark = get_benchmark(args.benchmark)
    samples = benchmark.load(args.split, args.limit)
    inputs = InputBuilder(load_processor(path))
    prompts = [inputs.format_prompt(s.question, n_images=len(s.images)) for s in samples]
    torch.set_num_threads(args.threads)
    # the engine first: vLLM's CPU worker pins torch's thread count for the rest of the process
    engine = {name: _engine_answers(args, method) for name, method in methods.items()}
    results = {}
    for name, method in methods.items():
        if name in reasons:
            results[name] = {"supported": False, "reason": reasons[name]}
            continue
        results[name] = _serve(args, path, method, benchmark, samples, prompts, engine[name])
        print(f"{name}: {results[name]['requests_per_s']:.2f} req/s", flush=True)
    out = {
        "command": "python -m experiments.serve_bench " + " ".join(argv),
        "config": asdict(args),
        "environment": {**_environment(args), "load_average_at_start": load},
        "wall_seconds": time.perf_counter() - started,
        "methods": results,
    }
    table = format_table(out)
    print(table)
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    if args.table:
        Path(args.table).write_text(table + "\n")
    return out


def _method(name: str):
    """The Method of a ``--methods`` entry: a preset, ``scorer:schedule`` or ``none``."""
    from v2drop.method import resolve_method

    scorer, _, schedule = name.partition(":")
    return resolve_method(scorer, schedule or None)


def _engine_answers(args: ServeBenchConfig, method) -> dict:
    """Sample id -> v2drop's engine answer for ``method`` on the same samples, from the run store (run if missing)."""
    from v2drop.evaluation import EvalConfig
    from v2drop.evaluation.records import read_records
    from v2drop.evaluation.run import run_evaluation

    config = EvalConfig(
        model=args.model,
        benchmark=args.benchmark,
        split=args.split,
        limit=args.limit,
        method=method.to_dict(),
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        progress=False,
        store=args.store,
    )
    result = run_evaluation(config)
    return {r["id"]: r["prediction"] for r in read_records(result.records_path)}


def _serve(args: ServeBenchConfig, path: str, method, benchmark, samples, prompts, engine: dict) -> dict:
    """One method in vLLM: warm-up, the timed run, and its figures."""
    import numpy as np
    import vllm

    from v2drop.integrations.vllm import engine_args

    llm = vllm.LLM(
        model=path,
        dtype=args.dtype,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        disable_log_stats=False,  # request metrics (TTFT)
        seed=0,
        **engine_args(method.to_dict() if method.drops else "none"),
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)

    def requests(run: str) -> list[dict]:
        """The samples as vLLM requests; one uuid per run, request and image: vLLM would otherwise encode a shared
        image once for all its questions (and for every later run), which the engine (one sample at a time) does
        not."""
        return [
            {
                "prompt": p,
                "multi_modal_data": {"image": list(s.images) if len(s.images) > 1 else s.images[0]},
                "multi_modal_uuids": {"image": [f"{run}/{s.id}/{i}" for i in range(len(s.images))]},
            }
            for p, s in zip(prompts, samples)
        ]

    if args.warmup:
        llm.generate(requests("warmup")[: args.warmup], params, use_tqdm=False)
    runs = []
    for repeat in range(args.repeats):
        batch = requests(f"run{repeat}")
        llm.apply_model(_reset_timers)
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        runs.append((time.perf_counter() - start, outputs, llm.apply_model(_read_timers)[0]))
    runs.sort(key=lambda r: r[0])
    elapsed, outputs, timers = runs[len(runs) // 2]
    answers = [o.outputs[0].text.strip() for o in outputs]
    ttft = np.array([o.metrics.first_token_latency for o in outputs])
    correct = [bool(benchmark.is_correct(a, s)) for a, s in zip(answers, samples)]
    agree = [a == engine[s.id] for a, s in zip(answers, samples)]
    images = max(1, timers["images"])
    result = {
        "supported": True,
        "requests": len(samples),
        "wall_s_per_run": [r[0] for r in runs],
        "requests_per_s": len(samples) / elapsed,
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "accuracy": sum(correct) / len(correct),
        "agreement_with_engine": sum(agree) / len(agree),
        "prompt_tokens_mean": sum(len(o.prompt_token_ids) for o in outputs) / len(outputs),
        "tower_ms_per_image": 1e3 * timers["tower"] / images,
        "prune_ms_per_image": 1e3 * timers["prune"] / images,
        "torch_threads": timers["threads"],
    }
    del llm
    return result


def _reset_timers(model) -> None:
    """Zero the plugin's timers (run inside vLLM's worker)."""
    model.v2drop_seconds = {"tower": 0.0, "prune": 0.0, "images": 0}


def _read_timers(model) -> dict:
    """The plugin's timers and the worker's torch threads (run inside vLLM's worker)."""
    import torch

    return {**model.v2drop_seconds, "threads": torch.get_num_threads()}


def _environment(args: ServeBenchConfig) -> dict:
    """Versions, CPU and threads of the run."""
    import vllm

    from v2drop.cost import environment

    return {**environment(), "vllm": vllm.__version__, "omp_num_threads": args.threads}


def format_table(out: dict) -> str:
    """The markdown table of a serve_bench result, headed by its command and machine: one row per method."""
    from v2drop.tables import markdown_table

    env = out["environment"]
    header = [
        f"`{out['command']}`",
        "",
        f"Machine: {env['processor']}, {env['cpu_count']} cores, {env['omp_num_threads']} threads "
        f"(vLLM's worker: {next((r['torch_threads'] for r in out['methods'].values() if r['supported']), '-')}), "
        f"torch {env['torch']}, transformers {env['transformers']}, vLLM {env['vllm']}; load average "
        f"{env['load_average_at_start']:.1f} at the start; wall time {out['wall_seconds']:.0f} s.",
        "",
    ]

    rows, notes = [], []
    for name, r in out["methods"].items():
        if not r["supported"]:
            rows.append({"method": name, "requests/s": "not supported in vLLM (below)"})
            notes.append(f"- {name}: {r['reason']}")
            continue
        rows.append(
            {
                "method": name,
                "requests/s": r["requests_per_s"],
                "output tok/s": r["output_tokens_per_s"],
                "TTFT p50 (s)": r["ttft_p50_s"],
                "TTFT p99 (s)": r["ttft_p99_s"],
                "accuracy": r["accuracy"],
                "agreement with engine": r["agreement_with_engine"],
                "prompt tokens": r["prompt_tokens_mean"],
                "tower ms/image": r["tower_ms_per_image"],
                "prune ms/image": r["prune_ms_per_image"],
            }
        )
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = markdown_table([{c: row.get(c, "") for c in columns} for row in rows], columns)
    return "\n".join([*header, table, *(["", *notes] if notes else [])])


if __name__ == "__main__":
    main()
