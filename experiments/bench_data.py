"""Streaming evaluation at scale: peak memory, samples/s and the share of time the model waits for data.

    python -m experiments.bench_data [--rows 2500] [--width 1024] [--height 768] [--workers 0 2]
                                     [--data-dir DIR] [--method v2drop-llava15-128] [--max-new-tokens 2]

Builds a local TextVQA-schema copy (``v2drop.testing.textvqa_copy``: ``--rows`` random JPEGs of
``--width`` x ``--height``; in a temporary folder unless ``--data-dir`` names one, reused when it
already holds the copy) and evaluates it with ``run_evaluation`` and a random-weight
LLaVA-1.5-shaped model (``--model tiny``: ``v2drop.testing.build("llava")``, CLIP + Llama, 64
vision tokens, so decoding is what costs; ``random-llava``: 576 vision tokens), once per
``--workers`` value, each in a fresh process so peaks do not mix. Memory is sampled from /proc
every ``--interval`` seconds: the resident set (RSS) of the evaluating process plus its loader
workers, and their proportional set (PSS), which counts pages the forked workers share with the
main process once. ``--eager`` also runs the pre-streaming behaviour (every image decoded before
the first batch, in the main process) for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from v2drop import checks
from v2drop.cli import parse_config, run


def main(argv=None) -> list[dict]:
    """Build the copy, run each setting in its own process, print and return the figures."""
    return run(_main, argv)


@dataclass
class DataBenchConfig:
    """``experiments.bench_data``'s options."""

    rows: int = 2500  # questions (one image each) in the generated copy
    width: int = 1024  # image width in pixels
    height: int = 768  # image height in pixels
    data_dir: str | None = None  # build (or reuse) the copy here; None = a temporary folder
    workers: list[int] = field(default_factory=lambda: [0, 2])  # loader worker counts to compare
    eager: bool = False  # also run the old behaviour: decode every image up front
    method: str = "v2drop-llava15-128"  # method preset
    max_new_tokens: int = 2  # greedy tokens per answer
    batch_size: int = 1  # samples per generate call
    # tiny: v2drop.testing.build('llava') (64 vision tokens);
    # random-llava: random_llava (hidden 512, 12 layers, 576 vision tokens)
    model: str = "tiny"
    threads: int = 2  # torch CPU threads of the evaluating process
    interval: float = 0.25  # seconds between memory samples
    output: str | None = None  # write the figures as JSON here
    one: str | None = None  # internal: run only this setting (JSON) and print its figures

    def __post_init__(self):
        for key in ("rows", "width", "height", "max_new_tokens", "batch_size", "threads"):
            checks.check_int(f"--{key.replace('_', '-')}", getattr(self, key), 1)
        for w in self.workers:
            checks.check_int("--workers", w, 0)
        if not self.interval > 0:
            raise ValueError(f"--interval must be a positive number of seconds, got {self.interval}")
        if self.model not in ("tiny", "random-llava"):
            raise ValueError(f"--model must be tiny or random-llava, got {self.model!r}")


CONFIG = DataBenchConfig


def _main(argv) -> list[dict]:
    args = parse_config(DataBenchConfig, argv, __doc__)
    checks.check_presets([args.method], "--method")
    if args.one:
        return [_one(args, json.loads(args.one))]
    if args.output:
        checks.check_writable(args.output)
    from v2drop.testing import textvqa_copy

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        data = Path(args.data_dir) if args.data_dir else Path(tmp) / "textvqa"
        start = time.perf_counter()
        textvqa_copy(data, args.rows, args.width, args.height)
        print(
            f"copy: {args.rows} rows of {args.width}x{args.height} JPEGs in {data} ({time.perf_counter() - start:.0f} "
            "s)",
            flush=True,
        )
        settings = ([{"workers": 0, "eager": True}] if args.eager else []) + [
            {"workers": w, "eager": False} for w in args.workers
        ]
        figures = []
        for setting in settings:
            cmd = [
                sys.executable,
                "-m",
                "experiments.bench_data",
                *(argv or sys.argv[1:]),
                "--data-dir",
                str(data),
                "--one",
                json.dumps(setting),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"the run {setting} failed:\n{out.stderr[-3000:]}")
            figures.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(_line(figures[-1]), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))
    return figures


