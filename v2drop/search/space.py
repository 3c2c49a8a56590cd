"""The search space: checking it against a model, mapping trial suggestions onto a Method and back.

A trial first chooses the scorer (parameter ``scorer``), then that scorer's own parameters
(``<scorer>.<parameter>``; a choice that is not a plain value, e.g. a composite's list of parts,
is named by a label such as ``v2drop+dart``), the weights of a composite's parts when
``search.weights`` names it (``<scorer>.weights.<part>``, normalised to sum 1), its schedule kind
(``kind``, or ``<scorer>.kind`` for a scorer with its own kinds in ``search.scorer_kinds``), then
the stages: ``keep_pre_llm`` for a stage before the LLM, ``stages``, ``layer_i``, ``keep_i`` for
the decoder stages, ``vision_layer`` and ``keep_vision`` for a stage inside the vision encoder.
Parameters that only some scorers have are therefore conditional: they exist
in the trials that chose their scorer (``docs/sweeps.md``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from fnmatch import fnmatch
from numbers import Real
from typing import Any

from v2drop.method import POSITION_POLICIES, Method
from v2drop.schedule import MAX_TOWER_LAYERS, PRE_LLM, VISION, Schedule, vision_layer
from v2drop.search.config import OBJECTIVES, SAMPLERS, SearchSpace, SweepConfig

# one-shot / progressive: decoder stages only; pre-llm: one stage before the LLM only; pre-llm+...: both;
# vision: one stage inside the vision encoder only; vision+one-shot: that stage, then one decoder stage (VScan)
KINDS = ("one-shot", "progressive", "pre-llm", "pre-llm+one-shot", "pre-llm+progressive", "vision", "vision+one-shot")
PRE_LLM_KEEP = "keep_pre_llm"  # the trial parameter holding the pre-LLM stage's keep fraction
VISION_LAYER, VISION_KEEP = "vision_layer", "keep_vision"  # the trial parameters of a vision-encoder stage
ALL = ("all", "*")  # spellings of "every registered scorer"
PLAIN = (type(None), bool, int, float, str)  # the values Optuna stores as categorical choices
MAX_COMBINATIONS = 256  # parameter combinations checked one by one; larger spaces are checked one parameter at a time


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
            raise ValueError(
                f"search.scorers {spec!r}: give 'all' (or '*') or a mapping of scorer name -> {{parameter: [choices]}}"
            )
        spec = {"*": {}}
    if not isinstance(spec, dict):
        raise ValueError(
            f"search.scorers must be 'all' or a mapping of scorer name -> {{parameter: [choices]}}, got {spec!r}"
        )
    out: dict[str, dict[str, list]] = {}
    for name, params in spec.items():
        if name in ALL:
            if params:
                raise ValueError(
                    f"search.scorers.{name!r} means every scorer with its defaults; it takes no parameters, got "
                    f"{params!r}"
                )
            out.update(
                {n: {} for n in list_scorers() if not any(fnmatch(n, p) for p in space.exclude) and n not in out}
            )
        else:  # an explicit entry wins over the expansion
            out[name] = params if params is None or not isinstance(params, dict) else dict(params)
    return {name: ({} if params is None else params) for name, params in out.items()}


def scorer_kinds(space: SearchSpace, scorer: str) -> list[str]:
    """The schedule kinds a trial of ``scorer`` may choose: its own ``search.scorer_kinds`` entry, else
    ``search.kinds``.
    """
    return list(space.scorer_kinds.get(scorer) or space.kinds)


def kind_param(space: SearchSpace, scorer: str) -> str:
    """The Optuna parameter holding the kind: ``<scorer>.kind`` for scorers with their own kinds, else ``kind``."""
    return f"{scorer}.kind" if scorer in space.scorer_kinds else "kind"


def kind_parts(kind: str) -> tuple[bool, str | None]:
    """(whether ``kind`` starts with a pre-LLM stage, its decoder part: ``one-shot``, ``progressive`` or None).

    The ``vision`` kinds have no pre-LLM stage (their encoder stage: ``kind.startswith("vision")``).
    """
    if kind.startswith("vision"):
        return False, kind[len("vision") :].lstrip("+") or None
    pre = kind.startswith("pre-llm")
    decoder = kind[len("pre-llm") :].lstrip("+") if pre else kind
    return pre, decoder or None


def schedule_kind(schedule: Schedule) -> str:
    """The kind of ``schedule`` (one of ``KINDS``), or ``none`` when it has no stage; ``vision+...`` when it has
    vision-encoder stages and others, which no trial draws."""
    vision = len(schedule.vision_stages)
    if vision:
        rest = Schedule(schedule.stages[vision:])
        if vision == 1:
            return "vision" if not rest.stages else f"vision+{schedule_kind(rest)}"
        return f"vision{vision}+{schedule_kind(rest)}"
    pre = schedule.pre_llm is not None
    decoder = {0: None, 1: "one-shot"}.get(len(schedule.stages) - pre, "progressive")
    if not pre:
        return decoder or "none"
    return "pre-llm" if decoder is None else f"pre-llm+{decoder}"


def choice_label(value: Any) -> Any:
    """How a parameter choice appears in the study: plain values as they are, scorer specs by name.

    ``{name: visionzip}`` -> ``visionzip``; ``{name: v2drop, metric: l1}`` -> ``v2drop(metric=l1)``;
    a list of parts -> the parts' labels joined by ``+`` (``v2drop+dart``); anything else as JSON.
    """
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, dict) and "name" in value:
        rest = ", ".join(f"{k}={choice_label(v)}" for k, v in value.items() if k != "name")
        return f"{value['name']}({rest})" if rest else str(value["name"])
    if isinstance(value, (list, tuple)):
        return "+".join(str(choice_label(v)) for v in value)
    return json.dumps(value, sort_keys=True, default=str)


def param_choices(scorer: str, param: str, choices: list) -> list:
    """The Optuna choices of ``<scorer>.<param>``: the choices themselves if plain values, else their unique labels."""
    if all(isinstance(c, PLAIN) for c in choices):
        return list(choices)
    labels = [str(choice_label(c)) for c in choices]
    if len(set(labels)) != len(labels):
        raise ValueError(
            f"search.scorers.{scorer}.{param}: the choices {labels} share a label; give choices that differ in "
            "scorer names or parameters"
        )
    return labels


def normalise_weights(weights: list[float]) -> list[float]:
    """Weights scaled to sum 1 (equal weights when they are all 0)."""
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)


def _value(scorer: str, param: str, choice: Any) -> Any:
    """A choice as the scorer stores it (defaults filled in, e.g. a part given by name becomes its full config)."""
    return getattr(_build(scorer, {param: choice}), param)


def _without_weights(value: Any) -> Any:
    """A list of parts with the ``weight`` keys left out (for comparing parts whose weights are searched)."""
    if isinstance(value, list):
        return [{k: v for k, v in p.items() if k != "weight"} if isinstance(p, dict) else p for p in value]
    return value


def _match(space: SearchSpace, scorer: str, param: str, choices: list, actual: Any) -> int | None:
    """Index of the choice equal to ``actual`` (a Method's parameter value), or None."""
    same = _without_weights if param == "parts" and scorer in space.weights else (lambda v: v)
    for i, choice in enumerate(choices):
        if same(_value(scorer, param, choice)) == same(actual):
            return i
    return None


def _parts(scorer: str, kwargs: dict) -> list[dict]:
    """The parts (normalised config data, without weights) a trial of a weighted scorer combines."""
    return _without_weights(_value(scorer, "parts", kwargs.get("parts")))


def expand_presets(patterns: list[str]) -> list[str]:
    """Preset names matching each of ``patterns`` (fnmatch, in order, without repeats); a pattern matching none is an
    error.
    """
    from v2drop.presets import list_presets

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
    searched weights, the per-scorer kinds (every parameter combination can run each of its
    kinds' stages: before the LLM, at the first drop layer) and position policies, the stage,
    layer and keep ranges, the presets.
    """
    for name in cfg.objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"Unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    if len(set(cfg.objectives)) != len(cfg.objectives) or not cfg.objectives:
        raise ValueError(f"objectives must be a non-empty list without repeats, got {cfg.objectives}")
    from v2drop.search.served import check_served

    check_served(cfg.objectives)
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {cfg.sampler!r}; choose from {SAMPLERS}")
    s = cfg.search
    scorers = resolve_scorers(s)
    if not scorers:
        raise ValueError(
            "search.scorers is empty (or 'all' minus search.exclude left nothing): name at least one scorer"
        )
    if not s.kinds or set(s.kinds) - set(KINDS):
        raise ValueError(f"search.kinds must list kinds from {list(KINDS)}, got {s.kinds}")
    for name, params in scorers.items():
        _validate_scorer(s, name, params)
    for section in ("scorer_kinds", "position_policy", "weights"):
        unknown = set(getattr(s, section)) - set(scorers)
        if unknown:
            raise ValueError(
                f"search.{section} names {sorted(unknown)}, which are not among the searched scorers {sorted(scorers)}"
            )
    for name, kinds in s.scorer_kinds.items():
        if not isinstance(kinds, list) or not kinds or set(kinds) - set(KINDS):
            raise ValueError(f"search.scorer_kinds.{name} must list kinds from {list(KINDS)}, got {kinds!r}")
    for name, policy in s.position_policy.items():
        if policy not in POSITION_POLICIES:
            raise ValueError(f"search.position_policy.{name} must be one of {POSITION_POLICIES}, got {policy!r}")
    for name, bounds in s.weights.items():
        _validate_weights(name, bounds, scorers[name])
    for key in ("stages", "layers", "keep"):
        if len(getattr(s, key)) != 2:
            raise ValueError(f"search.{key} is a [low, high] pair, got {getattr(s, key)}")
    if s.layers[0] is None:
        raise ValueError(f"search.layers [{s.layers[0]}, {s.layers[1]}]: the first drop layer must be a number")
    v = s.vision_layers
    if (
        not isinstance(v, list)
        or len(v) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        or not 0 <= v[0] <= v[1] < MAX_TOWER_LAYERS
    ):
        raise ValueError(
            f"search.vision_layers must be a [first, last] pair of encoder layers with 0 <= first <= last < "
            f"{MAX_TOWER_LAYERS}, got {v!r}"
        )
    lo, hi = s.stages
    progressive = any(kind_parts(k)[1] == "progressive" for n in scorers for k in scorer_kinds(s, n))
    if progressive and not (2 <= lo <= hi):
        raise ValueError(f"search.stages [{lo}, {hi}] must satisfy 2 <= min <= max for progressive schedules")
    if (
        not all(isinstance(k, Real) and not isinstance(k, bool) for k in s.keep)
        or not 0.0 <= s.keep[0] <= s.keep[1] <= 1.0
    ):
        raise ValueError(f"search.keep {s.keep} must be a range inside [0, 1]")
    for name, params in scorers.items():
        _check_stages(s, name, params)
    expand_presets(cfg.enqueue_presets)
    if depth is None:
        return
    first, last = layer_range(s, depth)
    if not 0 <= first <= last < depth:
        raise ValueError(
            f"search.layers [{first}, {last}] must lie within the model's {depth} layers (0..{depth - 1}) and not be "
            "empty"
        )
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
        raise ValueError(
            f"search.scorers.{name} must map each parameter to a non-empty list of choices, got {params!r}"
        )
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for param, choices in (params or {}).items():
        if param not in fields:
            raise ValueError(
                f"search.scorers.{name}: scorer {name!r} has no parameter {param!r}; valid parameters: "
                f"{', '.join(sorted(fields)) or '(none)'}"
            )
        for choice in choices:
            try:
                _build(name, {param: choice})
            except (ValueError, TypeError) as err:
                raise ValueError(f"search.scorers.{name}.{param}: the choice {choice!r} is invalid: {err}") from None
        param_choices(name, param, choices)


def _validate_weights(name: str, bounds: Any, params: dict) -> None:
    """``search.weights.<name>``: a [low, high] range for a scorer made of parts with distinct names."""
    from v2drop.scorers import SCORERS

    cls = SCORERS.get(name)
    if "parts" not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(
            f"search.weights.{name}: scorer {name!r} has no 'parts' to weigh; weights apply to scorers built "
            "from parts, such as composite"
        )
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, Real) and not isinstance(b, bool) for b in bounds)
        or not 0.0 <= bounds[0] <= bounds[1]
        or bounds[1] == 0
    ):
        raise ValueError(
            f"search.weights.{name} must be a [low, high] range with 0 <= low <= high and high > 0, got {bounds!r}"
        )
    for choice in params.get("parts", [None]):
        names = [p["name"] for p in _parts(name, {"parts": choice})]
        if len(set(names)) != len(names):
            raise ValueError(
                f"search.weights.{name}: the parts {names} repeat a scorer; each part's weight is the parameter "
                f"{name}.weights.<part name>, so the parts of a weighted {name} must be different scorers"
            )


def _combinations(params: dict) -> list[dict]:
    """Every combination of a scorer's parameter choices, or each choice with the others at their first when there are
    many.
    """
    if math.prod(len(c) for c in params.values()) <= MAX_COMBINATIONS:
        return [dict(zip(params, combo)) for combo in itertools.product(*params.values())]
    first = {p: c[0] for p, c in params.items()}
    return [first] + [{**first, p: choice} for p, c in params.items() for choice in c[1:]]


def _check_stages(space: SearchSpace, name: str, params: dict) -> None:
    """Every parameter combination of ``name`` can run the stages of each of its kinds."""
    for kwargs in _combinations(params):
        scorer = _build(name, kwargs)
        chosen = "".join(f", {name}.{p}={choice_label(v)}" for p, v in kwargs.items())
        for kind in scorer_kinds(space, name):
            pre, decoder = kind_parts(kind)
            if kind.startswith("vision"):
                try:
                    scorer.check_layer(vision_layer(space.vision_layers[0]))
                except ValueError as err:
                    where = f"search.scorer_kinds.{name}" if name in space.scorer_kinds else "search.kinds"
                    raise ValueError(
                        f"{where}: kind {kind!r} has a stage inside the vision encoder at search.vision_layers "
                        f"{space.vision_layers}, but {err} ({name}{chosen})"
                    ) from None
            if pre:
                try:
                    scorer.check_layer(PRE_LLM)
                except ValueError as err:
                    where = f"search.scorer_kinds.{name}" if name in space.scorer_kinds else "search.kinds"
                    raise ValueError(
                        f"{where}: kind {kind!r} starts with a stage before the LLM, but {err} ({name}{chosen}); "
                        f"give {name} kinds without 'pre-llm' (one-shot, progressive)"
                    ) from None
            if decoder:
                try:
                    scorer.check_layer(space.layers[0])
                except ValueError as err:  # e.g. v2drop or fastv need the layer before the drop layer
                    raise ValueError(
                        f"search.layers starts at {space.layers[0]}, but {err} ({name}{chosen}, kind {kind!r})"
                    ) from None


def layer_range(space: SearchSpace, depth: int) -> tuple[int, int]:
    """The first and last drop layer a trial may choose (``None`` as last = the model's last layer)."""
    return space.layers[0], (space.layers[1] if space.layers[1] is not None else depth - 1)


def suggest_method(trial, space: SearchSpace, depth: int) -> Method:
    """Map an ``optuna.Trial``'s suggestions onto a Method (the enqueued ``none`` trial suggests nothing)."""
    if trial.user_attrs.get("label") == "none":
        return Method.none()
    scorers = resolve_scorers(space)
    scorer = trial.suggest_categorical("scorer", list(scorers))
    kwargs = {}
    for p, choices in scorers[scorer].items():
        options = param_choices(scorer, p, choices)
        kwargs[p] = choices[options.index(trial.suggest_categorical(f"{scorer}.{p}", options))]
    if scorer in space.weights:
        low, high = space.weights[scorer]
        parts = _parts(scorer, kwargs)
        weights = [trial.suggest_float(f"{scorer}.weights.{part['name']}", float(low), float(high)) for part in parts]
        kwargs["parts"] = [{**part, "weight": w} for part, w in zip(parts, normalise_weights(weights))]
    kind = trial.suggest_categorical(kind_param(space, scorer), scorer_kinds(space, scorer))
    pre, decoder = kind_parts(kind)
    first, last = layer_range(space, depth)
    keep = float(space.keep[0]), float(space.keep[1])
    layers, keeps = ([PRE_LLM], [trial.suggest_float(PRE_LLM_KEEP, *keep)]) if pre else ([], [])
    if kind.startswith("vision"):
        layers.append(vision_layer(trial.suggest_int(VISION_LAYER, *space.vision_layers)))
        keeps.append(trial.suggest_float(VISION_KEEP, *keep))
    if decoder == "progressive":
        n = trial.suggest_int("stages", space.stages[0], min(space.stages[1], last - first + 1))
    else:
        n = 1 if decoder == "one-shot" else 0
    low = first
    for i in range(n):
        layer = trial.suggest_int(f"layer_{i}", low, last - (n - 1 - i))
        layers.append(layer)
        keeps.append(trial.suggest_float(f"keep_{i}", *keep))
        low = layer + 1
    policy = space.position_policy.get(scorer, "preserve")
    schedule = Schedule.progressive(layers, keeps)
    if kind.startswith("vision") and space.tower_reference is not None:
        schedule = Schedule(schedule.stages, tower_reference=space.tower_reference)
    return Method(scorer, schedule=schedule, position_policy=policy, **kwargs)


def preset_method(name: str, depth: int) -> Method:
    """Preset ``name`` at ``depth`` layers, its keep values as relative fractions (as trials suggest them).

    Absolute keep counts become fractions of the preset's own ``reference_vision_tokens``.
    """
    from v2drop.presets import get_preset

    preset = get_preset(name)
    method = preset.method(depth)
    if method.schedule.keep_mode == "relative":
        return method
    data = method.to_dict()
    data["schedule"] = method.schedule.to_relative(preset.reference_vision_tokens).to_dict()
    return Method.from_dict(data)


def _weights(method: Method) -> dict[str, float]:
    """``{part name: weight}`` of a method whose scorer has parts, normalised to sum 1."""
    parts = method.scorer.parts
    return dict(zip((p["name"] for p in parts), normalise_weights([p.get("weight", 1.0) for p in parts])))


def method_params(method: Method, space: SearchSpace) -> dict:
    """The trial parameters that reproduce ``method`` (for enqueueing presets; weights normalised, keeps clipped).

    ``method`` keeps relative fractions, as trials do (``preset_method`` gives a preset so).
    """
    if method.schedule.keep_mode != "relative":
        raise ValueError(
            f"method_params needs relative keep fractions, got a {method.schedule.keep_mode} schedule; "
            "convert it with Schedule.to_relative(vision_tokens) or load a preset with preset_method(name, depth)"
        )
    name = method.scorer_name
    params: dict[str, Any] = {"scorer": name, kind_param(space, name): schedule_kind(method.schedule)}
    for p, choices in (resolve_scorers(space).get(name) or {}).items():
        actual = getattr(method.scorer, p)
        i = _match(space, name, p, choices, actual)
        params[f"{name}.{p}"] = param_choices(name, p, choices)[i] if i is not None else choice_label(actual)
    if name in space.weights:
        low, high = space.weights[name]
        params.update({f"{name}.weights.{part}": min(max(w, low), high) for part, w in _weights(method).items()})
    clip = lambda keep: min(max(keep, space.keep[0]), space.keep[1])  # noqa: E731
    decoder = [s for s in method.schedule.stages if not s.pre_llm and not s.vision]
    if method.schedule.pre_llm is not None:
        params[PRE_LLM_KEEP] = clip(method.schedule.pre_llm.keep)
    for stage in method.schedule.vision_stages:
        params[VISION_LAYER] = stage.layer - VISION
        params[VISION_KEEP] = clip(stage.keep)
    if len(decoder) > 1:
        params["stages"] = len(decoder)
    for i, stage in enumerate(decoder):
        params[f"layer_{i}"] = stage.layer
        params[f"keep_{i}"] = clip(stage.keep)
    return params


def _defaults(scorer) -> list[tuple[str, Any, Any]]:
    """(parameter, value, default) of every scorer parameter that has a default."""
    out = []
    for f in dataclasses.fields(scorer) if dataclasses.is_dataclass(scorer) else ():
        if f.init and f.default is not dataclasses.MISSING:
            out.append((f.name, getattr(scorer, f.name), f.default))
        elif f.init and f.default_factory is not dataclasses.MISSING:
            out.append((f.name, getattr(scorer, f.name), f.default_factory()))
    return out


def fits(method: Method, space: SearchSpace, depth: int) -> bool:
    """True when a trial of ``space`` can reproduce ``method`` (scorer, parameter values, weights, kind, stage count,
    layers, positions).
    """
    scorers = resolve_scorers(space)
    name = method.scorer_name
    if name not in scorers:
        return False
    if any(_match(space, name, p, choices, getattr(method.scorer, p)) is None for p, choices in scorers[name].items()):
        return False
    if any(p not in scorers[name] and value != default for p, value, default in _defaults(method.scorer)):
        return False  # a setting the space does not search stays at its default in every trial
    if name in space.weights:
        low, high = space.weights[name]
        weights = _weights(method)
        if len(weights) != len(method.scorer.parts) or not all(
            low - 1e-9 <= w <= high + 1e-9 for w in weights.values()
        ):
            return False
    if method.position_policy != space.position_policy.get(name, "preserve"):
        return False
    kind = schedule_kind(method.schedule)
    layers = [s.layer for s in method.schedule.stages if not s.pre_llm and not s.vision]
    vision = [s.layer - VISION for s in method.schedule.vision_stages]
    first, last = layer_range(space, depth)
    return (
        kind in scorer_kinds(space, name)
        and all(first <= layer <= last for layer in layers)
        and all(space.vision_layers[0] <= layer <= space.vision_layers[1] for layer in vision)
        and (not vision or method.schedule.tower_reference == space.tower_reference)
        and (kind_parts(kind)[1] != "progressive" or space.stages[0] <= len(layers) <= space.stages[1])
    )
