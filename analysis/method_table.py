"""Paper Table 1: every scorer at three budgets, per question family, averaged as the paper does.

    python -m analysis.method_table [--model proxy] [--benchmark digits] [--limit N] [--scorers v2drop fastv]
        [--budgets 128 64] [--store runs/store]

The controls (``v2drop.budgets.CONTROLS``: random, downsample, pool) are rows at every budget,
whichever ``--scorers`` are chosen (``--no-controls`` leaves them out).
Budgets are the paper's 192/128/64 of 576 as the same shares of the model's vision tokens; each
method's preset is moved to the model's depth and fitted to the budget (``analysis.common.budget_method``).
Every method is evaluated into the run store (``--store``, default ``runs/store``; finished runs are
read back) and the table is laid out by the one Table 1 builder that ``experiments.report`` uses
(``v2drop.evaluation.collect.method_benchmark_table``): "avg_vs_none" is the mean over benchmarks of
the paper metric's ratio to no dropping (here one benchmark); the per-family columns show where the
accuracy is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt

from analysis.common import (
    PAPER_BUDGETS,
    AnalysisConfig,
    budget_method,
    run_methods,
    save_figure,
    scorer_variants,
    setup,
    table_rows,
    write_table,
)
from v2drop.budgets import CONTROLS
from v2drop.cli import parse_config, run
from v2drop.method import Method


def methods_at_budgets(depth: int, n_vision: int, variants=None, budgets=PAPER_BUDGETS) -> tuple[dict, dict]:
    """``{label: Method}`` for none and every variant (default: every registered scorer) at every budget, plus ``{label:
    {budget, scorer}}``.
    """
    variants = scorer_variants() if variants is None else variants
    methods, info = {"none": Method.none()}, {"none": {"budget": "all", "scorer": "none"}}
    for budget in budgets:
        for variant, (prefix, overrides) in variants.items():
            method = budget_method(prefix, budget, depth, n_vision, **overrides)
            if method is not None:
                label = f"{variant}@{budget}"
                methods[label] = method
                info[label] = {"budget": budget, "scorer": variant}
    return methods, info


@dataclass
class MethodTableConfig(AnalysisConfig):
    """``analysis.method_table``'s options."""

    scorers: list[str] | None = None  # scorer variants to run; None = every one
    controls: bool = (
        True  # also run the controls (v2drop.budgets.CONTROLS: random, downsample, pool); False leaves them out
    )
    budgets: list[int] = field(default_factory=lambda: list(PAPER_BUDGETS))  # budgets, as tokens of LLaVA-1.5's 576


CONFIG = MethodTableConfig


def main(argv=None) -> list[dict]:
    """Run every method at every budget and write the table and a bar chart."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(CONFIG, argv, __doc__)
    all_variants = scorer_variants()
    unknown = sorted(set(args.scorers or ()) - set(all_variants))
    if unknown:
        raise ValueError(f"--scorers {', '.join(unknown)}: not a scorer variant; choose from {', '.join(all_variants)}")
    chosen = set(all_variants if args.scorers is None else args.scorers)
    chosen = chosen | set(CONTROLS) if args.controls else chosen - set(CONTROLS)
    all_variants = {k: v for k, v in all_variants.items() if k in chosen}
    lvlm, benchmark, samples, n_vision, config, out = setup(args, "method_table")
    methods, info = methods_at_budgets(lvlm.depth, n_vision, all_variants, args.budgets)
    missing = sorted({v for v in all_variants if not any(i.get("scorer") == v for i in info.values())})
    results = run_methods(lvlm, benchmark, methods, config, samples)
    rows = table_rows(results, extra=info)
    columns = (
        ["budget", "method"]
        + [f"{benchmark.name}/{f}" for f in sorted(benchmark.families)]
        + ["accuracy", "avg_vs_none", "avg_vision_tokens", "flops_ratio", "prefill_ms"]
    )
    markdown = write_table(rows, out / "method_table", columns)
    print(
        f"{lvlm.name}: {lvlm.depth} layers, {n_vision} vision tokens, {len(samples)} samples of "
        f"{benchmark.name}/{args.split}"
    )
    print(markdown)
    if missing:
        print(f"no presets for: {', '.join(missing)}")

    fig, ax = plt.subplots(figsize=(10, 4))
    variants = [v for v in all_variants if any(r.get("scorer") == v for r in rows)]
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        vals = [
            next((r["avg_vs_none"] for r in rows if r.get("scorer") == variant and r.get("budget") == b), 0)
            for b in args.budgets
        ]
        ax.bar([j + i * width for j in range(len(args.budgets))], vals, width, label=variant)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(args.budgets))], [f"{b}/576 budget" for b in args.budgets])
    ax.set_ylabel("accuracy / no dropping (mean over families)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"{benchmark.name} on {lvlm.name}")
    save_figure(fig, out, "method_table")
    return rows


if __name__ == "__main__":
    main()
