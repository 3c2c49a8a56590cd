"""Finished evaluation runs gathered into one table: methods × benchmarks, relative to no dropping.

Every ``experiments.evaluate`` run writes ``<run dir>/result.json`` (by default under
``runs/eval/<model>-<benchmark>-<method>-<schedule>/``). ``collect_results`` reads all of them
under a directory; ``method_benchmark_table`` lays them out as the token-dropping papers' Table 1:
one row per method, one column per benchmark holding the benchmark's ``paper_metric`` (POPE's F1
over its categories, MME's total score, accuracy elsewhere), and ``avg_vs_none``, the mean over
benchmarks of each score's ratio to the no-dropping run of the same model on the same samples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunResult:
    """One finished run, as the table needs it."""

    path: Path  # its result.json
    model: str  # config.model
    benchmark: str  # config.benchmark
    split: str | None  # the split evaluated
    n: int  # samples scored
    label: str  # the method's name in the table
    drops: bool  # False for the no-dropping run
    score: float | None  # the benchmark's paper metric
    metric: str  # which aggregate key ``score`` is
    average_vision_tokens: float  # retained vision tokens, averaged over decoder layers
    flops_ratio: float  # prefill FLOPs relative to no dropping

    @property
    def group(self) -> tuple:
        """Runs comparable with each other: same model, benchmark, split and number of samples."""
        return (self.model, self.benchmark, self.split, self.n)


def read_run(path: str | os.PathLike) -> RunResult:
    """A ``result.json`` as a RunResult; a file that is not one is a ValueError naming it."""
    from v2drop.benchmarks import BENCHMARKS

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        config, metrics = data["config"], data["metrics"]
        benchmark = config["benchmark"]
        scorer = data["method"]["scorer"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an evaluation result ({type(err).__name__}: {err})") from None
    drops = scorer != "none" and bool(data["method"].get("schedule", {}).get("stages"))
    metric = BENCHMARKS.get(benchmark).paper_metric if benchmark in BENCHMARKS else "accuracy"
    score = metrics.get(metric, metrics.get("accuracy"))
    label = config.get("label") or ("none" if not drops else path.parent.name)
    return RunResult(
        path,
        str(config["model"]),
        benchmark,
        data.get("split") or config.get("split"),
        int(metrics["n"]),
        label,
        drops,
        score,
        metric if metric in metrics else "accuracy",
        float(metrics["average_vision_tokens"]),
        float(metrics["flops_ratio"]),
    )


def collect_results(root: str | os.PathLike) -> list[RunResult]:
    """Every ``result.json`` under ``root`` (recursively), sorted by path; none is a ValueError."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"No runs directory {root}; evaluations write to runs/eval/<run> by default (--run-dir)"
        )
    runs = [read_run(p) for p in sorted(root.rglob("result.json"))]
    if not runs:
        raise ValueError(
            f"No result.json under {root}: finish an evaluation first (python -m experiments.evaluate ...)"
        )
    return runs


def method_benchmark_table(runs: list[RunResult]) -> dict[str, list[dict]]:
    """Per model, the rows of the method × benchmark table (``none`` first, then by label).

    A cell is the method's paper metric on that benchmark; ``<benchmark> vs none`` its ratio to
    the no-dropping run on the same samples (missing without one); ``avg_vs_none`` the mean of
    those ratios over the benchmarks the method has; ``avg_vision_tokens`` and ``flops_ratio`` the
    means over its runs. Two runs of one method on one benchmark and sample set: the later file wins.
    """
    latest: dict[tuple, RunResult] = {}
    for run in sorted(runs, key=lambda r: r.path.stat().st_mtime):
        latest[(run.group, run.label)] = run
    baselines = {group: run for (group, label), run in latest.items() if not run.drops}
    tables: dict[str, list[dict]] = {}
    for model in sorted({r.model for r in latest.values()}):
        by_label: dict[str, list[RunResult]] = {}
        for (_group, label), run in latest.items():
            if run.model == model:
                by_label.setdefault(label, []).append(run)
        rows = []
        for label in sorted(by_label, key=lambda lab: (lab != "none", lab)):
            row: dict = {"method": label}
            ratios = []
            for run in sorted(by_label[label], key=lambda r: r.benchmark):
                row[run.benchmark] = run.score
                base = baselines.get(run.group)
                if base is not None and base.score and run.score is not None:
                    row[f"{run.benchmark} vs none"] = run.score / base.score
                    ratios.append(run.score / base.score)
            row["avg_vs_none"] = sum(ratios) / len(ratios) if ratios else None
            row["avg_vision_tokens"] = sum(r.average_vision_tokens for r in by_label[label]) / len(by_label[label])
            row["flops_ratio"] = sum(r.flops_ratio for r in by_label[label]) / len(by_label[label])
            rows.append(row)
        tables[model] = rows
    return tables


def table_columns(rows: list[dict]) -> list[str]:
    """``method``, each benchmark's score, then the averages (ratio columns stay in the CSV only)."""
    benchmarks = sorted(
        {
            k
            for r in rows
            for k in r
            if k not in ("method", "avg_vs_none", "avg_vision_tokens", "flops_ratio") and not k.endswith(" vs none")
        }
    )
    return ["method", *benchmarks, "avg_vs_none", "avg_vision_tokens", "flops_ratio"]
