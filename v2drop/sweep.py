"""Optuna searches over drop layers and keep fractions: accuracy against cost, as Pareto fronts.

The search space is data (``configs/sweep/*.yaml``): which scorers (with their own parameters),
one-shot or progressive, how many stages, the range of drop layers (drawn in increasing order)
and of relative keep fractions. A trial maps its suggestions onto a ``Method`` and calls the
evaluation harness on a sample of the validation split; at the end the Pareto set is evaluated
again on the full test split. Any Optuna storage URL works, so many workers on many machines can
share one study; the default is a journal file in the run directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from tqdm import tqdm

from v2drop.evaluation import EvalConfig, evaluate
from v2drop.method import Method
from v2drop.schedule import Schedule

# objective name -> (metric key in EvalResult.metrics, direction, scale for display)
OBJECTIVES = {
    "accuracy": ("accuracy", "maximize"),
    "prefill_latency": ("prefill_latency_median_s", "minimize"),
    "generation_latency": ("generation_latency_median_s", "minimize"),
    "flops": ("flops_ratio", "minimize"),
    "average_tokens": ("average_vision_tokens", "minimize"),
}
SAMPLERS = ("tpe", "nsga2", "gp", "random")


@dataclass
class SearchSpace:
    """What a trial may choose (``search:`` in a sweep YAML)."""

    scorers: dict = field(default_factory=lambda: {"v2drop": {}})  # scorer name -> {param: [choices]}
    kinds: list = field(default_factory=lambda: ["progressive"])  # "one-shot" and/or "progressive"
    stages: list = field(default_factory=lambda: [2, 3])  # [min, max] stages of a progressive schedule
    layers: list = field(default_factory=lambda: [1, None])  # [first, last] drop layer; None = depth - 1
    keep: list = field(default_factory=lambda: [0.0, 0.9])  # [low, high] relative keep fraction per stage


@dataclass
class SweepConfig:
    """A whole sweep (one YAML file in ``configs/sweep``; every key can be overridden with ``--set``)."""

    study: str = "v2drop-proxy-digits"  # study name (shared by every worker)
    model: str = "proxy"  # model for v2drop.load
    benchmark: str = "digits"  # registered benchmark
    trials: int = 24  # trials this worker runs (stops early when the study has `total_trials`)
    total_trials: int | None = None  # stop every worker once the study holds this many finished trials
    sampler: str = "tpe"  # tpe, nsga2, gp or random
    seed: int = 0  # sampler seed
    objectives: list = field(default_factory=lambda: ["accuracy", "prefill_latency"])  # first is usually accuracy
    max_average_tokens: float | None = None  # constraint: average retained vision tokens at most this
    enqueue_presets: list = field(default_factory=lambda: ["v2drop-llava15-192", "v2drop-llava15-128", "v2drop-llava15-64"])  # paper settings tried first
    enqueue_none: bool = True  # a no-dropping trial first
    search: SearchSpace = field(default_factory=SearchSpace)
    eval: dict = field(default_factory=lambda: {"split": "validation", "limit": 100, "batch_size": 8, "max_new_tokens": 4, "warmup": 2})  # trial evaluation (EvalConfig fields)
    confirm: dict = field(default_factory=lambda: {"split": "test", "limit": None})  # re-evaluation of the Pareto set
    storage: str | None = None  # Optuna storage URL; None = journal file runs/<study>/journal.log
    run_dir: str | None = None  # artifacts; None = runs/<study>
    heartbeat: int = 30  # seconds between RDB heartbeats (a dead worker's trial is failed after 2x)
    retries: int = 2  # times a failed trial is retried (RDB storages)
    wandb: dict = field(default_factory=lambda: {"mode": None, "project": "v2drop", "per_trial_runs": False})  # mode offline / online / disabled; None = $WANDB_MODE, else offline

    @classmethod
    def from_dict(cls, data: dict) -> "SweepConfig":
        """Build from YAML data; unknown keys are errors naming the valid ones."""
        import dataclasses

        def check(kind, values):
            valid = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values or {}) - valid
            if unknown:
                raise ValueError(f"Unknown {kind.__name__} keys {sorted(unknown)}; valid keys: {sorted(valid)}")
            return dict(values or {})

        data = check(cls, data)
        if "search" in data:
            data["search"] = SearchSpace(**check(SearchSpace, data["search"]))
        defaults = cls()
        for key in ("eval", "confirm", "wandb"):
            if key in data:
                data[key] = {**getattr(defaults, key), **(data[key] or {})}
        return cls(**data)

    def resolved_run_dir(self) -> Path:
        """Where the artifacts go."""
        return Path(self.run_dir or Path("runs") / self.study)


def validate(cfg: SweepConfig, depth: int) -> None:
    """Stop with a clear message before any trial when the config cannot produce valid trials."""
    from v2drop.scorers import SCORERS

    for name in cfg.objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"Unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    if len(set(cfg.objectives)) != len(cfg.objectives) or not cfg.objectives:
        raise ValueError(f"objectives must be a non-empty list without repeats, got {cfg.objectives}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {cfg.sampler!r}; choose from {SAMPLERS}")
    s = cfg.search
    if not s.scorers:
        raise ValueError("search.scorers is empty: name at least one scorer")
    for name in s.scorers:
        SCORERS.get(name)  # unknown scorer: error listing the registered ones
    bad_kinds = set(s.kinds) - {"one-shot", "progressive"}
    if not s.kinds or bad_kinds:
        raise ValueError(f"search.kinds must list 'one-shot' and/or 'progressive', got {s.kinds}")
    first, last = s.layers[0], (s.layers[1] if s.layers[1] is not None else depth - 1)
    if not 0 <= first <= last < depth:
        raise ValueError(f"search.layers [{first}, {last}] must lie within the model's {depth} layers (0..{depth - 1}) and not be empty")
    lo, hi = s.stages
    if "progressive" in s.kinds and not (2 <= lo <= hi):
        raise ValueError(f"search.stages [{lo}, {hi}] must satisfy 2 <= min <= max for progressive schedules")
    if "progressive" in s.kinds and last - first + 1 < lo:
        raise ValueError(f"search.layers [{first}, {last}] has fewer layers than the {lo} stages asked for")
    if not 0.0 <= s.keep[0] <= s.keep[1] <= 1.0:
        raise ValueError(f"search.keep {s.keep} must be a range inside [0, 1]")


def suggest_method(trial: optuna.Trial, space: SearchSpace, depth: int) -> Method:
    """Map a trial's suggestions onto a Method (the enqueued ``none`` trial suggests nothing)."""
    if trial.user_attrs.get("label") == "none":
        return Method.none()
    scorer = trial.suggest_categorical("scorer", list(space.scorers))
    kwargs = {p: trial.suggest_categorical(f"{scorer}.{p}", list(choices)) for p, choices in (space.scorers[scorer] or {}).items()}
    kind = trial.suggest_categorical("kind", list(space.kinds))
    first = space.layers[0]
    last = space.layers[1] if space.layers[1] is not None else depth - 1
    n = 1 if kind == "one-shot" else trial.suggest_int("stages", space.stages[0], min(space.stages[1], last - first + 1))
    layers, keeps, low = [], [], first
    for i in range(n):
        layer = trial.suggest_int(f"layer_{i}", low, last - (n - 1 - i))
        layers.append(layer)
        keeps.append(trial.suggest_float(f"keep_{i}", space.keep[0], space.keep[1]))
        low = layer + 1
    return Method(scorer, schedule=Schedule.progressive(layers, keeps), **kwargs)


