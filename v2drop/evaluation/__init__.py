"""The evaluation harness: one benchmark, one model, one method -> per-sample records and aggregates.

``config`` (EvalConfig, EvalResult), ``harness`` (``evaluate``: the Lightning predict loop),
``records`` (JSONL records, traces, vision-token positions), ``ranks`` (several devices or
machines: shards, per-rank records files, the merge), ``report`` (the terminal table) and
``run`` (a whole run as the ``experiments.evaluate`` command does it). Lightning is imported only
when ``evaluate`` runs.
"""

from v2drop.checks import check_writable  # noqa: F401  (the output check run_evaluation uses)
from v2drop.evaluation.config import EvalConfig, EvalResult, EvalSettings
from v2drop.evaluation.harness import evaluate
from v2drop.evaluation.records import (
    append_records,
    read_records,
    vision_index_of,
    vision_runs,
    write_records,
    write_trace,
)
from v2drop.evaluation.report import format_table
from v2drop.evaluation.run import default_run_dir, run_evaluation
from v2drop.tables import write_csv  # noqa: F401  (the one CSV writer, importable from here too)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "EvalSettings",
    "append_records",
    "check_writable",
    "default_run_dir",
    "evaluate",
    "format_table",
    "read_records",
    "run_evaluation",
    "vision_index_of",
    "vision_runs",
    "write_csv",
    "write_records",
    "write_trace",
]
