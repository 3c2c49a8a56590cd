"""A study's artifacts: trial rows, the Pareto front as CSV and plot, and the front as a terminal table."""

from __future__ import annotations

import math
from pathlib import Path

from v2drop.evaluation.records import write_csv
from v2drop.search.config import OBJECTIVES, SweepConfig
from v2drop.search.pareto import pareto_indices


def trial_rows(study, cfg: SweepConfig) -> list[dict]:
    """One row per complete trial of an ``optuna.Study``: label, scorer, schedule, objectives, metrics, feasibility."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        m = t.user_attrs.get("metrics", {})
        method = t.user_attrs.get("method", {})
        stages = (method.get("schedule") or {}).get("stages") or []
        row = {"trial": t.number, "label": t.user_attrs.get("label", ""),
               "scorer": (method.get("scorer") or {}).get("name", "none") if isinstance(method.get("scorer"), dict) else "none",
               "schedule": " ".join(f"{l}:{k:.3f}" for l, k in stages),
               **{o: v for o, v in zip(cfg.objectives, t.values)},
               "accuracy_metric": m.get("accuracy"), "prefill_ms": (m.get("prefill_latency_median_s") or 0) * 1e3,
               "generation_ms": (m.get("generation_latency_median_s") or 0) * 1e3, "flops_ratio": m.get("flops_ratio"),
               "average_tokens": m.get("average_vision_tokens"), "feasible": all(c <= 0 for c in _constraint_values(t))}
        rows.append(row)
    return rows


def write_artifacts(study, cfg: SweepConfig, run_dir: Path) -> tuple[list[dict], list[dict]]:
    """``trials.csv``, ``pareto.csv`` and ``pareto.png``; returns (all rows, front rows)."""
    rows = trial_rows(study, cfg)
    if not rows:
        raise RuntimeError(f"Study {cfg.study!r} has no complete trial")
    feasible = [r for r in rows if r["feasible"]]
    directions = [OBJECTIVES[o][1] for o in cfg.objectives]
    front_idx = set(pareto_indices([[r[o] for o in cfg.objectives] for r in feasible], directions))
    front_trials = {feasible[i]["trial"] for i in front_idx}
    for r in rows:
        r["is_pareto"] = r["trial"] in front_trials
    front = sorted((r for r in rows if r["is_pareto"]), key=lambda r: r[cfg.objectives[-1]])
    write_csv(rows, run_dir / "trials.csv")
    write_csv(front, run_dir / "pareto.csv")
    plot_front(rows, run_dir / "pareto.png", cfg)
    return rows, front


def plot_front(rows: list[dict], path: Path, cfg: SweepConfig) -> None:
    """Accuracy vs prefill latency and vs FLOPs; front highlighted, paper presets and no-drop marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "prefill_ms", "median prefill latency (ms)"), (axes[1], "flops_ratio", "prefill FLOPs / no dropping")):
        ax.scatter([r[key] for r in rows], [r["accuracy_metric"] for r in rows], c="lightgrey", s=18, label="trials")
        front = sorted((r for r in rows if r["is_pareto"]), key=lambda r: r[key])
        ax.plot([r[key] for r in front], [r["accuracy_metric"] for r in front], "o-", c="tab:red", ms=5, label="Pareto front")
        for r in rows:
            if r["label"]:
                ax.scatter([r[key]], [r["accuracy_metric"]], marker="*" if r["label"] != "none" else "s", s=90, zorder=5,
                           label=("paper " if r["label"] != "none" else "") + r["label"])
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (validation sample)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{cfg.study}: {cfg.model} on {cfg.benchmark}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_front(front: list[dict], confirmed: list[dict]) -> str:
    """The front as a terminal table, with the confirmed accuracy."""
    test = {c["trial"]: c for c in confirmed}
    lines = [f"{'trial':>5} {'label':<20} {'schedule':<32} {'val acc':>8} {'test acc':>8} {'prefill ms':>10} {'FLOPs':>7} {'tokens':>7}"]
    for r in front:
        c = test.get(r["trial"], {})
        lines.append(f"{r['trial']:>5} {r['label'][:20]:<20} {r['schedule'][:32]:<32} {r['accuracy_metric']:>8.3f} "
                     f"{c.get('test_accuracy', math.nan):>8.3f} {r['prefill_ms']:>10.1f} {r['flops_ratio']:>7.3f} {r['average_tokens']:>7.1f}")
    return "\n".join(lines)


def _constraint_values(trial) -> list[float]:
    """A trial's constraint values (feasible when all are <= 0)."""
    constraints = trial.constraints or {}
    return list(constraints.values()) if isinstance(constraints, dict) else list(constraints)
