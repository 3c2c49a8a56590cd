"""Evaluate one model on one benchmark under one method.

    python -m experiments.evaluate --model proxy --benchmark digits --method v2drop --schedule v2drop-llava15-128 \
        [--limit N] [--output result.json] [--save-trace trace.jsonl] [--baseline none.json] [--store runs/store]
    python -m experiments.evaluate --model proxy --benchmark digits --method random-llava15-128 --seeds 3
    python -m experiments.evaluate --model proxy --benchmark digits --method none
    python -m experiments.evaluate --config run.yaml --set limit=20 --scorer-args metric=l1

Every key of ``EvaluateConfig`` (``EvalConfig`` plus where the results go) is a flag, can be set
with ``--set key=value`` or read from a ``--config`` YAML file; ``--help`` lists them all.

``--method`` is a scorer name (with ``--schedule`` a preset name or YAML file), a full preset
name, or ``none``. The run is filed in the run store (``--store``, default ``runs/store``) under
its key: per-sample records go to ``<store>/<key folder>/records.jsonl`` as they finish (with
``--devices N``/``--num-nodes M``: one ``records.rank<k>.jsonl`` per rank, merged into
``records.jsonl`` at the end). The same command again reads a finished run back without model
work and continues an interrupted one, whatever number of ranks wrote its records. ``--seeds N``
runs a stochastic method (a scorer with ``stochastic = True``, e.g. ``random``) with seeds 0..N-1,
each under its own key, and prints the mean accuracy over seeds with a 95% interval resampling
samples and seeds; a deterministic method runs once (a note says so). Every input is
checked before the model loads: a mistake is one ``error: ...`` line and exit status 2
(``--debug`` or ``V2DROP_DEBUG=1``: traceback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from v2drop import checks
from v2drop.cli import parse_config, run
from v2drop.evaluation import EvalConfig, format_table, run_evaluation
from v2drop.method import resolve_method


def main(argv=None) -> dict | None:
    """Parse arguments, run the evaluation, print the table, write the files (None on ranks other than 0); bad input:
    ``error: ...``, exit status 2.
    """
    return run(_main, argv)


@dataclass
class EvaluateConfig(EvalConfig):
    """The command's options: an ``EvalConfig`` (its ``method`` named, not given as data) and where results go."""

    method: str = "none"  # scorer name (with --schedule), preset name or YAML file, or none
    schedule: str | None = None  # preset name or YAML file whose schedule the scorer named by --method uses
    scorer_args: dict = field(default_factory=dict)  # scorer parameters, e.g. metric=l1
    output: str | None = None  # also write the result JSON here
    save_trace: str | None = None  # write each sample's kept vision positions per stage here (JSONL)
    baseline: str | None = None  # a no-dropping result JSON to report relative accuracy against


CONFIG = EvaluateConfig


def _main(argv) -> dict | None:
    args = parse_config(EvaluateConfig, argv, __doc__)
    checks.check_method_file(args.method, "--method")
    checks.check_method_file(args.schedule, "--schedule")
    method = resolve_method(args.method, args.schedule, args.scorer_args)
    config = EvalConfig(
        **{f.name: getattr(args, f.name) for f in fields(EvalConfig)}
        | {
            "method": method.to_dict(),
            "label": args.label or method_label(args.method, args.schedule, args.scorer_args),
        }
    )
    result = run_evaluation(config, output=args.output, save_trace=args.save_trace, baseline=args.baseline)
    if result is None:
        return None  # a rank other than 0 (``--devices``/``--num-nodes``): rank 0 prints and writes the result
    print(format_table(result))
    where = Path(result.records_path).parent
    print(f"{'finished earlier, reused' if result.reused else 'results'} in {where}")
    return result.to_json()


def method_label(method: str, schedule: str | None, scorer_args: dict) -> str:
    """The name a run's method gets in reports: the preset (or scorer and schedule) and any scorer arguments."""
    label = Path(method).stem if method.endswith((".yaml", ".yml")) else method
    if schedule:
        stem = Path(schedule).stem
        label = stem if stem.startswith(label) else f"{label}:{stem}"
    items = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in scorer_args.items()]
    return label + (f"[{','.join(items)}]" if items else "")


if __name__ == "__main__":
    main()
