"""Paper Tables 7 and 9: L1 vs L2 vs cosine variation, accuracy and throughput, at three budgets.

python -m analysis.metric_ablation [--model proxy] [--benchmark digits] [--limit N]
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from analysis.common import AnalysisConfig, run_methods, save_figure, setup, table_rows, write_table
from analysis.method_table import methods_at_budgets
from v2drop.cli import parse_config, run
from v2drop.scorers.v2drop import METRICS as VARIATION_METRICS

METRICS = {f"v2drop-{m}": ("v2drop", {"metric": m}) for m in VARIATION_METRICS}


CONFIG = AnalysisConfig


def main(argv=None) -> list[dict]:
    """Run the three metrics at the three budgets and write the table and a plot."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(AnalysisConfig, argv, __doc__)
    lvlm, benchmark, samples, n_vision, config, out = setup(args, "metric_ablation")
    methods, info = methods_at_budgets(lvlm.depth, n_vision, variants=METRICS)
    results = run_methods(lvlm, benchmark, methods, config, samples)
    rows = table_rows(results, extra=info)
    for row, label in zip(rows, results):
        m = results[label]["metrics"]
        row["samples_per_s"] = 1.0 / m["generation_latency_median_s"]
        row["scoring_share"] = m["scoring_share_of_prefill"]
    columns = [
        "budget",
        "method",
        "accuracy",
        "avg_vs_none",
        "avg_vision_tokens",
        "samples_per_s",
        "prefill_ms",
        "scoring_share",
    ]
    print(write_table(rows, out / "metric_ablation", columns))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in METRICS:
        mine = [r for r in rows if r.get("scorer") == variant]
        axes[0].plot([str(r["budget"]) for r in mine], [r["avg_vs_none"] for r in mine], marker="o", label=variant)
        axes[1].plot([str(r["budget"]) for r in mine], [r["samples_per_s"] for r in mine], marker="o", label=variant)
    axes[0].set_ylabel("accuracy / no dropping")
    axes[1].set_ylabel("samples per second (batch of one, generation)")
    for ax in axes:
        ax.set_xlabel("budget (of 576)")
        ax.legend(fontsize=8)
    save_figure(fig, out, "metric_ablation")
    return rows


if __name__ == "__main__":
    main()
