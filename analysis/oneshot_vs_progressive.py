"""Paper Table 8: one drop stage vs V²Drop's progressive stages at the same average budget.

    python -m analysis.oneshot_vs_progressive [--model proxy] [--benchmark digits] [--limit N]

Progressive: the paper's schedule (stages 3/17/22 on 32 layers) moved to the model and fitted to
the budget. One-shot: a single stage at the progressive schedule's first layer, and one at its
middle layer, each with the keep fraction that gives the same average (``v2drop.solve_keep``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from analysis.common import (
    PAPER_BUDGETS,
    PAPER_VISION_TOKENS,
    AnalysisConfig,
    budget_method,
    run_methods,
    save_figure,
    setup,
    table_rows,
    write_table,
)
from v2drop.cli import parse_config, run
from v2drop.method import Method
from v2drop.schedule import solve_keep


def schedules(depth: int, n_vision: int, budgets=PAPER_BUDGETS) -> tuple[dict, dict]:
    """``{label: Method}`` for none, progressive and two one-shot variants per budget."""
    methods, info = {"none": Method.none()}, {"none": {"budget": "all", "schedule": "none"}}
    for budget in budgets:
        progressive = budget_method("v2drop", budget, depth, n_vision)
        target = progressive.schedule.average_tokens(depth, n_vision)
        methods[f"progressive@{budget}"] = progressive
        info[f"progressive@{budget}"] = {
            "budget": budget,
            "schedule": "progressive " + "/".join(map(str, progressive.schedule.layers)),
        }
        layers = progressive.schedule.layers
        for name, layer in (("one-shot-first", layers[0]), ("one-shot-middle", layers[len(layers) // 2])):
            try:
                one = solve_keep([layer], target, depth, n_vision)
            except ValueError:
                continue  # that budget cannot be reached with one stage there
            methods[f"{name}@{budget}"] = Method("v2drop", schedule=one)
            info[f"{name}@{budget}"] = {
                "budget": budget,
                "schedule": f"one-shot at {layer}, keep {one.stages[0].keep:.3f}",
            }
    return methods, info


CONFIG = AnalysisConfig


def main(argv=None) -> list[dict]:
    """Run and write the table and a plot."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(AnalysisConfig, argv, __doc__)
    lvlm, benchmark, samples, n_vision, config, out = setup(args, "oneshot_vs_progressive")
    methods, info = schedules(lvlm.depth, n_vision)
    results = run_methods(lvlm, benchmark, methods, config, samples)
    rows = table_rows(results, extra=info)
    columns = (
        ["budget", "method", "schedule"]
        + [f"{benchmark.name}/{f}" for f in sorted(benchmark.families)]
        + ["accuracy", "avg_vs_none", "avg_vision_tokens", "flops_ratio", "prefill_ms"]
    )
    print(write_table(rows, out / "oneshot_vs_progressive", columns))
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, marker in (("progressive", "o"), ("one-shot-first", "s"), ("one-shot-middle", "^")):
        pts = [
            (r["avg_vision_tokens"] / n_vision * PAPER_VISION_TOKENS, r["avg_vs_none"])
            for r in rows
            if r["method"].startswith(kind + "@")
        ]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker=marker, label=kind)
    ax.set_xlabel("average retained tokens (as of 576)")
    ax.set_ylabel("accuracy / no dropping")
    ax.legend()
    save_figure(fig, out, "oneshot_vs_progressive")
    return rows


if __name__ == "__main__":
    main()