def method_params(method: Method, space: SearchSpace) -> dict:
    """The trial parameters that reproduce ``method`` (for enqueueing presets)."""
    params: dict[str, Any] = {"scorer": method.scorer_name, "kind": "one-shot" if method.schedule.is_one_shot else "progressive"}
    for p in (space.scorers.get(method.scorer_name) or {}):
        params[f"{method.scorer_name}.{p}"] = getattr(method.scorer, p)
    if not method.schedule.is_one_shot:
        params["stages"] = len(method.schedule.stages)
    for i, stage in enumerate(method.schedule.stages):
        params[f"layer_{i}"] = stage.layer
        params[f"keep_{i}"] = min(max(stage.keep, space.keep[0]), space.keep[1])
    return params


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
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=cfg.heartbeat, grace_period=2 * cfg.heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=cfg.retries),
            engine_kwargs={"pool_pre_ping": True},
        )
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"Cannot reach the storage {url}: {err}") from None


def make_sampler(cfg: SweepConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with ``cfg.seed + offset`` (workers joining a study use their pid)."""
    seed = cfg.seed + offset
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, constant_liar=True)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def objective_values(metrics: dict, objectives: list[str]) -> list[float]:
    """The trial's objective values, latencies in milliseconds."""
    out = []
    for name in objectives:
        value = metrics[OBJECTIVES[name][0]]
        out.append(value * 1e3 if name.endswith("latency") else value)
    return out


def pareto_indices(values: list[list[float]], directions: list[str]) -> list[int]:
    """Indices of the non-dominated rows (``directions`` per column: maximize / minimize)."""
    signed = [[v if d == "minimize" else -v for v, d in zip(row, directions)] for row in values]
    front = []
    for i, a in enumerate(signed):
        dominated = any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a)) for j, b in enumerate(signed) if j != i)
        if not dominated:
            front.append(i)
    return front


