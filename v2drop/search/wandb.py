"""Our own small Optuna -> wandb logger (no optuna-integration callback, which is deprecated).

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
        raise ValueError(f"wandb mode {mode!r} is not one of {list(WANDB_MODES)} (from the config's wandb.mode or $WANDB_MODE)")
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
        self.run = wandb.init(project=cfg.wandb.project, name=cfg.study, mode=self.mode, dir=str(run_dir),
                              config=plain(asdict(cfg)), reinit="finish_previous")

    def __call__(self, study, trial) -> None:
        """Log a finished trial (Optuna calls this after each one)."""
        import optuna

        if self.run is None or trial.state != optuna.trial.TrialState.COMPLETE:
            return
        data = {f"params/{k}": v for k, v in trial.params.items()}
        data.update({f"objectives/{k}": v for k, v in zip(self.cfg.objectives, trial.values)})
        data.update({f"metrics/{k}": v for k, v in trial.user_attrs.get("metrics", {}).items() if isinstance(v, (int, float))})
        self.run.log({"trial": trial.number, **data})
        if self.cfg.wandb.per_trial_runs:
            run = self.wandb.init(project=self.cfg.wandb.project, name=f"{self.cfg.study}-trial-{trial.number}",
                                  group=self.cfg.study, mode=self.mode, dir=str(self.run.dir).rsplit("/wandb/", 1)[0],
                                  config=plain(trial.params), reinit="create_new")
            run.log(data)
            run.finish()

    def finish(self, rows: list[dict], confirmed: list[dict], figure: Path | None) -> None:
        """Log the trials table (with ``is_pareto``), the scatter plots and the confirmed front."""
        if self.run is None:
            return
        columns = sorted({k for r in rows for k in r})
        self.run.log({"trials": self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
        if confirmed:
            cc = sorted({k for r in confirmed for k in r})
            self.run.log({"confirmed_front": self.wandb.Table(columns=cc, data=[[r.get(c) for c in cc] for r in confirmed])})
        if figure is not None and figure.exists():
            self.run.log({"pareto": self.wandb.Image(str(figure))})
        self.run.finish()
