"""Collect finished evaluations into one table: methods × benchmarks, relative to no dropping (the papers' Table 1).

    python -m experiments.report [runs/store] [--output runs/report] [--compare none,v2drop,fastv]

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
samples (``ns``: the interval holds zero) and its agreement with the no-dropping answers; a
stochastic method run with several seeds (``experiments.evaluate --seeds N``) is one row, the mean
over its seeds with an interval resampling samples and seeds. A third table per model
(``report-<model>-pairs``) gives the paired-bootstrap 95% interval of the accuracy difference
between every two methods run on the same samples (``--compare A,B,...``: only pairs of those
labels), ``ns`` where it holds zero. Token columns come both ways: ``avg_vision_tokens`` (averaged
over the decoder layers, the in-LLM papers' count) and ``entering_llm_tokens`` (entering the LLM,
the pre-LLM papers' count).
At every budget the table shows, the controls (``v2drop.budgets.CONTROLS``: random, downsample,
pool) belong beside the methods: the report names those with no run there and how to run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from v2drop import checks
from v2drop.budgets import missing_controls
from v2drop.cli import parse_config, run
from v2drop.evaluation.collect import (
    TOKEN_NOTE,
    collect_results,
    interval_rows,
    method_benchmark_table,
    pairwise_rows,
    table_columns,
)
from v2drop.tables import markdown_table, write_csv


def main(argv=None) -> dict:
    """Print and write the table of every model's runs; bad input: ``error: ...``, exit status 2."""
    return run(_main, argv)


@dataclass
class ReportConfig:
    """The command's options."""

    runs: str = "runs/store"  # the run store holding finished evaluations; also the positional argument
    output: str = "runs/report"  # directory for report-<model>.md / .csv
    compare: str | None = None  # comma-separated labels whose pairs get difference intervals (none,v2drop); None = all


CONFIG = ReportConfig


def _main(argv) -> dict:
    args = parse_config(ReportConfig, argv, __doc__, positional="runs")
    out = Path(args.output)
    checks.check_writable(out, directory=True)
    runs = collect_results(args.runs)
    compare = _compare(args.compare, {r.label for r in runs})
    tables = method_benchmark_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    intervals = interval_rows(runs)
    for model, rows in tables.items():
        stem = f"report-{Path(model).name}"  # model names have dots (llava-1.5-7b-hf): no with_suffix
        markdown = markdown_table(rows, table_columns(rows))
        (out / f"{stem}.md").write_text(f"{TOKEN_NOTE}\n\n{markdown}")
        write_csv(rows, out / f"{stem}.csv", sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k)))
        missing = [r["method"] for r in rows if r["avg_vs_none"] is None and r["method"] != "none"]
        print(f"## {model} ({sum(r.model == model for r in runs)} runs)\n\n{TOKEN_NOTE}\n\n{markdown}")
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
        pairs = pairwise_rows(runs, compare).get(model)
        if pairs:
            paired = markdown_table(pairs, floatfmt="{:.3f}")
            (out / f"{stem}-pairs.md").write_text(paired)
            write_csv(pairs, out / f"{stem}-pairs.csv", list(pairs[0]))
            print(f"\nΔ = accuracy of method minus vs, paired 95% bootstrap intervals (ns: holds zero)\n\n{paired}")
    print(f"tables in {out}")
    return tables


def _compare(value, labels: set[str]) -> list[str] | None:
    """``--compare`` as a list of labels (comma-separated text or a list), each one a method of the store."""
    if value is None:
        return None
    names = [n.strip() for item in ([value] if isinstance(value, str) else value) for n in str(item).split(",")]
    names = [n for n in names if n]
    unknown = sorted(set(names) - labels)
    if len(names) < 2 or unknown:
        raise ValueError(
            f"--compare takes two or more method labels of the store separated by commas, got {value!r}"
            + (f" ({', '.join(unknown)} not in the store)" if unknown else "")
            + f"; labels: {', '.join(sorted(labels))}"
        )
    return names


if __name__ == "__main__":
    main()
