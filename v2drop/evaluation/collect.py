"""Finished evaluations gathered into the papers' Table 1: methods × benchmarks, relative to no dropping.

Every evaluation files its ``result.json`` in the run store (``v2drop.evaluation.store``).
``collect_results`` reads all of them under a store; ``method_benchmark_table`` is the one Table 1
builder (``experiments.report`` and ``analysis.method_table`` both use it): one row per method, one
column per benchmark holding the benchmark's ``paper_metric`` (POPE's F1 over its categories, MME's
total score, accuracy elsewhere) and ``avg_vs_none``, the mean over benchmarks of each score's
ratio to the no-dropping run of the same key but for the method (same model weights, samples and
engine settings). ``vs_none`` is the one place such ratios are computed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


def vs_none(scores: dict, none: dict) -> tuple[dict, float | None]:
    """Each score's ratio to the no-dropping score under the same key, and the mean of those ratios.

    Keys without a no-dropping score (missing, None or 0) or without a score of their own are
    left out; the mean is None when no key is left.
    """
    ratios = {k: v / none[k] for k, v in scores.items() if v is not None and none.get(k)}
    return ratios, (sum(ratios.values()) / len(ratios) if ratios else None)


def method_drops(method: dict) -> bool:
    """Whether a method (``Method.to_dict()`` data) drops tokens: a scorer other than ``none`` and some stage."""
    return method.get("scorer") != "none" and bool(method.get("schedule", {}).get("stages"))


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
    group: str  # the run's store key without its method: runs sharing it share a no-dropping baseline
    per_family: dict = field(default_factory=dict)  # the benchmark metric per question family
    prefill_ms: float | None = None  # median prefill latency, milliseconds
    generation_ms: float | None = None  # median generation latency, milliseconds
    accuracy: float | None = None  # mean per-sample correctness (the figure the intervals are about)
    accuracy_ci95: list | None = None  # its bootstrap interval, from the result


def run_result(data: dict, path: str | os.PathLike, label: str | None = None) -> RunResult:
    """A stored result (``result.json`` data) as a RunResult, labelled ``label`` (default: its config's label, else
    ``none`` for no dropping, else the scorer's name); data that is not one is a ValueError naming ``path``."""
    from v2drop.benchmarks import BENCHMARKS
    from v2drop.evaluation.store import RunKey

    path = Path(path)
    try:
        config, metrics, method = data["config"], data["metrics"], data["method"]
        benchmark = config["benchmark"]
        scorer = method["scorer"]
        group = RunKey.from_json(data["key"]).comparable()
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an evaluation result of the run store ({type(err).__name__}: {err})") from None
    drops = method_drops(method)
    metric = BENCHMARKS.get(benchmark).paper_metric if benchmark in BENCHMARKS else "accuracy"
    score = metrics.get(metric, metrics.get("accuracy"))
    name = scorer.get("name") if isinstance(scorer, dict) else str(scorer)
    label = label or config.get("label") or ("none" if not drops else str(name))
    ms = lambda key: metrics[key] * 1e3 if metrics.get(key) is not None else None  # noqa: E731
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
        group,
        dict(data.get("per_family") or {}),
        ms("prefill_latency_median_s"),
        ms("generation_latency_median_s"),
        metrics.get("accuracy"),
        metrics.get("accuracy_ci95"),
    )


def read_run(path: str | os.PathLike) -> RunResult:
    """A ``result.json`` of the run store as a RunResult; a file that is not one is a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not an evaluation result ({type(err).__name__}: {err})") from None
    return run_result(data, path)


def collect_results(root: str | os.PathLike) -> list[RunResult]:
    """Every ``result.json`` in the run store ``root``, sorted by path; none is a ValueError."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"No runs directory {root}; evaluations file their results in the run store runs/store by default (--store)"
        )
    runs = [read_run(p) for p in sorted(root.rglob("result.json"))]
    if not runs:
        raise ValueError(
            f"No result.json under {root}: finish an evaluation first (python -m experiments.evaluate ...)"
        )
    return runs


