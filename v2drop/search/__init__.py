"""Optuna searches over drop layers and keep fractions: accuracy against cost, as Pareto fronts.

The search space is data (``configs/sweep/*.yaml``, see ``docs/sweeps.md``): which scorers (with
their own parameters), one-shot or progressive, how many stages, the range of drop layers (drawn
in increasing order) and of relative keep fractions. Modules: ``config`` (SweepConfig and its
sections), ``space`` (validation, trial <-> Method), ``pareto`` (``pareto_indices``), ``study``
(storage, sampler, ``run_sweep``), ``report`` (CSV, plot, terminal table) and ``wandb`` (our
callback). Optuna is imported only when ``study``'s names are first used.
"""

from __future__ import annotations

from v2drop.search.config import OBJECTIVES, SAMPLERS, ConfirmConfig, SearchSpace, SweepConfig, WandbConfig
from v2drop.search.pareto import pareto_indices
from v2drop.search.report import format_front, plot_front, trial_rows, write_artifacts
from v2drop.search.space import fits, method_params, suggest_method, validate
from v2drop.search.wandb import WANDB_MODES, WandbCallback, wandb_mode

_STUDY = ("confirm_front", "make_sampler", "make_storage", "objective_values", "run_sweep", "trial_eval_config")

__all__ = [
    "OBJECTIVES", "SAMPLERS", "WANDB_MODES", "ConfirmConfig", "SearchSpace", "SweepConfig", "WandbCallback", "WandbConfig",
    "fits", "format_front", "method_params", "pareto_indices", "plot_front", "suggest_method", "trial_rows", "validate",
    "wandb_mode", "write_artifacts", *_STUDY,
]


def __getattr__(name: str):
    if name in _STUDY:  # these need optuna: import it on first use
        from v2drop.search import study

        return getattr(study, name)
    raise AttributeError(f"module 'v2drop.search' has no attribute {name!r}")
