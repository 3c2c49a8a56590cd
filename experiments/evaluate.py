"""Evaluate one model on one benchmark under one method.

    python -m experiments.evaluate --model proxy --benchmark digits --method v2drop --schedule v2drop-llava15-128 \
        [--limit N] [--output result.json] [--save-trace trace.jsonl] [--baseline none.json] [--store runs/store]
    python -m experiments.evaluate --model proxy --benchmark digits --method none

``--method`` is a scorer name (with ``--schedule`` a preset name or YAML file), a full preset
name, or ``none``. The run is filed in the run store (``--store``, default ``runs/store``) under
its key: per-sample records go to ``<store>/<key folder>/records.jsonl`` as they finish (with
``--devices N``/``--num-nodes M``: one ``records.rank<k>.jsonl`` per rank, merged into
``records.jsonl`` at the end). The same command again reads a finished run back without model
work and continues an interrupted one, whatever number of ranks wrote its records. Every input is
checked before the model loads: a mistake is one ``error: ...`` line and exit status 2
(``--debug`` or ``V2DROP_DEBUG=1``: traceback).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from v2drop import checks
from v2drop.cli import run
from v2drop.config import config_from_dict, parse_overrides
from v2drop.evaluation import EvalConfig, format_table, run_evaluation
from v2drop.method import resolve_method


def main(argv=None) -> dict | None:
    """Parse arguments, run the evaluation, print the table, write the files (None on ranks other than 0); bad input:
    ``error: ...``, exit status 2.
    """
    return run(_main, argv)


def _main(argv) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="proxy", help="hub id, local directory or bundled name (proxy)")
    p.add_argument("--benchmark", default="digits", help="registered benchmark name")
    p.add_argument("--method", default="none", help="scorer name, preset name or YAML, or none")
    p.add_argument("--schedule", default=None, help="preset name or YAML whose schedule to use")
    p.add_argument(
        "--scorer-arg", action="append", default=[], metavar="KEY=VALUE", help="scorer parameter, e.g. metric=l1"
    )
    p.add_argument("--split", default=None, help="benchmark split (default: the benchmark's default split)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="samples run before timing starts")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--device-map", default=None, help='from_pretrained device_map, e.g. "auto" for one GPU (overrides --device)'
    )
    p.add_argument("--data-dir", default=None, help="local copy of a real benchmark in its Hugging Face schema")
    p.add_argument(
        "--benchmark-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="benchmark parameter, e.g. circular=true (mmbench), num_frames=16, video_root=/data/videos",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="data-loader processes decoding and processing batches (0: in the main process)",
    )
    p.add_argument(
        "--devices",
        default="1",
        help="Lightning devices per machine; several shard the samples (records.rank<k>.jsonl, merged at the end)",
    )
    p.add_argument(
        "--num-nodes", type=int, default=1, help="Lightning num_nodes: machines, each running --devices ranks"
    )
    p.add_argument("--store", default=None, help="the run store directory (default runs/store)")
    p.add_argument("--output", default=None, help="also write the result JSON here")
    p.add_argument("--save-trace", default=None, help="write each sample's kept vision positions per stage (JSONL)")
    p.add_argument("--baseline", default=None, help="a no-dropping result JSON to report relative accuracy against")
    p.add_argument(
        "--label",
        default=None,
        help="the method's name in experiments.report tables (default: from --method, --schedule and --scorer-arg)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    checks.check_method_file(args.method, "--method")
    checks.check_method_file(args.schedule, "--schedule")
    method = resolve_method(args.method, args.schedule, parse_overrides(args.scorer_arg))
    config = config_from_dict(
        EvalConfig,
        dict(
            model=args.model,
            benchmark=args.benchmark,
            method=method.to_dict(),
            split=args.split,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            warmup=args.warmup,
            attn_implementation=args.attn,
            dtype=args.dtype,
            device=args.device,
            device_map=args.device_map,
            data_dir=args.data_dir,
            benchmark_args=parse_overrides(args.benchmark_arg),
            threads=args.threads,
            workers=args.workers,
            devices=int(args.devices) if args.devices.isdigit() else args.devices,
            num_nodes=args.num_nodes,
            progress=not args.no_progress,
            label=args.label or method_label(args.method, args.schedule, args.scorer_arg),
            store=args.store,
        ),
    )
    result = run_evaluation(config, output=args.output, save_trace=args.save_trace, baseline=args.baseline)
    if result is None:
        return None  # a rank other than 0 (``--devices``/``--num-nodes``): rank 0 prints and writes the result
    print(format_table(result))
    where = Path(result.records_path).parent
    print(f"{'finished earlier, reused' if result.reused else 'results'} in {where}")
    return result.to_json()


def method_label(method: str, schedule: str | None, scorer_args: list[str]) -> str:
    """The name a run's method gets in reports: the preset (or scorer and schedule) and any scorer arguments."""
    label = Path(method).stem if method.endswith((".yaml", ".yml")) else method
    if schedule:
        stem = Path(schedule).stem
        label = stem if stem.startswith(label) else f"{label}:{stem}"
    return label + (f"[{','.join(scorer_args)}]" if scorer_args else "")


if __name__ == "__main__":
    main()