def _line(f: dict) -> str:
    """One setting's figures as a table row."""
    name = "eager (old)" if f["eager"] else f"workers={f['workers']}"
    return (
        f"{name:>12}: peak RSS {f['peak_rss_mb']:7.0f} MB (main {f['peak_main_rss_mb']:6.0f}), peak PSS "
        f"{f['peak_pss_mb']:7.0f} MB, "
        f"{f['samples_per_s']:6.2f} samples/s, data wait {100 * f['data_wait_share']:5.1f}%, {f['n']} samples in "
        f"{f['seconds']:.0f} s"
    )


def _one(args, setting: dict) -> dict:
    """Evaluate the copy once under ``setting`` while sampling memory; print the figures as the last line of JSON."""
    import torch

    from v2drop.evaluation import EvalConfig, run_evaluation
    from v2drop.testing import build, random_llava

    torch.set_num_threads(args.threads)
    sampler = MemorySampler(args.interval)
    sampler.start()
    lvlm = build("llava") if args.model == "tiny" else random_llava()
    config = EvalConfig(
        model=lvlm.name,
        benchmark="textvqa",
        data_dir=args.data_dir,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        threads=args.threads,
        workers=setting["workers"],
        progress=False,
        warmup=2,
        memory_batches=0,
    )
    with tempfile.TemporaryDirectory(prefix="bench_data_run_") as tmp:
        start = time.perf_counter()
        if setting["eager"]:
            result = _eager(config, tmp, lvlm)
        else:
            result = run_evaluation(replace(config, store=str(Path(tmp) / "store")), lvlm=lvlm)
        seconds = time.perf_counter() - start
    sampler.stop()
    n = result.metrics["n"]
    figures = {
        **setting,
        "n": n,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "data_wait_share": result.metrics["data_wait_share"],
        "peak_rss_mb": sampler.peak_rss / 2**20,
        "peak_main_rss_mb": sampler.peak_main / 2**20,
        "peak_pss_mb": sampler.peak_pss / 2**20,
        "rows": args.rows,
        "size": [args.width, args.height],
        "method": args.method,
        "model": lvlm.name,
        "threads": args.threads,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(figures))
    return figures


def _eager(config, tmp: str, lvlm):
    """The pre-streaming behaviour: every sample's image decoded and held before evaluation starts, in the main
    process."""
    from v2drop.benchmarks import Sample, get_benchmark
    from v2drop.benchmarks.media import MEDIA_CACHE
    from v2drop.evaluation import evaluate
    from v2drop.method import Method

    benchmark = get_benchmark("textvqa", data_dir=config.data_dir)
    samples = benchmark.load(config.split, config.limit)
    held = []
    for s in samples:  # what HFBenchmark.load did before: decode every image at load time and keep it
        held.append(
            Sample(s.id, s.question, s.answer, s.family, tuple(im.copy() for im in s.images), s.evidence, s.choices)
        )
    MEDIA_CACHE.clear()
    return evaluate(lvlm, benchmark, Method.resolve(config.method), config, Path(tmp) / "records.jsonl", samples=held)


class MemorySampler:
    """Peak resident memory of this process and its children, sampled from /proc on a thread (Linux only)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.peak_rss = self.peak_main = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Begin sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Take a last sample and stop."""
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Update the peaks from the current RSS and PSS of this process and its descendants."""
        me = os.getpid()
        pids = [me, *_descendants(me)]
        rss = {p: _status_kb(p, "VmRSS") * 1024 for p in pids}
        self.peak_main = max(self.peak_main, rss.get(me, 0))
        self.peak_rss = max(self.peak_rss, sum(rss.values()))
        self.peak_pss = max(self.peak_pss, sum(_pss_kb(p) * 1024 for p in pids))


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (its loader workers), from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _status_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """The proportional set size of ``pid`` in kB from ``smaps_rollup`` (its RSS where that is unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return _status_kb(pid, "VmRSS")


if __name__ == "__main__":
    main()
