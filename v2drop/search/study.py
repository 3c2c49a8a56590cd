"""Running a study: storage, sampler, the trial objective, baselines first, artifacts and the confirmed front.

A trial maps its suggestions onto a ``Method`` and calls the evaluation harness on a sample of
the validation split (trial results go to the study's storage and CSVs, not the run store); at the
end the Pareto set is evaluated again on the confirmation split, through the run store. Any
Optuna storage URL works, so many workers on many machines can share one study; the default is a
journal file in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import optuna
from tqdm import tqdm

from v2drop import checks
from v2drop.evaluation import EvalConfig, evaluate, evaluate_in_store
from v2drop.method import Method
from v2drop.search.checks import check_sweep_run
from v2drop.search.config import OBJECTIVES, SweepConfig
from v2drop.search.data import eval_fields
from v2drop.search.report import write_artifacts
from v2drop.search.served import SERVED, served_reason, served_throughput
from v2drop.search.space import (
    expand_presets,
    fits,
    method_params,
    preset_method,
    resolve_scorers,
    suggest_method,
    validate,
)
from v2drop.search.wandb import WandbCallback, plain
from v2drop.tables import write_csv
from v2drop.vision_cache import VisionCache


def make_storage(cfg: SweepConfig):
    """An Optuna storage from a URL (journal file by default); unreachable storages fail here."""
    url = cfg.storage or str(cfg.resolved_run_dir() / "journal.log")
    if "://" not in url:  # a plain path: journal file
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    if url.startswith("redis://"):
        from optuna.storages.journal import JournalRedisBackend, JournalStorage

        try:
            return JournalStorage(JournalRedisBackend(url))
        except Exception as err:  # noqa: BLE001 - connection errors come in many types
            raise ValueError(f"Cannot reach the Redis storage {url}: {err}") from None
    try:
        with warnings.catch_warnings():
            # Heartbeats are how Optuna fails a dead worker's trial; both APIs are marked experimental
            # in the pinned Optuna 5.0 (tests/test_sweep.py checks that they behave as we rely on).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=cfg.heartbeat,
                grace_period=2 * cfg.heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.retries),
                engine_kwargs={"pool_pre_ping": True},
            )
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"Cannot reach the storage {url}: {err}") from None


def make_sampler(cfg: SweepConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with ``cfg.seed + offset`` (workers joining a study use their pid)."""
    seed = cfg.seed + offset
    if cfg.sampler == "tpe":
        if not conditional(cfg):
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, constant_liar=True)
        # Several scorers: each one's parameters exist only in the trials that chose it. Grouped
        # multivariate TPE models each such group of parameters jointly, over the trials that have it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=8, constant_liar=True, multivariate=True, group=True
            )
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def conditional(cfg: SweepConfig) -> bool:
    """True when trials differ in which parameters they have beyond the stages (several scorers, or per-scorer
    kinds)."""
    return len(resolve_scorers(cfg.search)) > 1 or bool(cfg.search.scorer_kinds)


def objective_values(metrics: dict, objectives: list[str]) -> list[float]:
    """The trial's objective values, latencies in milliseconds."""
    out = []
    for name in objectives:
        value = metrics[OBJECTIVES[name][0]]
        out.append(value * 1e3 if name.endswith("latency") else value)
    return out


def trial_eval_config(cfg: SweepConfig, **changes) -> EvalConfig:
    """The EvalConfig of a trial: the sweep's model and benchmark with its ``eval`` section (plus ``changes``)."""
    return replace(EvalConfig(model=cfg.model, benchmark=cfg.benchmark, progress=False, **eval_fields(cfg)), **changes)


def load_model(cfg: SweepConfig):
    """The sweep's model on ``eval.device`` with ``eval.dtype`` and ``eval.attn_implementation``."""
    import v2drop

    return v2drop.load(
        cfg.model, attn_implementation=cfg.eval.attn_implementation, dtype=cfg.eval.dtype, device=cfg.eval.device
    )