def _mean(values: list) -> float | None:
    """The mean of the values that are not None (None when none is)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def method_benchmark_table(runs: list[RunResult], order: list[str] | None = None) -> dict[str, list[dict]]:
    """Per model, the rows of Table 1 (``order``'s labels in that order, else ``none`` first, then by label).

    A cell is the method's paper metric on that benchmark; ``<benchmark> vs none`` its ratio to
    the no-dropping run of the same group (missing without one); ``<benchmark>/<family>`` the
    benchmark metric per question family; ``avg_vs_none`` the mean of the ratios over the
    benchmarks the method has (``vs_none``); ``avg_vision_tokens``, ``flops_ratio``,
    ``prefill_ms`` and ``generation_ms`` the means over its runs. Two runs of one label in one
    group: the later file wins.
    """
    latest: dict[tuple, RunResult] = {}
    for run in sorted(runs, key=lambda r: r.path.stat().st_mtime if r.path.exists() else 0.0):
        latest[(run.group, run.label)] = run
    baselines = {group: run for (group, _label), run in latest.items() if not run.drops}
    rank = {label: i for i, label in enumerate(order or [])}
    tables: dict[str, list[dict]] = {}
    for model in sorted({r.model for r in latest.values()}):
        by_label: dict[str, list[RunResult]] = {}
        for (_group, label), run in latest.items():
            if run.model == model:
                by_label.setdefault(label, []).append(run)
        rows = []
        for label in sorted(by_label, key=lambda lab: (rank.get(lab, len(rank)), lab != "none", lab)):
            mine = sorted(by_label[label], key=lambda r: r.benchmark)
            row: dict = {"method": label}
            scores, base = {}, {}
            for run in mine:
                row[run.benchmark] = scores[run.benchmark] = run.score
                row.update({f"{run.benchmark}/{fam}": value for fam, value in sorted(run.per_family.items())})
                if run.group in baselines:
                    base[run.benchmark] = baselines[run.group].score
            ratios, row["avg_vs_none"] = vs_none(scores, base)
            row.update({f"{b} vs none": r for b, r in ratios.items()})
            row["avg_vision_tokens"] = _mean([r.average_vision_tokens for r in mine])
            row["flops_ratio"] = _mean([r.flops_ratio for r in mine])
            row["prefill_ms"] = _mean([r.prefill_ms for r in mine])
            row["generation_ms"] = _mean([r.generation_ms for r in mine])
            rows.append(row)
        tables[model] = rows
    return tables


SUMMARY = ("avg_vs_none", "avg_vision_tokens", "flops_ratio")


def table_columns(rows: list[dict]) -> list[str]:
    """``method``, each benchmark's score, then the averages (ratio, family and latency columns stay in the CSV)."""
    skip = {"method", *SUMMARY, "prefill_ms", "generation_ms"}
    benchmarks = sorted({k for r in rows for k in r if k not in skip and not k.endswith(" vs none") and "/" not in k})
    return ["method", *benchmarks, *SUMMARY]


def _correct(run: RunResult) -> dict:
    """``{sample id: correct}`` from a run's records (beside its result.json)."""
    from v2drop.evaluation.records import read_records

    return {r["id"]: bool(r["correct"]) for r in read_records(run.path.parent / "records.jsonl")}


def _interval(low_high) -> str:
    """``[low, high]`` as text."""
    return f"[{low_high[0]:+.3f}, {low_high[1]:+.3f}]"


def interval_rows(runs: list[RunResult]) -> dict[str, list[dict]]:
    """Per model, one row per method and benchmark: accuracy with its bootstrap interval (``accuracy_ci95``), the
    paired-bootstrap difference to the no-dropping run of the same group over the same sample ids
    (``v2drop.evaluation.accounting.paired_difference``; ``ns`` marks an interval holding zero: no difference
    shown) and the share of answers equal to no dropping's, both from the stored records (never re-run)."""
    from v2drop.evaluation.accounting import agreement, bootstrap_ci, paired_difference
    from v2drop.evaluation.records import read_records

    latest: dict[tuple, RunResult] = {}
    for run in sorted(runs, key=lambda r: r.path.stat().st_mtime if r.path.exists() else 0.0):
        latest[(run.group, run.label)] = run
    baselines = {group: run for (group, _label), run in latest.items() if not run.drops}
    out: dict[str, list[dict]] = {}
    for (group, label), run in sorted(latest.items(), key=lambda kv: (kv[1].benchmark, kv[0][1] != "none", kv[0][1])):
        correct = _correct(run)
        ci = run.accuracy_ci95 or bootstrap_ci([float(c) for c in correct.values()])
        row = {
            "method": label,
            "benchmark": run.benchmark,
            "n": run.n,
            "accuracy": sum(correct.values()) / len(correct),
            "accuracy ci95": _interval(ci),
            "Δ vs none": None,
            "Δ ci95": None,
            "agreement with none": None,
        }
        base = baselines.get(group)
        if base is not None and run.drops:
            diff = paired_difference(correct, _correct(base))
            if diff is not None:
                row["Δ vs none"] = diff["difference"]
                row["Δ ci95"] = _interval(diff["ci95"]) + (" ns" if diff["contains_zero"] else "")
            mine = read_records(run.path.parent / "records.jsonl")
            row["agreement with none"] = agreement(mine, read_records(base.path.parent / "records.jsonl"))
        out.setdefault(run.model, []).append(row)
    return out
