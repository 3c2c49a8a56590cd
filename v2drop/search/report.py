"""A study's artifacts: trial rows, the Pareto front as CSV and plot, and the front as a terminal table."""

from __future__ import annotations

import math
from pathlib import Path

from v2drop.schedule import Schedule, layer_name
from v2drop.search.config import OBJECTIVES, SweepConfig
from v2drop.search.pareto import pareto_indices
from v2drop.search.space import schedule_kind
from v2drop.tables import write_csv


def trial_rows(study, cfg: SweepConfig) -> list[dict]:
    """One row per complete trial of an ``optuna.Study``.

    Columns: trial, label, scorer, kind (``space.KINDS`` or ``none``), schedule (``layer:keep``
    pairs, ``pre_llm:keep`` for a stage before the LLM), the objectives, accuracy and cost
    metrics, feasibility, then one column per searched parameter under its Optuna name
    (``stages``, ``layer_0``, ``keep_0``, ``keep_pre_llm``, ``v2drop.metric``, ``dart.kind``,
    ``composite.weights.v2drop``...; empty where a trial lacks it).
    """
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        m = t.user_attrs.get("metrics", {})
        method = t.user_attrs.get("method", {})
        schedule = Schedule.from_dict(method.get("schedule"))
        row = {
            "trial": t.number,
            "label": t.user_attrs.get("label", ""),
            "scorer": (method.get("scorer") or {}).get("name", "none")
            if isinstance(method.get("scorer"), dict)
            else "none",
            "kind": schedule_kind(schedule),
            "schedule": " ".join(
                f"{'pre_llm' if s.pre_llm else layer_name(s.layer)}:{s.keep:.3f}" for s in schedule.stages
            ),
            **{o: v for o, v in zip(cfg.objectives, t.values)},
            "accuracy_metric": m.get("accuracy"),
            "prefill_ms": (m.get("prefill_latency_median_s") or 0) * 1e3,
            "generation_ms": (m.get("generation_latency_median_s") or 0) * 1e3,
            "flops_ratio": m.get("flops_ratio"),
            "average_tokens": m.get("average_vision_tokens"),
            "feasible": all(c <= 0 for c in _constraint_values(t)),
        }
        row.update({k: v for k, v in t.params.items() if k not in ("scorer", "kind")})
        rows.append(row)
    return rows


def searched_params(rows: list[dict]) -> list[str]:
    """The searched-parameter columns of ``trial_rows`` output, in order of first appearance."""
    fixed = {
        "trial",
        "label",
        "scorer",
        "hover",
        "kind",
        "schedule",
        "accuracy_metric",
        "prefill_ms",
        "generation_ms",
        "flops_ratio",
        "average_tokens",
        "feasible",
        "is_pareto",
        *OBJECTIVES,
    }
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k not in fixed]


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
    for ax, key, label in (
        (axes[0], "prefill_ms", "median prefill latency (ms)"),
        (axes[1], "flops_ratio", "prefill FLOPs / no dropping"),
    ):
        scorers = list(dict.fromkeys(r["scorer"] for r in rows if r["scorer"] != "none"))
        if len(scorers) > 1:  # a cross-method sweep: one colour per method (tab20: the default cycle repeats after 10)
            colours = plt.get_cmap("tab10" if len(scorers) <= 10 else "tab20")
            for i, scorer in enumerate(scorers):
                mine = [r for r in rows if r["scorer"] == scorer]
                ax.scatter(
                    [r[key] for r in mine],
                    [r["accuracy_metric"] for r in mine],
                    s=14,
                    alpha=0.6,
                    label=scorer,
                    color=colours(i % colours.N),
                )
        else:
            ax.scatter(
                [r[key] for r in rows], [r["accuracy_metric"] for r in rows], c="lightgrey", s=18, label="trials"
            )
        front = sorted((r for r in rows if r["is_pareto"]), key=lambda r: r[key])
        ax.plot(
            [r[key] for r in front],
            [r["accuracy_metric"] for r in front],
            "o-",
            c="tab:red",
            ms=5,
            label="Pareto front",
        )
        labelled = [r for r in rows if r["label"]]
        for r in labelled:
            name = ("paper " if r["label"] != "none" else "") + r["label"]
            ax.scatter(
                [r[key]],
                [r["accuracy_metric"]],
                marker="*" if r["label"] != "none" else "s",
                s=90 if len(labelled) <= 8 else 40,
                zorder=5,
                edgecolors="black",
                linewidths=0.5,
                label=name if len(labelled) <= 8 else None,
            )
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (validation sample)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{cfg.study}: {cfg.model} on {cfg.benchmark}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# objective -> (trials column, confirmed-front column) of the cost axis
COST_COLUMNS = {
    "prefill_latency": ("prefill_ms", "test_prefill_ms"),
    "generation_latency": ("generation_ms", "test_generation_ms"),
    "flops": ("flops_ratio", "test_flops_ratio"),
    "average_tokens": ("average_tokens", "test_average_tokens"),
    "accuracy": ("flops_ratio", "test_flops_ratio"),
}


