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
accuracy is lost. Each method's accuracy has its 95% bootstrap interval and its paired-bootstrap
difference to no dropping on the same samples (``Δ vs none``, ``Δ ci95``; ``ns``: the interval holds
zero); tokens are counted both ways: ``avg_vision_tokens`` averaged over the decoder layers (the
budgets' convention) and ``entering_llm_tokens`` entering the LLM.
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
from v2drop.budgets import CONTROLS, Budget, UnreachableBudget
from v2drop.cli import parse_config, run
from v2drop.evaluation.collect import TOKEN_COLUMNS
from v2drop.method import Method

INTERVAL_COLUMNS = ("accuracy ci95", "Δ vs none", "Δ ci95")  # from v2drop.evaluation.collect.interval_rows
ENTERING = "vision tokens entering the LLM; ns: the Δ interval holds zero"


def with_intervals(rows: list[dict], results: dict) -> list[dict]:
    """``rows`` with each method's accuracy interval and paired-bootstrap difference to no dropping (``Δ vs none``,
    ``Δ ci95``, ``ns`` where it holds zero), from ``v2drop.evaluation.collect.interval_rows`` on the stored records."""
    from v2drop.evaluation.collect import interval_rows, run_result

    runs = [run_result(res, res["records_path"], label) for label, res in results.items()]
    spread = {r["method"]: r for table in interval_rows(runs).values() for r in table}
    return [{**row, **{k: spread[row["method"]][k] for k in INTERVAL_COLUMNS}} for row in rows]


def methods_at_budgets(
    depth: int, n_vision: int, variants=None, budgets=PAPER_BUDGETS, count: str = "average"
) -> tuple[dict, dict]:
    """``{label: Method}`` for none and every variant (default: every registered scorer) at every budget, plus ``{label:
    {budget, scorer}}``.

    ``count`` says how the budgets count vision tokens (``v2drop.budgets.BUDGET_COUNTS``); with ``entering``
    the labels end in ``-entering`` and a variant whose schedule lets every token enter (no stage before the
    LLM) is left out.
    """
    variants = scorer_variants() if variants is None else variants
    methods, info = {"none": Method.none()}, {"none": {"budget": "all", "scorer": "none"}}
    for budget in budgets:
        for variant, (prefix, overrides) in variants.items():
            try:
                method = budget_method(prefix, Budget(budget, count), depth, n_vision, **overrides)
            except UnreachableBudget:
                continue
            if method is not None:
                label = f"{variant}@{budget}" + ("" if count == "average" else f"-{count}")
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
    # how the budgets count: average (over the decoder layers) or entering (the LLM: methods with a pre-LLM stage)
    budget_count: str = "average"


CONFIG = MethodTableConfig


def main(argv=None) -> list[dict]:
    """Run every method at every budget and write the table and a bar chart."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(CONFIG, argv, __doc__)
    Budget.parse({"tokens": 1, "count": args.budget_count}, "--budget-count")  # an unknown count: error, no model
    all_variants = scorer_variants()
    unknown = sorted(set(args.scorers or ()) - set(all_variants))
    if unknown:
        raise ValueError(f"--scorers {', '.join(unknown)}: not a scorer variant; choose from {', '.join(all_variants)}")
    chosen = set(all_variants if args.scorers is None else args.scorers)
    chosen = chosen | set(CONTROLS) if args.controls else chosen - set(CONTROLS)
    all_variants = {k: v for k, v in all_variants.items() if k in chosen}
    lvlm, benchmark, samples, n_vision, config, out = setup(args, "method_table")
    methods, info = methods_at_budgets(lvlm.depth, n_vision, all_variants, args.budgets, args.budget_count)
    missing = sorted({v for v in all_variants if not any(i.get("scorer") == v for i in info.values())})
    results = run_methods(lvlm, benchmark, methods, config, samples)
    rows = with_intervals(table_rows(results, extra=info), results)
    columns = (
        ["budget", "method"]
        + [f"{benchmark.name}/{f}" for f in sorted(benchmark.families)]
        + ["accuracy", *INTERVAL_COLUMNS, "avg_vs_none", *TOKEN_COLUMNS, "flops_ratio", "prefill_ms"]
    )
    markdown = write_table(rows, out / "method_table", columns)
    print(
        f"{lvlm.name}: {lvlm.depth} layers, {n_vision} vision tokens, {len(samples)} samples of "
        f"{benchmark.name}/{args.split}"
    )
    budget = "budget and avg_vision_tokens" if args.budget_count == "average" else "avg_vision_tokens"
    entering = "budget and entering_llm_tokens" if args.budget_count == "entering" else "entering_llm_tokens"
    print(f"## {budget}: vision tokens averaged over the decoder layers; {entering}: {ENTERING}\n")
    print(markdown)
    if missing:
        why = "no presets" + (" with a stage before the LLM" if args.budget_count == "entering" else "")
        print(f"{why} for: {', '.join(missing)}")

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
