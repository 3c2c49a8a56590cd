"""Collect finished evaluations into one table: methods × benchmarks, relative to no dropping (the papers' Table 1).

    python -m experiments.report [runs/store] [--output runs/report]

Reads every finished run of the run store (``experiments.evaluate``, the analyses and the sweeps'
confirmations file their results there, by default under ``runs/store/``) and lays them out with
the one Table 1 builder (``v2drop.evaluation.collect.method_benchmark_table``, also behind
``analysis.method_table``). Cells hold each benchmark's paper metric (POPE: F1 averaged over its
categories; MME: total score; MVBench: mean of task accuracies; accuracy elsewhere); ``avg_vs_none``
is the mean over benchmarks of the ratio to the no-dropping run of the same model on the same
samples and engine settings (run ``--method none`` once per benchmark). One table per model,
written as markdown and CSV (the CSV also has every per-benchmark ratio and per-family score).
A second table per model (``report-<model>-intervals``) gives each run's accuracy with its 95%
bootstrap interval, the paired-bootstrap interval of its difference to no dropping over the same
samples (``ns``: the interval holds zero) and its agreement with the no-dropping answers.
At every budget the table shows, the controls (``v2drop.budgets.CONTROLS``: random, downsample,
pool) belong beside the methods: the report names those with no run there and how to run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from v2drop import checks
from v2drop.budgets import missing_controls
from v2drop.cli import parse_config, run
from v2drop.evaluation.collect import collect_results, interval_rows, method_benchmark_table, table_columns
from v2drop.tables import markdown_table, write_csv


def main(argv=None) -> dict:
    """Print and write the table of every model's runs; bad input: ``error: ...``, exit status 2."""
    return run(_main, argv)


@dataclass
class ReportConfig:
    """The command's options."""

    runs: str = "runs/store"  # the run store holding finished evaluations; also the positional argument
    output: str = "runs/report"  # directory for report-<model>.md / .csv


CONFIG = ReportConfig


def _main(argv) -> dict:
    args = parse_config(ReportConfig, argv, __doc__, positional="runs")
    out = Path(args.output)
    checks.check_writable(out, directory=True)
    runs = collect_results(args.runs)
    tables = method_benchmark_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    intervals = interval_rows(runs)
    for model, rows in tables.items():
        stem = f"report-{Path(model).name}"  # model names have dots (llava-1.5-7b-hf): no with_suffix
        markdown = markdown_table(rows, table_columns(rows))
        (out / f"{stem}.md").write_text(markdown)
        write_csv(rows, out / f"{stem}.csv", sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k)))
        missing = [r["method"] for r in rows if r["avg_vs_none"] is None and r["method"] != "none"]
        print(f"## {model} ({sum(r.model == model for r in runs)} runs)\n\n{markdown}")
        if missing:
            print(
                f"no no-dropping run on the same samples for: {', '.join(missing)} (run --method none on those "
                "benchmarks)"
            )
        for budget, presets in missing_controls(r["method"] for r in rows).items():
            print(
                f"controls not run at {budget} tokens: {', '.join(presets)} (python -m experiments.evaluate --method "
                "<preset>, on the same benchmarks)"
            )
        spread = markdown_table(intervals[model], floatfmt="{:.3f}")
        (out / f"{stem}-intervals.md").write_text(spread)
        write_csv(intervals[model], out / f"{stem}-intervals.csv", list(intervals[model][0]))
        print(f"\naccuracy, 95% bootstrap intervals (ns: the difference to none is within its interval)\n\n{spread}")
    print(f"tables in {out}")
    return tables


if __name__ == "__main__":
    main()
