"""The evaluation harness: one benchmark, one model, one method -> per-sample records and aggregates.

``config`` (EvalConfig, EvalResult), ``harness`` (``evaluate``: the Lightning predict loop),
``records`` (JSONL records, traces, vision-token positions), ``ranks`` (several devices or
machines: shards, per-rank records files, the merge), ``store`` (the run store: one folder per
run key, reused instead of rerun), ``collect`` (stored results as Table 1, ``vs_none``),
``report`` (the terminal table) and ``run`` (a whole run as the ``experiments.evaluate`` command
does it). Lightning is imported only when ``evaluate`` runs.
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
from v2drop.evaluation.run import run_evaluation
from v2drop.evaluation.store import RunKey, evaluate_in_store, read_stored
from v2drop.tables import write_csv  # noqa: F401  (the one CSV writer, importable from here too)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "EvalSettings",
    "append_records",
    "check_writable",
    "RunKey",
    "evaluate",
    "evaluate_in_store",
    "format_table",
    "read_records",
    "read_stored",
    "run_evaluation",
    "vision_index_of",
    "vision_runs",
    "write_csv",
    "write_records",
    "write_trace",
]
