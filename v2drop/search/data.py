"""A sweep's data: the benchmark built from the ``eval`` section, and the trial sample every trial (and worker) shares.

The trial sample rule (``eval.sample: stratified``, the default): of the first ``eval.pool``
samples of ``eval.split`` (the whole split when None), ``eval.limit`` are drawn so that each
family keeps its share. Family ``f`` with ``n_f`` of the ``N`` pooled samples gets
``floor(limit * n_f / N)`` places, and the places left go to the families with the largest
remainders (ties: the family seen first). Within a family the places are filled by a
``random.Random("<seed>:<family>")`` draw without replacement. The result is in split order and
depends only on the data, ``limit`` and ``seed``, so every worker of a study draws the same sample.
``eval.sample: first`` takes the first ``eval.limit`` samples instead.
"""

from __future__ import annotations

import random
from dataclasses import fields

from v2drop.search.config import SAMPLE_RULES, SweepConfig


def sweep_benchmark(cfg: SweepConfig):
    """The sweep's benchmark with its ``eval.data_dir`` and ``eval.benchmark_args`` (errors name the bad value)."""
    from v2drop.benchmarks import get_benchmark

    if not isinstance(cfg.eval.benchmark_args, dict):
        raise ValueError(
            f"eval.benchmark_args must be a mapping of constructor parameters (e.g. {{num_frames: 8}}), got "
            f"{cfg.eval.benchmark_args!r}"
        )
    return get_benchmark(cfg.benchmark, data_dir=cfg.eval.data_dir, **cfg.eval.benchmark_args)


def check_sample_rule(cfg: SweepConfig) -> None:
    """``eval.sample`` is a known rule and ``eval.pool`` a positive count (or None)."""
    from v2drop.checks import check_int

    if cfg.eval.sample not in SAMPLE_RULES:
        raise ValueError(
            f"eval.sample {cfg.eval.sample!r} is not a sampling rule; choose one of {', '.join(SAMPLE_RULES)}"
        )
    check_int("eval.pool", cfg.eval.pool, 1, optional=True)


def trial_samples(benchmark, split: str, cfg: SweepConfig) -> list:
    """The samples every trial is evaluated on (the rule in this module's docstring)."""
    if cfg.eval.sample == "first" or cfg.eval.limit is None:
        return benchmark.load(split, cfg.eval.limit)
    return stratified(benchmark.load(split, cfg.eval.pool), cfg.eval.limit, cfg.seed)


def stratified(samples: list, n: int, seed: int) -> list:
    """``n`` of ``samples`` with every family's share kept (largest remainders), seeded per family, in input order."""
    if n >= len(samples):
        return list(samples)
    by_family: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_family.setdefault(sample.family, []).append(i)
    exact = {f: n * len(idx) / len(samples) for f, idx in by_family.items()}
    quota = {f: int(e) for f, e in exact.items()}
    order = sorted(by_family, key=lambda f: -(exact[f] - quota[f]))  # stable: ties keep first-seen order
    for f in order[: n - sum(quota.values())]:
        quota[f] += 1
    chosen = []
    for f, idx in by_family.items():
        chosen.extend(random.Random(f"{seed}:{f}").sample(idx, quota[f]))
    return [samples[i] for i in sorted(chosen)]


def eval_fields(cfg: SweepConfig) -> dict:
    """The ``eval`` section's values that ``EvalConfig`` takes (the sampling rule is the sweep's own)."""
    from v2drop.evaluation import EvalConfig

    names = {f.name for f in fields(EvalConfig)}
    return {f.name: getattr(cfg.eval, f.name) for f in fields(cfg.eval) if f.name in names}
