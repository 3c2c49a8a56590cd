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
from dataclasses import dataclass, field, replace
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
    entering_llm_tokens: float | None = None  # vision tokens entering the LLM (the result's tokens.entering_llm)
    seed: int | None = None  # the scorer's seed when the scorer is stochastic (runs differing only in it are pooled)


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
    entering = (data.get("tokens") or {}).get("entering_llm")
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
        float(entering) if entering is not None else None,
        scorer.get("seed") if isinstance(scorer, dict) and stochastic(str(name)) else None,
    )


def stochastic(scorer: str) -> bool:
    """Whether the registered scorer ``scorer`` draws at random (its class sets ``stochastic = True``; False for an
    unknown name)."""
    from v2drop.scorers import SCORERS

    try:
        return bool(getattr(SCORERS.get(scorer), "stochastic", False))
    except (KeyError, ValueError):
        return False


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


def latest_runs(runs: list[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    """Per ``(group, label)``, the runs a table shows, by seed: one run, or one per seed of a stochastic scorer run with
    several seeds on the same samples (``experiments.evaluate --seeds``). Two runs of one label, group and seed: the
    later file wins."""
    latest: dict[tuple, dict] = {}
    for run in sorted(runs, key=lambda r: r.path.stat().st_mtime if r.path.exists() else 0.0):
        latest.setdefault((run.group, run.label), {})[run.seed] = run
    return {
        key: [by_seed[s] for s in sorted(by_seed, key=lambda s: (s is None, s or 0))] for key, by_seed in latest.items()
    }


def pooled(runs: list[RunResult]) -> RunResult:
    """One run standing for the seeds of a stochastic method (``latest_runs``): every figure the mean over the seeds;
    a single run itself."""
    if len(runs) == 1:
        return runs[0]
    families = {fam for r in runs for fam in r.per_family}
    return replace(
        runs[0],
        seed=None,
        score=_mean([r.score for r in runs]),
        accuracy=_mean([r.accuracy for r in runs]),
        accuracy_ci95=None,
        average_vision_tokens=_mean([r.average_vision_tokens for r in runs]),
        entering_llm_tokens=_mean([r.entering_llm_tokens for r in runs]),
        flops_ratio=_mean([r.flops_ratio for r in runs]),
        prefill_ms=_mean([r.prefill_ms for r in runs]),
        generation_ms=_mean([r.generation_ms for r in runs]),
        per_family={fam: _mean([r.per_family.get(fam) for r in runs]) for fam in sorted(families)},
    )


def method_benchmark_table(runs: list[RunResult], order: list[str] | None = None) -> dict[str, list[dict]]:
    """Per model, the rows of Table 1 (``order``'s labels in that order, else ``none`` first, then by label).

    A cell is the method's paper metric on that benchmark; ``<benchmark> vs none`` its ratio to
    the no-dropping run of the same group (missing without one); ``<benchmark>/<family>`` the
    benchmark metric per question family; ``avg_vs_none`` the mean of the ratios over the
    benchmarks the method has (``vs_none``); ``avg_vision_tokens`` (vision tokens averaged over the
    decoder layers: the in-LLM papers' count), ``entering_llm_tokens`` (vision tokens entering the
    LLM: the pre-LLM papers' count), ``flops_ratio``, ``prefill_ms`` and ``generation_ms`` the means
    over its runs. Two runs of one label in one group: the later file wins; a stochastic method
    run with several seeds counts as their mean (``pooled``).
    """
    latest = {key: pooled(seeds) for key, seeds in latest_runs(runs).items()}
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
            row["entering_llm_tokens"] = _mean([r.entering_llm_tokens for r in mine])
            row["flops_ratio"] = _mean([r.flops_ratio for r in mine])
            row["prefill_ms"] = _mean([r.prefill_ms for r in mine])
            row["generation_ms"] = _mean([r.generation_ms for r in mine])
            rows.append(row)
        tables[model] = rows
    return tables


TOKEN_COLUMNS = ("avg_vision_tokens", "entering_llm_tokens")
SUMMARY = ("avg_vs_none", *TOKEN_COLUMNS, "flops_ratio")
TOKEN_NOTE = (
    "vision tokens both ways: avg_vision_tokens = retained per decoder layer, averaged over the layers (in-LLM "
    "papers' count; preset budgets use it unless they say count: entering); entering_llm_tokens = entering the "
    "first decoder layer (pre-LLM papers' count)"
)


def table_columns(rows: list[dict]) -> list[str]:
    """``method``, each benchmark's score, then the averages and both token counts (ratio, family and latency columns
    stay in the CSV)."""
    skip = {"method", *SUMMARY, "prefill_ms", "generation_ms"}
    benchmarks = sorted({k for r in rows for k in r if k not in skip and not k.endswith(" vs none") and "/" not in k})
    return ["method", *benchmarks, *SUMMARY]


def _correct(run: RunResult) -> dict:
    """``{sample id: correct}`` from a run's records (beside its result.json)."""
    from v2drop.evaluation.records import read_records

    return {r["id"]: bool(r["correct"]) for r in read_records(run.path.parent / "records.jsonl")}


def correctness(runs: list[RunResult]) -> tuple[list, dict]:
    """The seeds × samples correctness of one method's runs (``latest_runs``) over the sample ids every run has, and
    ``{sample id: correctness averaged over the seeds}`` (each run's own 0/1 when there is one)."""
    tables = [_correct(run) for run in runs]
    ids = [i for i in tables[0] if all(i in t for t in tables[1:])]
    matrix = [[float(t[i]) for i in ids] for t in tables]
    return matrix, {i: sum(row[k] for row in matrix) / len(matrix) for k, i in enumerate(ids)}


def _interval(low_high) -> str:
    """``[low, high]`` as text."""
    return f"[{low_high[0]:+.3f}, {low_high[1]:+.3f}]"


def _difference(mine: dict, other: dict) -> tuple[float | None, str | None]:
    """The paired difference of two ``{sample id: correct}`` (``accounting.paired_difference``) and its interval as
    text, ``ns`` appended when the interval holds zero; ``(None, None)`` without shared samples."""
    from v2drop.evaluation.accounting import paired_difference

    diff = paired_difference(mine, other)
    if diff is None:
        return None, None
    return diff["difference"], _interval(diff["ci95"]) + (" ns" if diff["contains_zero"] else "")


def _ordered(runs: list[RunResult]) -> list[tuple[tuple, list[RunResult]]]:
    """``latest_runs`` by benchmark, ``none`` first, then by label."""
    return sorted(latest_runs(runs).items(), key=lambda kv: (kv[1][0].benchmark, kv[0][1] != "none", kv[0][1]))


def interval_rows(runs: list[RunResult]) -> dict[str, list[dict]]:
    """Per model, one row per run (per method of a group): its accuracy with the 95% bootstrap interval
    (``accuracy_ci95``; a stochastic method run with several seeds: the mean over seeds with
    ``accounting.seed_sample_ci``, resampling samples and seeds), the paired-bootstrap difference to
    the no-dropping run of the same group over the same sample ids (seeds averaged per sample;
    ``v2drop.evaluation.accounting.paired_difference``; ``ns`` marks an interval holding zero: no
    difference shown) and the share of answers equal to no dropping's (seed 0's), both from the
    stored records (never re-run)."""
    from v2drop.evaluation.accounting import agreement, bootstrap_ci, seed_sample_ci
    from v2drop.evaluation.records import read_records

    latest = latest_runs(runs)
    baselines = {group: seeds[0] for (group, _label), seeds in latest.items() if not seeds[0].drops}
    out: dict[str, list[dict]] = {}
    for (group, label), seeds in _ordered(runs):
        run = seeds[0]
        matrix, correct = correctness(seeds)
        if len(seeds) > 1:
            ci = seed_sample_ci(matrix)
        else:
            ci = run.accuracy_ci95 or bootstrap_ci(matrix[0])
        row = {
            "method": label,
            "benchmark": run.benchmark,
            "n": len(correct),
            "seeds": len(seeds),
            "accuracy": sum(correct.values()) / len(correct),
            "accuracy ci95": _interval(ci),
            "Δ vs none": None,
            "Δ ci95": None,
            "agreement with none": None,
        }
        base = baselines.get(group)
        if base is not None and run.drops:
            row["Δ vs none"], row["Δ ci95"] = _difference(correct, _correct(base))
            mine = read_records(run.path.parent / "records.jsonl")
            row["agreement with none"] = agreement(mine, read_records(base.path.parent / "records.jsonl"))
        out.setdefault(run.model, []).append(row)
    return out


def pairwise_rows(runs: list[RunResult], compare: list[str] | None = None) -> dict[str, list[dict]]:
    """Per model, one row per pair of methods run on the same samples (same group; ``compare``: only pairs of these
    labels): ``Δ`` = accuracy of ``method`` minus that of ``vs`` with its paired-bootstrap 95% interval
    (``accounting.paired_difference`` over the shared sample ids, seeds averaged per sample; ``ns``: the
    interval holds zero), in table order (``none`` first, then by label)."""
    chosen = [(key, seeds) for key, seeds in _ordered(runs) if compare is None or key[1] in compare]
    correct = {key: correctness(seeds)[1] for key, seeds in chosen}
    out: dict[str, list[dict]] = {}
    for i, ((group, label), seeds) in enumerate(chosen):
        for (other_group, other), _ in chosen[i + 1 :]:
            if other_group != group:
                continue
            difference, ci = _difference(correct[(group, other)], correct[(group, label)])
            if difference is None:
                continue
            row = {"method": other, "vs": label, "benchmark": seeds[0].benchmark, "n": None, "Δ": difference}
            row["n"] = len(set(correct[(group, other)]) & set(correct[(group, label)]))
            row["Δ ci95"] = ci
            out.setdefault(seeds[0].model, []).append(row)
    return out
