"""A sweep's checks before the model loads and before the study is created (``run_sweep`` calls ``check_sweep_run``
first).
"""

from __future__ import annotations

from dataclasses import dataclass

from v2drop import checks
from v2drop.evaluation.store import store_dir
from v2drop.search.config import SweepConfig
from v2drop.search.data import check_sample_rule, sweep_benchmark, trial_samples


@dataclass
class CheckedSweep:
    """What ``check_sweep_run`` resolved: the benchmark, the trial split and samples, the model depth."""

    benchmark: object  # the Benchmark instance
    split: str  # the split trials are evaluated on
    samples: list  # the trial samples (eval.limit of split, drawn by v2drop.search.data.trial_samples)
    depth: int  # decoder layers of the model


def check_sweep_run(cfg: SweepConfig, lvlm=None, benchmark=None) -> CheckedSweep:
    """Everything checkable without weights: names, numbers, search ranges (against the depth in the model's
    config.json), presets, wandb mode, the data (data_dir, benchmark_args, splits, every trial sample), the run
    directory and journal file. Creates nothing."""
    from pathlib import Path

    from v2drop.evaluation.harness import check_sample
    from v2drop.method import Method
    from v2drop.search.space import validate
    from v2drop.search.wandb import wandb_mode

    validate(cfg)
    checks.check_sweep(cfg)
    wandb_mode(cfg)
    check_sample_rule(cfg)
    for check, value in (
        (checks.check_device, cfg.eval.device),
        (checks.check_dtype, cfg.eval.dtype),
        (checks.check_attn, cfg.eval.attn_implementation),
    ):
        try:
            check(value)
        except ValueError as err:
            raise ValueError(f"eval.{err}") from None
    checks.check_int("vision_cache_mb", cfg.vision_cache_mb, 0)
    benchmark = benchmark or sweep_benchmark(cfg)
    split = benchmark.resolve_split(cfg.eval.split)
    benchmark.resolve_split(cfg.confirm.split)  # checked now, used after the trials
    depth = lvlm.depth if lvlm is not None else checks.model_depth(cfg.model)
    validate(cfg, depth)
    from v2drop.search.space import expand_presets

    for name in expand_presets(cfg.enqueue_presets):
        Method.from_preset(name, depth=depth)  # a preset that cannot be moved to this depth fails here
    checks.check_writable(cfg.resolved_run_dir(), directory=True)
    checks.check_writable(store_dir(cfg.store), directory=True)
    if cfg.storage is None or "://" not in cfg.storage:
        checks.check_writable(Path(cfg.storage or cfg.resolved_run_dir() / "journal.log"))
    samples = trial_samples(benchmark, split, cfg)
    if not samples:
        raise ValueError(f"Benchmark {benchmark.name!r} split {split!r} has no samples")
    for sample in samples:
        check_sample(sample, benchmark)
    return CheckedSweep(benchmark, split, samples, depth)