def run_sweep(cfg: SweepConfig, lvlm=None, benchmark=None, progress: bool = True, finish: bool = True) -> dict:
    """Run (or resume, or join) the study, then write the artifacts and confirm the front.

    Returns ``{"rows": every complete trial, "front": the Pareto rows, "confirmed": the front
    re-evaluated on the confirmation split, "run_dir": str}``. With ``finish=False`` only this
    worker's trials run (no artifacts, no confirmation, no wandb run; rows, front and confirmed are
    None): ``finish_sweep`` does the rest once every worker is done (``experiments.sweep --workers``).
    """
    run_dir = cfg.resolved_run_dir()
    # Every check (names, numbers, search ranges against the depth in config.json, presets, splits,
    # paths, data) before the model loads and before the study exists.
    checked = check_sweep_run(cfg, lvlm, benchmark)
    benchmark = checked.benchmark
    storage = make_storage(cfg)  # fails fast on an unreachable URL
    lvlm = lvlm or load_model(cfg)
    validate(cfg, lvlm.depth)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(plain(asdict(cfg)), indent=2))
    directions = [OBJECTIVES[o][1] for o in cfg.objectives]
    try:  # creating a study is atomic in every storage: only its creator enqueues the baselines
        study = optuna.create_study(
            study_name=cfg.study, storage=storage, sampler=make_sampler(cfg), directions=directions
        )
        _enqueue_baselines(study, cfg, lvlm.depth)
    except optuna.exceptions.DuplicatedStudyError:  # joining or resuming
        study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg, offset=os.getpid()))
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            raise ValueError(f"Study {cfg.study!r} exists with other objectives; use another --study") from None
    eval_config = trial_eval_config(cfg)
    samples = checked.samples
    # Every trial runs the same batches: their inputs and vision features are computed by the first one only.
    cache = VisionCache(cfg.vision_cache_mb * 2**20) if cfg.vision_cache_mb else None

    budget = checks.sweep_budget(cfg)

    def objective(trial: optuna.Trial):
        method = suggest_method(trial, cfg.search, lvlm.depth)
        trial.set_user_attr("method", method.to_dict())
        reason = served_reason(method, cfg.model) if SERVED in cfg.objectives else None
        if reason is not None:  # vLLM's plugin cannot run it: pruned, the reason kept with the trial
            trial.set_user_attr("pruned_reason", reason)
            print(f"trial {trial.number} pruned: {reason}")
            raise optuna.TrialPruned(reason)
        with cache.attached(lvlm) if cache is not None else contextlib.nullcontext():
            result = evaluate(lvlm, benchmark, method, eval_config, samples=samples)
        metrics = dict(result.metrics)
        if SERVED in cfg.objectives:
            metrics[OBJECTIVES[SERVED][0]] = served_throughput(cfg, lvlm, method, samples)["requests_per_s"]
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if budget is not None:  # tokens counted the budget's way, minus the budget: feasible when <= 0
            used = (
                result.metrics["average_vision_tokens"] if budget.count == "average" else result.tokens["entering_llm"]
            )
            trial.set_constraint(f"{budget.count}_tokens", used - budget.tokens)
        return objective_values(metrics, cfg.objectives)

    callback = WandbCallback(cfg, run_dir) if finish else None
    callbacks = [callback] if callback is not None else []
    if cfg.total_trials:
        callbacks.append(optuna.study.MaxTrialsCallback(cfg.total_trials, states=(optuna.trial.TrialState.COMPLETE,)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study.optimize(objective, n_trials=cfg.trials, callbacks=callbacks, show_progress_bar=progress)
        if not finish:
            return {"rows": None, "front": None, "confirmed": None, "run_dir": str(run_dir)}
        return _finish(study, cfg, lvlm, benchmark, callback, progress)
    except BaseException as err:  # finished trials are in the storage already; say how to continue
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        err.add_note(
            f"study {cfg.study!r} keeps its {done} finished trial(s) in {cfg.storage or run_dir / 'journal.log'}; "
            "rerun the same command (same study name and storage) to resume it"
        )
        if (
            callback is not None and callback.run is not None
        ):  # the wandb run would otherwise stay open until the process exits
            callback.run.finish(exit_code=1)
        raise


def finish_sweep(cfg: SweepConfig, lvlm=None, benchmark=None, progress: bool = True) -> dict:
    """Write the artifacts, log every trial to one wandb run and confirm the front of a study whose trials ran
    elsewhere (the workers of ``experiments.sweep --workers``); returns what ``run_sweep`` returns."""
    checked = check_sweep_run(cfg, lvlm, benchmark)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=make_storage(cfg))
    except KeyError:
        raise ValueError(f"No study {cfg.study!r} in {cfg.storage or cfg.resolved_run_dir() / 'journal.log'}") from None
    lvlm = lvlm or load_model(cfg)
    callback = WandbCallback(cfg, cfg.resolved_run_dir())
    for trial in study.trials:
        callback(study, trial)
    try:
        return _finish(study, cfg, lvlm, checked.benchmark, callback, progress)
    except BaseException:
        if callback.run is not None:
            callback.run.finish(exit_code=1)
        raise


def _finish(study, cfg: SweepConfig, lvlm, benchmark, callback, progress: bool) -> dict:
    """Artifacts, the confirmed front (its own vision cache: other samples than the trials'), the wandb dashboard."""
    run_dir = cfg.resolved_run_dir()
    rows, front = write_artifacts(study, cfg, run_dir)
    cache = VisionCache(cfg.vision_cache_mb * 2**20) if cfg.vision_cache_mb else None
    with cache.attached(lvlm) if cache is not None else contextlib.nullcontext():
        confirmed = confirm_front(study, front, cfg, lvlm, benchmark, run_dir, progress)
    callback.finish(rows, confirmed, run_dir / "pareto.png")
    return {"rows": rows, "front": front, "confirmed": confirmed, "run_dir": str(run_dir)}


def _enqueue_baselines(study: optuna.Study, cfg: SweepConfig, depth: int) -> None:
    """The no-drop trial and the paper's presets (rescaled to the model's depth) go first."""
    if cfg.enqueue_none:
        study.enqueue_trial({}, user_attrs={"label": "none"})
    scorers = resolve_scorers(cfg.search)
    for name in expand_presets(cfg.enqueue_presets):
        method = preset_method(name, depth)
        if method.scorer_name not in scorers:
            continue
        if not fits(method, cfg.search, depth):
            print(
                f"not enqueueing preset {name}: its {method.scorer_name} settings, stages "
                f"{list(method.schedule.layers)} or "
                f"position policy {method.position_policy!r} lie outside the search space"
            )
            continue
        study.enqueue_trial(method_params(method, cfg.search), user_attrs={"label": name})


def confirm_front(
    study, front: list[dict], cfg: SweepConfig, lvlm, benchmark, run_dir: Path, progress: bool = True
) -> list[dict]:
    """Evaluate every Pareto trial on the confirmation split through the run store (``cfg.store``: a front
    confirmed before is read back) and write ``pareto_confirmed.csv``."""
    split = benchmark.resolve_split(cfg.confirm.split)
    samples = benchmark.load(split, cfg.confirm.limit)
    eval_config = trial_eval_config(cfg, split=split, limit=cfg.confirm.limit, store=cfg.store)
    by_number = {t.number: t for t in study.trials}
    out = []
    for row in tqdm(front, desc=f"confirming the front on {len(samples)} {split} samples", disable=not progress):
        method = Method.from_dict(by_number[row["trial"]].user_attrs["method"])
        label = row["label"] or f"{cfg.study}#{row['trial']}"
        m = evaluate_in_store(lvlm, benchmark, method, replace(eval_config, label=label), samples=samples).metrics
        out.append(
            {
                "trial": row["trial"],
                "label": row["label"],
                "scorer": row["scorer"],
                "kind": row["kind"],
                "schedule": row["schedule"],
                "validation_accuracy": row.get("accuracy_metric"),
                "test_accuracy": m["accuracy"],
                "test_prefill_ms": m["prefill_latency_median_s"] * 1e3,
                "test_generation_ms": m["generation_latency_median_s"] * 1e3,
                "test_flops_ratio": m["flops_ratio"],
                "test_average_tokens": m["average_vision_tokens"],
            }
        )
    write_csv(out, run_dir / "pareto_confirmed.csv")
    return out
