"""The search space: checking it against a model, mapping trial suggestions onto a Method and back.

A trial first chooses the scorer (parameter ``scorer``), then that scorer's own parameters
(``<scorer>.<parameter>``), its schedule kind (``kind``, or ``<scorer>.kind`` for a scorer with
its own kinds in ``search.scorer_kinds``), then the stages (``stages``, ``layer_i``, ``keep_i``).
Parameters that only some scorers have are therefore conditional: they exist in the trials that
chose their scorer (``docs/sweeps.md``).
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatch
from numbers import Real
from typing import Any

from v2drop.method import POSITION_POLICIES, Method
from v2drop.schedule import Schedule
from v2drop.search.config import OBJECTIVES, SAMPLERS, SearchSpace, SweepConfig

KINDS = ("one-shot", "progressive")
ALL = ("all", "*")  # spellings of "every registered scorer"
PRESET_VISION_TOKENS = 576  # the token count the presets' absolute keep values refer to (LLaVA-1.5)


def resolve_scorers(space: SearchSpace) -> dict[str, dict[str, list]]:
    """``search.scorers`` as ``{name: {parameter: [choices]}}``, with ``all`` / ``*`` expanded.

    ``scorers: all`` (or ``"*"``) is every registered scorer not matched by ``search.exclude``,
    each with its default parameters; a ``"*"`` key in a mapping does the same and the other keys
    add or override scorers with searched parameters (``{"*": {}, v2drop: {metric: [l2, l1]}}``).
    """
    from v2drop.scorers import list_scorers

    spec = space.scorers
    if isinstance(spec, str):
        if spec not in ALL:
            raise ValueError(f"search.scorers {spec!r}: give 'all' (or '*') or a mapping of scorer name -> {{parameter: [choices]}}")
        spec = {"*": {}}
    if not isinstance(spec, dict):
        raise ValueError(f"search.scorers must be 'all' or a mapping of scorer name -> {{parameter: [choices]}}, got {spec!r}")
    out: dict[str, dict[str, list]] = {}
    for name, params in spec.items():
        if name in ALL:
            if params:
                raise ValueError(f"search.scorers.{name!r} means every scorer with its defaults; it takes no parameters, got {params!r}")
            out.update({n: {} for n in list_scorers() if not any(fnmatch(n, p) for p in space.exclude) and n not in out})
        else:  # an explicit entry wins over the expansion
            out[name] = params if params is None or not isinstance(params, dict) else dict(params)
    return {name: ({} if params is None else params) for name, params in out.items()}


def scorer_kinds(space: SearchSpace, scorer: str) -> list[str]:
    """The schedule kinds a trial of ``scorer`` may choose: its own ``search.scorer_kinds`` entry, else ``search.kinds``."""
    return list(space.scorer_kinds.get(scorer) or space.kinds)


def kind_param(space: SearchSpace, scorer: str) -> str:
    """The Optuna parameter holding the kind: ``<scorer>.kind`` for scorers with their own kinds, else ``kind``."""
    return f"{scorer}.kind" if scorer in space.scorer_kinds else "kind"


def expand_presets(patterns: list[str]) -> list[str]:
    """Preset names matching each of ``patterns`` (fnmatch, in order, without repeats); a pattern matching none is an error."""
    from v2drop.method import list_presets

    presets, out = list_presets(), []
    for pattern in patterns:
        matched = [p for p in presets if fnmatch(p, pattern)]
        if not matched:
            raise ValueError(f"enqueue_presets: {pattern!r} matches no preset; presets: {', '.join(presets)}")
        out += [p for p in matched if p not in out]
    return out


def validate(cfg: SweepConfig, depth: int | None = None) -> None:
    """Stop with a clear message before any trial when the config cannot produce valid trials.

    Without ``depth`` (before the model loads) everything but the drop-layer range is checked:
    objectives, sampler, every scorer, parameter and choice (each choice builds its scorer), the
    per-scorer kinds and position policies, the stage, layer and keep ranges, the presets.
    """
    for name in cfg.objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"Unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    if len(set(cfg.objectives)) != len(cfg.objectives) or not cfg.objectives:
        raise ValueError(f"objectives must be a non-empty list without repeats, got {cfg.objectives}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {cfg.sampler!r}; choose from {SAMPLERS}")
    s = cfg.search
    scorers = resolve_scorers(s)
    if not scorers:
        raise ValueError("search.scorers is empty (or 'all' minus search.exclude left nothing): name at least one scorer")
    bad_kinds = set(s.kinds) - set(KINDS)
    if not s.kinds or bad_kinds:
        raise ValueError(f"search.kinds must list 'one-shot' and/or 'progressive', got {s.kinds}")
    for name, params in scorers.items():
        _validate_scorer(s, name, params)
    for section in ("scorer_kinds", "position_policy"):
        unknown = set(getattr(s, section)) - set(scorers)
        if unknown:
            raise ValueError(f"search.{section} names {sorted(unknown)}, which are not among the searched scorers {sorted(scorers)}")
    for name, kinds in s.scorer_kinds.items():
        if not isinstance(kinds, list) or not kinds or set(kinds) - set(KINDS):
            raise ValueError(f"search.scorer_kinds.{name} must list 'one-shot' and/or 'progressive', got {kinds!r}")
    for name, policy in s.position_policy.items():
        if policy not in POSITION_POLICIES:
            raise ValueError(f"search.position_policy.{name} must be one of {POSITION_POLICIES}, got {policy!r}")
    for key in ("stages", "layers", "keep"):
        if len(getattr(s, key)) != 2:
            raise ValueError(f"search.{key} is a [low, high] pair, got {getattr(s, key)}")
    if s.layers[0] is None:
        raise ValueError(f"search.layers [{s.layers[0]}, {s.layers[1]}]: the first drop layer must be a number")
    lo, hi = s.stages
    progressive = any("progressive" in scorer_kinds(s, n) for n in scorers)
    if progressive and not (2 <= lo <= hi):
        raise ValueError(f"search.stages [{lo}, {hi}] must satisfy 2 <= min <= max for progressive schedules")
    if not all(isinstance(k, Real) and not isinstance(k, bool) for k in s.keep) or not 0.0 <= s.keep[0] <= s.keep[1] <= 1.0:
        raise ValueError(f"search.keep {s.keep} must be a range inside [0, 1]")
    for name in scorers:  # e.g. v2drop or fastv need the layer before the drop layer
        try:
            _build(name, {}).check_layer(s.layers[0])
        except ValueError as err:
            raise ValueError(f"search.layers starts at {s.layers[0]}, but {err}") from None
    expand_presets(cfg.enqueue_presets)
    if depth is None:
        return
    first, last = layer_range(s, depth)
    if not 0 <= first <= last < depth:
        raise ValueError(f"search.layers [{first}, {last}] must lie within the model's {depth} layers (0..{depth - 1}) and not be empty")
    if progressive and last - first + 1 < lo:
        raise ValueError(f"search.layers [{first}, {last}] has fewer layers than the {lo} stages asked for")


def _build(name: str, kwargs: dict):
    """``build_scorer`` (an unknown name is an error listing the registered ones)."""
    from v2drop.scorers import build_scorer

    return build_scorer(name, **kwargs)


def _validate_scorer(space: SearchSpace, name: str, params: Any) -> None:
    """One ``search.scorers`` entry: a registered scorer, its own parameters, each choice valid."""
    from v2drop.scorers import SCORERS

    cls = SCORERS.get(name)  # unknown scorer: error listing the registered ones
    if not isinstance(params or {}, dict) or any(not isinstance(c, list) or not c for c in (params or {}).values()):
        raise ValueError(f"search.scorers.{name} must map each parameter to a non-empty list of choices, got {params!r}")
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for param, choices in (params or {}).items():
        if param not in fields:
            raise ValueError(f"search.scorers.{name}: scorer {name!r} has no parameter {param!r}; valid parameters: {', '.join(sorted(fields)) or '(none)'}")
        for choice in choices:
            try:
                _build(name, {param: choice})
            except (ValueError, TypeError) as err:
                raise ValueError(f"search.scorers.{name}.{param}: the choice {choice!r} is invalid: {err}") from None


def layer_range(space: SearchSpace, depth: int) -> tuple[int, int]:
    """The first and last drop layer a trial may choose (``None`` as last = the model's last layer)."""
    return space.layers[0], (space.layers[1] if space.layers[1] is not None else depth - 1)


def suggest_method(trial, space: SearchSpace, depth: int) -> Method:
    """Map an ``optuna.Trial``'s suggestions onto a Method (the enqueued ``none`` trial suggests nothing)."""
    if trial.user_attrs.get("label") == "none":
        return Method.none()
    scorers = resolve_scorers(space)
    scorer = trial.suggest_categorical("scorer", list(scorers))
    kwargs = {p: trial.suggest_categorical(f"{scorer}.{p}", list(choices)) for p, choices in scorers[scorer].items()}
    kind = trial.suggest_categorical(kind_param(space, scorer), scorer_kinds(space, scorer))
    first, last = layer_range(space, depth)
    n = 1 if kind == "one-shot" else trial.suggest_int("stages", space.stages[0], min(space.stages[1], last - first + 1))
    layers, keeps, low = [], [], first
    for i in range(n):
        layer = trial.suggest_int(f"layer_{i}", low, last - (n - 1 - i))
        layers.append(layer)
        keeps.append(trial.suggest_float(f"keep_{i}", float(space.keep[0]), float(space.keep[1])))
        low = layer + 1
    policy = space.position_policy.get(scorer, "preserve")
    return Method(scorer, schedule=Schedule.progressive(layers, keeps), position_policy=policy, **kwargs)


def relative(method: Method) -> Method:
    """``method`` with its schedule as relative keep fractions (absolute presets count of 576 tokens)."""
    if method.schedule.keep_mode == "relative":
        return method
    data = method.to_dict()
    data["schedule"] = method.schedule.to_relative(PRESET_VISION_TOKENS).to_dict()
    return Method.from_dict(data)


def method_params(method: Method, space: SearchSpace) -> dict:
    """The trial parameters that reproduce ``method`` (for enqueueing presets)."""
    method = relative(method)
    name = method.scorer_name
    params: dict[str, Any] = {"scorer": name, kind_param(space, name): "one-shot" if method.schedule.is_one_shot else "progressive"}
    for p in resolve_scorers(space).get(name) or {}:
        params[f"{name}.{p}"] = getattr(method.scorer, p)
    if not method.schedule.is_one_shot:
        params["stages"] = len(method.schedule.stages)
    for i, stage in enumerate(method.schedule.stages):
        params[f"layer_{i}"] = stage.layer
        params[f"keep_{i}"] = min(max(stage.keep, space.keep[0]), space.keep[1])
    return params


def fits(method: Method, space: SearchSpace, depth: int) -> bool:
    """True when a trial of ``space`` can reproduce ``method`` (scorer, parameter values, kind, stage count, layers, positions)."""
    scorers = resolve_scorers(space)
    name = method.scorer_name
    if name not in scorers:
        return False
    if any(getattr(method.scorer, p) not in choices for p, choices in scorers[name].items()):
        return False
    if method.position_policy != space.position_policy.get(name, "preserve"):
        return False
    layers = method.schedule.layers
    first, last = layer_range(space, depth)
    kind = "one-shot" if method.schedule.is_one_shot else "progressive"
    return kind in scorer_kinds(space, name) and all(first <= layer <= last for layer in layers) and (
        kind == "one-shot" or space.stages[0] <= len(layers) <= space.stages[1])
