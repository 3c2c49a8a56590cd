"""The evaluation harness: one benchmark, one model, one method -> per-sample records and aggregates.

``config`` (EvalConfig, EvalResult), ``harness`` (``evaluate``: the Lightning predict loop),
``records`` (JSONL records, traces, vision-token positions), ``report`` (the terminal table) and
``run`` (a whole run as the ``experiments.evaluate`` command does it). Lightning is imported only
when ``evaluate`` runs.
"""

from v2drop.evaluation.config import EvalConfig, EvalResult, EvalSettings, resolve_split
from v2drop.evaluation.harness import evaluate
from v2drop.evaluation.records import append_records, read_records, vision_index_of, vision_runs, write_csv, write_records, write_trace
from v2drop.evaluation.report import format_table
from v2drop.evaluation.run import check_writable, default_run_dir, run_evaluation

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
    "resolve_split",
    "run_evaluation",
    "vision_index_of",
    "vision_runs",
    "write_csv",
    "write_records",
    "write_trace",
]
