"""Our own small Optuna -> wandb logger (optuna-integration's callback is no longer maintained).

``wandb`` and ``optuna`` are imported when a callback is created, never by ``import v2drop``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from v2drop.search.config import SweepConfig

WANDB_MODES = ("offline", "online", "disabled")


def wandb_mode(cfg: SweepConfig) -> str:
    """The wandb mode: the config's ``wandb.mode`` if set, else ``$WANDB_MODE``, else ``offline``."""
    mode = cfg.wandb.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode not in WANDB_MODES:
        raise ValueError(
            f"wandb mode {mode!r} is not one of {list(WANDB_MODES)} (from the config's wandb.mode or $WANDB_MODE)"
        )
    return mode


def plain(data):
    """``data`` as JSON-able plain values (anything else as its ``str``)."""
    return json.loads(json.dumps(data, default=str))


class WandbCallback:
    """Optuna callback logging to one wandb run per study: every trial's parameters and metrics.

    ``mode``: ``offline`` (default; ``wandb sync <dir>`` later), ``online`` (needs a key) or
    ``disabled`` (writes nothing). No login is ever asked for.
    """

    def __init__(self, cfg: SweepConfig, run_dir: Path):
        self.cfg = cfg
        self.mode = wandb_mode(cfg)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.wandb.project,
            name=cfg.study,
            mode=self.mode,
            dir=str(run_dir),
            config=plain(asdict(cfg)),
            reinit="finish_previous",
        )

    def __call__(self, study, trial) -> None:
        """Log a finished trial (Optuna calls this after each one)."""
        import optuna

        if self.run is None or trial.state != optuna.trial.TrialState.COMPLETE:
            return
        data = {f"params/{k}": v for k, v in trial.params.items()}
        data.update({f"objectives/{k}": v for k, v in zip(self.cfg.objectives, trial.values)})
        data.update(
            {f"metrics/{k}": v for k, v in trial.user_attrs.get("metrics", {}).items() if isinstance(v, (int, float))}
        )
        self.run.log({"trial": trial.number, **data})
        if self.cfg.wandb.per_trial_runs:
            # Run config = the trial's parameters (plus scorer and label), summary = its objectives:
            # what a parallel-coordinates panel over the group's runs reads.
            method = trial.user_attrs.get("method") or {}
            scorer = (
                (method.get("scorer") or {}).get("name", "none") if isinstance(method.get("scorer"), dict) else "none"
            )
            config = {**trial.params, "scorer": scorer, "label": trial.user_attrs.get("label", "")}
            run = self.wandb.init(
                project=self.cfg.wandb.project,
                name=f"{self.cfg.study}-trial-{trial.number}",
                group=self.cfg.study,
                mode=self.mode,
                dir=str(self.run.dir).rsplit("/wandb/", 1)[0],
                config=plain(config),
                reinit="create_new",
            )
            run.log(data)
            run.finish()

    def finish(self, rows: list[dict], confirmed: list[dict], figure: Path | None) -> None:
        """Log the dashboard (``v2drop.search.report.dashboard``, ``docs/sweeps.md``) and close the run."""
        if self.run is None:
            return
        from v2drop.search.report import dashboard

        board = dashboard(rows, confirmed, self.cfg)
        tables = {key: self.wandb.Table(columns=columns, data=data) for key, (columns, data) in board["tables"].items()}
        self.run.log({key: table for key, table in tables.items() if key in ("trials", "confirmed_front")})
        for key, (table, x, y, title) in board["scatters"].items():
            self.run.log({key: self.wandb.plot.scatter(tables[table], x, y, title=title)})
        for key, (xs, ys, keys, title, xname) in board["lines"].items():
            self.run.log({key: self.wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname=xname)})
        if figure is not None and figure.exists():
            self.run.log({"pareto": self.wandb.Image(str(figure))})
        self.run.summary.update(board["summary"])
        self.run.finish()
