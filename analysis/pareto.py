"""Accuracy vs prefill latency and vs FLOPs across methods, with sweep fronts overlaid.

    python -m analysis.pareto [--results runs/store] [--sweep runs/<study> ...]

Reads the finished runs of the run store (``analysis.method_table`` files one per method and budget,
labelled ``<scorer>@<budget>``; accuracy is each run's paper metric) and, for
each ``--sweep`` directory, its front (from ``python -m experiments.sweep``): the one confirmed on
the test split when present, else the validation-sample one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt

from analysis.common import run_dir, save_figure, write_table
from v2drop import checks
from v2drop.cli import parse_config, run
from v2drop.evaluation.collect import collect_results
from v2drop.search import pareto_indices

COSTS = ("prefill_ms", "flops_ratio")


def mark_fronts(rows: list[dict], costs=COSTS) -> None:
    """Set ``pareto_<cost>`` on every row: True when no other row has lower cost and higher accuracy."""
    for key in costs:
        front = set(pareto_indices([[r[key], r["accuracy"]] for r in rows], ["minimize", "maximize"]))
        for i, r in enumerate(rows):
            r[f"pareto_{key}"] = i in front


def _sweep_points(folder: Path) -> tuple[list[dict], str]:
    """A sweep's front as rows of accuracy, prefill_ms and flops_ratio, and which split they are from.

    The confirmed front (``pareto_confirmed.csv``, re-evaluated on the test split) is preferred, so
    that it sits on the same split as the method results; else the validation-sample front.
    """
    confirmed, path = folder / "pareto_confirmed.csv", folder / "pareto.csv"
    if confirmed.exists():
        with open(confirmed) as f:
            return [
                {
                    "accuracy": r["test_accuracy"],
                    "prefill_ms": r["test_prefill_ms"],
                    "flops_ratio": r["test_flops_ratio"],
                }
                for r in csv.DictReader(f)
            ], "confirmed"
    if not path.exists():
        raise ValueError(f"{folder} has no pareto.csv; run python -m experiments.sweep first")
    with open(path) as f:
        return list(csv.DictReader(f)), "validation sample"


def _pick(row: dict, *names):
    """The first of ``names`` set in ``row``, as a float (None when none is)."""
    for n in names:
        if row.get(n) not in (None, ""):
            return float(row[n])
    return None


@dataclass
class ParetoConfig:
    """``analysis.pareto``'s options."""

    results: str = "runs/store"  # the run store holding the method results (analysis.method_table files them there)
    sweep: list[str] = field(default_factory=list)  # sweep run directories whose fronts are overlaid
    output: str | None = None  # output directory; None = runs/analysis/pareto


CONFIG = ParetoConfig


def main(argv=None) -> list[dict]:
    """Plot every cached method result (and sweep fronts) and mark the non-dominated ones."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(ParetoConfig, argv, __doc__)
    if not Path(args.results).is_dir():
        raise FileNotFoundError(
            f"--results {args.results!r} is not a directory; run python -m analysis.method_table first (or point "
            "--results at its output)"
        )
    for folder in args.sweep:
        if not (Path(folder) / "trials.csv").is_file() and not (Path(folder) / "pareto.csv").is_file():
            raise FileNotFoundError(
                f"--sweep {folder!r} is not a sweep run directory (no trials.csv or pareto.csv in it)"
            )
    checks.check_writable(args.output or "runs/analysis/pareto", directory=True)
    out = run_dir("pareto", args.output)
    rows = [
        {
            "method": r.label,
            "scorer": r.label.split("@")[0],
            "accuracy": r.score,
            "prefill_ms": r.prefill_ms,
            "flops_ratio": r.flops_ratio,
            "avg_vision_tokens": r.average_vision_tokens,
        }
        for r in collect_results(args.results)
    ]
    if not rows:
        raise ValueError(f"no results in the run store {args.results}; run python -m analysis.method_table first")
    mark_fronts(rows)
    print(write_table(rows, out / "pareto"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in (
        (axes[0], "prefill_ms", "median LLM prefill latency (ms)"),
        (axes[1], "flops_ratio", "prefill FLOPs / no dropping"),
    ):
        for scorer in dict.fromkeys(r["scorer"] for r in rows):
            mine = [r for r in rows if r["scorer"] == scorer]
            ax.scatter([r[key] for r in mine], [r["accuracy"] for r in mine], label=scorer, s=25)
        front = sorted((r[key], r["accuracy"]) for r in rows if r[f"pareto_{key}"])
        ax.step(*zip(*front), where="post", color="black", lw=1, label="front (methods)")
        for folder in args.sweep:
            sweep_rows, split = _sweep_points(Path(folder))
            cost = (
                ("prefill_ms", "prefill_latency", "prefill_latency_median_s")
                if key == "prefill_ms"
                else ("flops_ratio", "flops")
            )
            pts = sorted(p for p in ((_pick(r, *cost), _pick(r, "accuracy")) for r in sweep_rows) if None not in p)
            if pts:
                ax.plot(*zip(*pts), ls="--", marker="x", label=f"sweep {Path(folder).name} ({split})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out, "pareto")
    return rows


if __name__ == "__main__":
    main()
