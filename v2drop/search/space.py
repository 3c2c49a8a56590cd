"""The search space: checking it against a model, mapping trial suggestions onto a Method and back."""

from __future__ import annotations

from numbers import Real
from typing import Any

from v2drop.method import Method
from v2drop.schedule import Schedule
from v2drop.search.config import OBJECTIVES, SAMPLERS, SearchSpace, SweepConfig


def validate(cfg: SweepConfig, depth: int | None = None) -> None:
    """Stop with a clear message before any trial when the config cannot produce valid trials.

    Without ``depth`` (before the model loads) everything but the drop-layer range is checked.
    """
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
    for name, params in s.scorers.items():
        SCORERS.get(name)  # unknown scorer: error listing the registered ones
        if not isinstance(params or {}, dict) or any(not isinstance(c, list) or not c for c in (params or {}).values()):
            raise ValueError(f"search.scorers.{name} must map each parameter to a non-empty list of choices, got {params!r}")
    bad_kinds = set(s.kinds) - {"one-shot", "progressive"}
    if not s.kinds or bad_kinds:
        raise ValueError(f"search.kinds must list 'one-shot' and/or 'progressive', got {s.kinds}")
    for key in ("stages", "layers", "keep"):
        if len(getattr(s, key)) != 2:
            raise ValueError(f"search.{key} is a [low, high] pair, got {getattr(s, key)}")
    if s.layers[0] is None:
        raise ValueError(f"search.layers [{s.layers[0]}, {s.layers[1]}]: the first drop layer must be a number")
    lo, hi = s.stages
    if "progressive" in s.kinds and not (2 <= lo <= hi):
        raise ValueError(f"search.stages [{lo}, {hi}] must satisfy 2 <= min <= max for progressive schedules")
    if not all(isinstance(k, Real) and not isinstance(k, bool) for k in s.keep) or not 0.0 <= s.keep[0] <= s.keep[1] <= 1.0:
        raise ValueError(f"search.keep {s.keep} must be a range inside [0, 1]")
    if depth is None:
        return
    first, last = layer_range(s, depth)
    if not 0 <= first <= last < depth:
        raise ValueError(f"search.layers [{first}, {last}] must lie within the model's {depth} layers (0..{depth - 1}) and not be empty")
    if "progressive" in s.kinds and last - first + 1 < lo:
        raise ValueError(f"search.layers [{first}, {last}] has fewer layers than the {lo} stages asked for")


def layer_range(space: SearchSpace, depth: int) -> tuple[int, int]:
    """The first and last drop layer a trial may choose (``None`` as last = the model's last layer)."""
    return space.layers[0], (space.layers[1] if space.layers[1] is not None else depth - 1)


def suggest_method(trial, space: SearchSpace, depth: int) -> Method:
    """Map an ``optuna.Trial``'s suggestions onto a Method (the enqueued ``none`` trial suggests nothing)."""
    if trial.user_attrs.get("label") == "none":
        return Method.none()
    scorer = trial.suggest_categorical("scorer", list(space.scorers))
    kwargs = {p: trial.suggest_categorical(f"{scorer}.{p}", list(choices)) for p, choices in (space.scorers[scorer] or {}).items()}
    kind = trial.suggest_categorical("kind", list(space.kinds))
    first, last = layer_range(space, depth)
    n = 1 if kind == "one-shot" else trial.suggest_int("stages", space.stages[0], min(space.stages[1], last - first + 1))
    layers, keeps, low = [], [], first
    for i in range(n):
        layer = trial.suggest_int(f"layer_{i}", low, last - (n - 1 - i))
        layers.append(layer)
        keeps.append(trial.suggest_float(f"keep_{i}", float(space.keep[0]), float(space.keep[1])))
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


def fits(method: Method, space: SearchSpace, depth: int) -> bool:
    """True when a trial of ``space`` can reproduce ``method`` (its scorer, kind, stage count and layers)."""
    if method.scorer_name not in space.scorers:
        return False
    layers = method.schedule.layers
    first, last = layer_range(space, depth)
    kind = "one-shot" if method.schedule.is_one_shot else "progressive"
    return kind in space.kinds and all(first <= layer <= last for layer in layers) and (
        kind == "one-shot" or space.stages[0] <= len(layers) <= space.stages[1])