WANDB_MODES = ("offline", "online", "disabled")


def wandb_mode(cfg: SweepConfig) -> str:
    """The wandb mode: the config's ``wandb.mode`` if set, else ``$WANDB_MODE``, else ``offline``."""
    mode = cfg.wandb.get("mode") or os.environ.get("WANDB_MODE") or "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode {mode!r} is not one of {list(WANDB_MODES)} (from the config's wandb.mode or $WANDB_MODE)")
    return mode


class WandbCallback:
    """Our own small Optuna -> wandb logger: one run per study, every trial's parameters and metrics.

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
        self.run = wandb.init(project=cfg.wandb.get("project", "v2drop"), name=cfg.study, mode=self.mode, dir=str(run_dir),
                              config=_plain(asdict(cfg)), reinit="finish_previous")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.run is None or trial.state != optuna.trial.TrialState.COMPLETE:
            return
        data = {f"params/{k}": v for k, v in trial.params.items()}
        data.update({f"objectives/{k}": v for k, v in zip(self.cfg.objectives, trial.values)})
        data.update({f"metrics/{k}": v for k, v in trial.user_attrs.get("metrics", {}).items() if isinstance(v, (int, float))})
        self.run.log({"trial": trial.number, **data})
        if self.cfg.wandb.get("per_trial_runs"):
            run = self.wandb.init(project=self.cfg.wandb.get("project", "v2drop"), name=f"{self.cfg.study}-trial-{trial.number}",
                                  group=self.cfg.study, mode=self.mode, dir=str(self.run.dir).rsplit("/wandb/", 1)[0],
                                  config=_plain(trial.params), reinit="create_new")
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


def _plain(data):
    return json.loads(json.dumps(data, default=str))


def run_sweep(cfg: SweepConfig, lvlm=None, benchmark=None, progress: bool = True) -> dict:
    """Run (or resume, or join) the study, then write the artifacts and confirm the front."""
    import v2drop
    from v2drop.benchmarks import get_benchmark

    run_dir = cfg.resolved_run_dir()
    wandb_mode(cfg)  # a bad mode fails before the model loads
    benchmark = benchmark or get_benchmark(cfg.benchmark)
    storage = make_storage(cfg)  # fails fast on an unreachable URL
    lvlm = lvlm or v2drop.load(cfg.model)
    validate(cfg, lvlm.depth)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(_plain(asdict(cfg)), indent=2))
    directions = [OBJECTIVES[o][1] for o in cfg.objectives]
    try:  # creating a study is atomic in every storage: only its creator enqueues the baselines
        study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg), directions=directions)
        _enqueue_baselines(study, cfg, lvlm.depth)
    except optuna.exceptions.DuplicatedStudyError:  # joining or resuming
        study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg, offset=os.getpid()))
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            raise ValueError(f"Study {cfg.study!r} exists with other objectives; use another --study-name") from None
    eval_kwargs = {k: v for k, v in cfg.eval.items()}
    samples = benchmark.load(eval_kwargs.get("split", "validation"), eval_kwargs.get("limit"))
    eval_config = EvalConfig(model=cfg.model, benchmark=cfg.benchmark, progress=False, **eval_kwargs)

    def objective(trial: optuna.Trial):
        method = suggest_method(trial, cfg.search, lvlm.depth)
        result = evaluate(lvlm, benchmark, method, eval_config, samples=samples)
        trial.set_user_attr("method", method.to_dict())
        trial.set_user_attr("metrics", {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
        if cfg.max_average_tokens is not None:
            trial.set_constraint("average_tokens", result.metrics["average_vision_tokens"] - cfg.max_average_tokens)
        return objective_values(result.metrics, cfg.objectives)

    callback = WandbCallback(cfg, run_dir)
    callbacks = [callback]
    if cfg.total_trials:
        callbacks.append(optuna.study.MaxTrialsCallback(cfg.total_trials, states=(optuna.trial.TrialState.COMPLETE,)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=cfg.trials, callbacks=callbacks, show_progress_bar=progress)
    rows, front = write_artifacts(study, cfg, run_dir)
    confirmed = confirm_front(study, front, cfg, lvlm, benchmark, run_dir, progress)
    callback.finish(rows, confirmed, run_dir / "pareto.png")
    return {"rows": rows, "front": front, "confirmed": confirmed, "run_dir": str(run_dir)}


def _enqueue_baselines(study: optuna.Study, cfg: SweepConfig, depth: int) -> None:
    """The no-drop trial and the paper's presets (rescaled to the model's depth) go first."""
    if cfg.enqueue_none:
        study.enqueue_trial({}, user_attrs={"label": "none"})
    for name in cfg.enqueue_presets:
        method = Method.from_preset(name, depth=depth)
        if method.scorer_name not in cfg.search.scorers:
            continue
        space, layers = cfg.search, method.schedule.layers
        last = space.layers[1] if space.layers[1] is not None else depth - 1
        kind = "one-shot" if method.schedule.is_one_shot else "progressive"
        fits = kind in space.kinds and all(space.layers[0] <= l <= last for l in layers) and (
            kind == "one-shot" or space.stages[0] <= len(layers) <= space.stages[1])
        if not fits:
            print(f"not enqueueing preset {name}: its stages {list(layers)} lie outside the search space")
            continue
        study.enqueue_trial(method_params(method, space), user_attrs={"label": name})


def trial_rows(study: optuna.Study, cfg: SweepConfig) -> list[dict]:
    """One row per complete trial: label, parameters, objectives, metrics, schedule, feasibility."""
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


def write_artifacts(study: optuna.Study, cfg: SweepConfig, run_dir: Path) -> tuple[list[dict], list[dict]]:
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
    _write_csv(rows, run_dir / "trials.csv")
    _write_csv(front, run_dir / "pareto.csv")
    plot_front(rows, run_dir / "pareto.png", cfg)
    return rows, front


def confirm_front(study, front: list[dict], cfg: SweepConfig, lvlm, benchmark, run_dir: Path, progress: bool = True) -> list[dict]:
    """Evaluate every Pareto trial on the confirmation split and write ``pareto_confirmed.csv``."""
    samples = benchmark.load(cfg.confirm.get("split", "test"), cfg.confirm.get("limit"))
    eval_config = EvalConfig(model=cfg.model, benchmark=cfg.benchmark, progress=False,
                             **{**cfg.eval, **{k: v for k, v in cfg.confirm.items() if k not in ("split", "limit")},
                                "split": cfg.confirm.get("split", "test"), "limit": cfg.confirm.get("limit")})
    by_number = {t.number: t for t in study.trials}
    out = []
    for row in tqdm(front, desc=f"confirming the front on {len(samples)} {cfg.confirm.get('split', 'test')} samples", disable=not progress):
        method = Method.from_dict(by_number[row["trial"]].user_attrs["method"])
        m = evaluate(lvlm, benchmark, method, eval_config, samples=samples).metrics
        out.append({"trial": row["trial"], "label": row["label"], "schedule": row["schedule"],
                    "validation_accuracy": row.get("accuracy_metric"), "test_accuracy": m["accuracy"],
                    "test_prefill_ms": m["prefill_latency_median_s"] * 1e3, "test_flops_ratio": m["flops_ratio"],
                    "test_average_tokens": m["average_vision_tokens"]})
    _write_csv(out, run_dir / "pareto_confirmed.csv")
    return out


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
    """The front as a terminal table, with the confirmed test accuracy."""
    test = {c["trial"]: c for c in confirmed}
    lines = [f"{'trial':>5} {'label':<20} {'schedule':<32} {'val acc':>8} {'test acc':>8} {'prefill ms':>10} {'FLOPs':>7} {'tokens':>7}"]
    for r in front:
        c = test.get(r["trial"], {})
        lines.append(f"{r['trial']:>5} {r['label'][:20]:<20} {r['schedule'][:32]:<32} {r['accuracy_metric']:>8.3f} "
                     f"{c.get('test_accuracy', math.nan):>8.3f} {r['prefill_ms']:>10.1f} {r['flops_ratio']:>7.3f} {r['average_tokens']:>7.1f}")
    return "\n".join(lines)


def _write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _constraint_values(trial) -> list[float]:
    """A trial's constraint values (feasible when all are <= 0)."""
    constraints = trial.constraints or {}
    return list(constraints.values()) if isinstance(constraints, dict) else list(constraints)