def dashboard(rows: list[dict], confirmed: list[dict], cfg: SweepConfig) -> dict:
    """What the wandb run shows, as plain data (``WandbCallback.finish`` turns it into wandb objects).

    Returns ``{"tables": {name: (columns, data)}, "scatters": {key: (table, x, y, title)},
    "lines": {key: (xs, ys, keys, title, xname)}, "summary": {...}}``:

    - ``trials``: one row per trial; fixed columns, then one column per searched parameter (for a
      parallel-coordinates panel), ``scorer`` to colour by method, ``is_pareto``, and ``hover``
      (``hover_label``: the method and schedule in one string);
    - ``front_validation`` and ``front_confirmed``: scatter charts of accuracy against the cost
      objective, over the validation front and the confirmed front; ``all_trials``: every trial
      (each over a table whose rows carry ``hover``, ``scorer`` and ``schedule``, which the
      built-in scatter's tooltip shows with the point);
    - ``fronts_validation_vs_confirmed``: both fronts as two lines on one chart;
    - ``method_fronts``: one line per scorer through its own non-dominated trials (per-method colours);
    - the confirmed front as the ``confirmed_front`` table.

    Keys never contain '/' nor prefix one another: wandb nests such keys and a later one would
    replace an earlier one in the run summary.
    """
    cost = next((o for o in cfg.objectives if o != "accuracy"), "flops")
    x, x_test = COST_COLUMNS[cost]
    hovers = {r["trial"]: hover_label(r) for r in rows}
    rows = [{**r, "hover": hovers[r["trial"]]} for r in rows]
    confirmed = [{**c, "hover": hovers.get(c["trial"], "")} for c in confirmed]
    fixed = [
        "trial",
        "label",
        "scorer",
        "hover",
        "kind",
        "schedule",
        *cfg.objectives,
        "accuracy_metric",
        "prefill_ms",
        "generation_ms",
        "flops_ratio",
        "average_tokens",
        "feasible",
        "is_pareto",
    ]
    columns = list(dict.fromkeys(fixed + searched_params(rows)))
    table = lambda items, cols: (cols, [[r.get(c) for c in cols] for r in items])  # noqa: E731
    front = sorted((r for r in rows if r.get("is_pareto")), key=lambda r: r[x])
    confirmed = sorted(confirmed, key=lambda r: r[x_test])
    confirmed_columns = list(dict.fromkeys(k for r in confirmed for k in r)) or ["trial", "test_accuracy", x_test]
    tables = {
        "trials": table(rows, columns),
        "front": table(front, columns),
        "confirmed_front": table(confirmed, confirmed_columns),
    }
    scatters = {
        "all_trials": ("trials", x, "accuracy_metric", f"every trial: validation accuracy vs {x}"),
        "front_validation": ("front", x, "accuracy_metric", f"Pareto front (validation): accuracy vs {x}"),
        "front_confirmed": ("confirmed_front", x_test, "test_accuracy", f"confirmed front: test accuracy vs {x_test}"),
    }
    lines = {
        "fronts_validation_vs_confirmed": (
            [[r[x] for r in front], [r[x_test] for r in confirmed]],
            [[r["accuracy_metric"] for r in front], [r["test_accuracy"] for r in confirmed]],
            ["validation", "confirmed"],
            "Pareto front: validation vs confirmation split",
            x,
        )
    }
    methods = list(dict.fromkeys(r["scorer"] for r in rows if r["scorer"] != "none"))
    xs, ys = [], []
    for method in methods:
        mine = [r for r in rows if r["scorer"] == method and r["feasible"]]
        best = sorted(
            (mine[i] for i in pareto_indices([[r["accuracy_metric"], r[x]] for r in mine], ["maximize", "minimize"])),
            key=lambda r: r[x],
        )
        xs.append([r[x] for r in best])
        ys.append([r["accuracy_metric"] for r in best])
    if methods:
        lines["method_fronts"] = (xs, ys, methods, f"each method's own front: accuracy vs {x}", x)
    summary = {
        "front_size": len(front),
        "trial_count": len(rows),
        "method_names": methods,
        "front_method_names": sorted({r["scorer"] for r in front}),
    }
    return {"tables": tables, "scatters": scatters, "lines": lines, "summary": summary}


