"""Evaluate one model on one benchmark under one method.

    python -m experiments.evaluate --model proxy --benchmark digits --method v2drop --schedule v2drop-llava15-128 \
        [--limit N] [--output result.json] [--save-trace trace.jsonl] [--resume] [--baseline none.json]
    python -m experiments.evaluate --model proxy --benchmark digits --method none

``--method`` is a scorer name (with ``--schedule`` a preset name or YAML file), a full preset
name, or ``none``. Per-sample records go to ``<run-dir>/records.jsonl`` as they finish; an
interrupted run continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import yaml

from v2drop.evaluation import EvalConfig, evaluate, format_table
from v2drop.method import resolve_method


def _parse_scorer_args(items: list[str]) -> dict:
    """``key=value`` items (values parsed as YAML) as a dict."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--scorer-arg/--benchmark-arg take key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _check_writable(path: Path) -> None:
    parent = path.parent if path.parent != Path("") else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"Cannot write {path}: the directory or file is not writable")


def main(argv=None) -> dict:
    """Parse arguments, run the evaluation, print the table, write the files."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="proxy", help="hub id, local directory or bundled name (proxy)")
    p.add_argument("--benchmark", default="digits", help="registered benchmark name")
    p.add_argument("--method", default="none", help="scorer name, preset name or YAML, or none")
    p.add_argument("--schedule", default=None, help="preset name or YAML whose schedule to use")
    p.add_argument("--scorer-arg", action="append", default=[], metavar="KEY=VALUE", help="scorer parameter, e.g. metric=l1")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="samples run before timing starts")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", default=None, help='from_pretrained device_map, e.g. "auto" for one GPU (overrides --device)')
    p.add_argument("--data-dir", default=None, help="local copy of a real benchmark in its Hugging Face schema")
    p.add_argument("--benchmark-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="benchmark parameter, e.g. circular=true (mmbench), num_frames=16, video_root=/data/videos")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--devices", default="1", help="Lightning devices")
    p.add_argument("--run-dir", default=None, help="where records, result and trace go (default runs/eval/<model>-<benchmark>-<method>)")
    p.add_argument("--output", default=None, help="also write the result JSON here")
    p.add_argument("--save-trace", default=None, help="write each sample's kept vision positions per stage (JSONL)")
    p.add_argument("--baseline", default=None, help="a no-dropping result JSON to report relative accuracy against")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping finished samples")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    try:
        from v2drop.benchmarks import get_benchmark

        method = resolve_method(args.method, args.schedule, _parse_scorer_args(args.scorer_arg))
        benchmark_args = _parse_scorer_args(args.benchmark_arg)
        benchmark = get_benchmark(args.benchmark, data_dir=args.data_dir, **benchmark_args)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(args.model).name}-{args.benchmark}-{args.method}-{Path(args.schedule or 'default').stem}")
        run_dir = Path(args.run_dir or Path("runs") / "eval" / slug)
        outputs = [run_dir / "result.json"] + [Path(x) for x in (args.output, args.save_trace) if x]
        for path in outputs:
            _check_writable(path)
        records = run_dir / "records.jsonl"
        if records.exists() and not args.resume:
            raise ValueError(f"{records} exists from an earlier run; add --resume to continue it or --run-dir to start elsewhere")
        baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
        config = EvalConfig(
            model=args.model, benchmark=args.benchmark, method=method.to_dict(), split=args.split, limit=args.limit,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, warmup=args.warmup,
            attn_implementation=args.attn, dtype=args.dtype, device=args.device, device_map=args.device_map,
            data_dir=args.data_dir, benchmark_args=benchmark_args, threads=args.threads,
            devices=int(args.devices) if args.devices.isdigit() else args.devices, progress=not args.no_progress,
        )
        import v2drop

        lvlm = v2drop.load(args.model, attn_implementation=args.attn, dtype=args.dtype, device=args.device, device_map=args.device_map)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)

    result = evaluate(lvlm, benchmark, method, config, records_path=records, resume=args.resume, baseline=baseline)
    print(format_table(result))
    data = result.to_json()
    for path in [run_dir / "result.json"] + ([Path(args.output)] if args.output else []):
        path.write_text(json.dumps(data, indent=2))
    if args.save_trace:
        with open(args.save_trace, "w") as f:
            for line in records.read_text().splitlines():
                r = json.loads(line)
                f.write(json.dumps({"id": r["id"], "stages": r["kept"], "vision_tokens_per_layer": r["vision_tokens_per_layer"]}) + "\n")
    print(f"results in {run_dir}")
    return data


if __name__ == "__main__":
    main()
