"""Deprecated: the sweep moved to ``v2drop.search``; this module re-exports its old public names."""

from __future__ import annotations

import warnings

from v2drop.evaluation import EvalConfig, evaluate  # noqa: F401  (were importable from here)
from v2drop.search import (  # noqa: F401
    OBJECTIVES,
    SAMPLERS,
    WANDB_MODES,
    SearchSpace,
    SweepConfig,
    WandbCallback,
    format_front,
    method_params,
    pareto_indices,
    plot_front,
    suggest_method,
    trial_rows,
    validate,
    wandb_mode,
    write_artifacts,
)
from v2drop.search.study import confirm_front, make_sampler, make_storage, objective_values, run_sweep  # noqa: F401

warnings.warn("v2drop.sweep is deprecated; import from v2drop.search instead", DeprecationWarning, stacklevel=2)