def hover_label(row: dict) -> str:
    """A trial's point label: scorer with its searched parameters, kind, schedule, and the preset it reproduces.

    E.g. ``composite(parts=v2drop+dart, combine=rank, weights.v2drop=0.62, weights.dart=0.38) ·
    progressive 2:0.500 6:0.250 · trial 17``.
    """
    scorer = row.get("scorer", "none")
    params = [
        (k[len(scorer) + 1 :], v)
        for k, v in row.items()
        if k.startswith(f"{scorer}.") and k != f"{scorer}.kind" and v is not None and v == v
    ]  # v == v: not NaN
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in params)
    text = f"{scorer}({shown})" if shown else scorer
    parts = [text, f"{row.get('kind', '')} {row.get('schedule', '')}".strip(), f"trial {row.get('trial')}"]
    if row.get("label"):
        parts.append(row["label"])
    return " · ".join(p for p in parts if p)


def format_front(front: list[dict], confirmed: list[dict]) -> str:
    """The front as a terminal table, with the confirmed accuracy (and the served requests/s when an objective)."""
    test = {c["trial"]: c for c in confirmed}
    served = any("served_throughput" in r for r in front)
    lines = [
        f"{'trial':>5} {'scorer':<10} {'label':<20} {'schedule':<32} {'val acc':>8} {'test acc':>8} {'prefill ms':>10} "
        f"{'FLOPs':>7} {'tokens':>7}" + (f" {'served req/s':>12}" if served else "")
    ]
    for r in front:
        c = test.get(r["trial"], {})
        lines.append(
            f"{r['trial']:>5} {r.get('scorer', '')[:10]:<10} {r['label'][:20]:<20} {r['schedule'][:32]:<32} "
            f"{r['accuracy_metric']:>8.3f} "
            f"{c.get('test_accuracy', math.nan):>8.3f} {r['prefill_ms']:>10.1f} {r['flops_ratio']:>7.3f} "
            f"{r['average_tokens']:>7.1f}" + (f" {r.get('served_throughput', math.nan):>12.2f}" if served else "")
        )
    return "\n".join(lines)


def _constraint_values(trial) -> list[float]:
    """A trial's constraint values (feasible when all are <= 0)."""
    constraints = trial.constraints or {}
    return list(constraints.values()) if isinstance(constraints, dict) else list(constraints)
