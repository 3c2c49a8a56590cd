"""Optuna searches over drop layers and keep fractions: accuracy against cost, as Pareto fronts.

The search space is data (``configs/sweep/*.yaml``, see ``docs/sweeps.md``): which scorers (with
their own parameters; ``all`` = every registered one; composites with searched weights), one-shot, progressive or
with a stage before the LLM (per scorer if need be), how many stages, the range of drop layers (drawn
in increasing order) and of relative keep fractions. Modules: ``config`` (SweepConfig and its
sections), ``data`` (the benchmark and the trial sample), ``space`` (validation, trial <-> Method), ``pareto``
(``pareto_indices``), ``study``
(storage, sampler, ``run_sweep``), ``report`` (CSV, plot, terminal table) and ``wandb`` (our
callback). Optuna is imported only when ``study``'s names are first used.
"""

from __future__ import annotations

from v2drop.search.config import OBJECTIVES, SAMPLERS, ConfirmConfig, SearchSpace, SweepConfig, SweepEval, WandbConfig
from v2drop.search.pareto import pareto_indices
from v2drop.search.report import (
    dashboard,
    format_front,
    hover_label,
    plot_front,
    searched_params,
    trial_rows,
    write_artifacts,
)
from v2drop.search.space import (
    KINDS,
    expand_presets,
    fits,
    method_params,
    resolve_scorers,
    schedule_kind,
    scorer_kinds,
    suggest_method,
    validate,
)
from v2drop.search.wandb import WANDB_MODES, WandbCallback, wandb_mode

_STUDY = (
    "conditional",
    "confirm_front",
    "finish_sweep",
    "load_model",
    "make_sampler",
    "make_storage",
    "objective_values",
    "run_sweep",
    "trial_eval_config",
)

__all__ = [
    "KINDS",
    "OBJECTIVES",
    "SAMPLERS",
    "WANDB_MODES",
    "ConfirmConfig",
    "SearchSpace",
    "SweepConfig",
    "SweepEval",
    "WandbCallback",
    "WandbConfig",
    "dashboard",
    "expand_presets",
    "fits",
    "format_front",
    "hover_label",
    "method_params",
    "pareto_indices",
    "plot_front",
    "resolve_scorers",
    "schedule_kind",
    "scorer_kinds",
    "searched_params",
    "suggest_method",
    "trial_rows",
    "validate",
    "wandb_mode",
    "write_artifacts",
    *_STUDY,
]


def __getattr__(name: str):
    if name in _STUDY:  # these need optuna: import it on first use
        from v2drop.search import study

        return getattr(study, name)
    raise AttributeError(f"module 'v2drop.search' has no attribute {name!r}")
