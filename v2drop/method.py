"""A method = a scorer (with its parameters) + a drop schedule + a position policy.

Methods are immutable values: two methods with the same scorer (registered name and
parameters), schedule, position policy and reference depth are equal, and
``Method.from_dict(m.to_dict()) == m``. Named presets ship with the package
(``v2drop.presets``: ``list_presets``, ``get_preset``, ``find_presets``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from v2drop.presets import IDENTITY_KEYS, get_preset, list_presets
from v2drop.schedule import Schedule
from v2drop.scorers import SCORERS, Scorer, build_scorer
from v2drop.scorers.base import scorer_params

POSITION_POLICIES = ("preserve", "renumber")
_METHOD_KEYS = {"scorer", "schedule", "position_policy", "reference_depth", "description"}


class Method:
    """What to drop, where and how: the object every entry point passes to the engine.

    Parameters
    ----------
    scorer : str or Scorer or None
        A registered scorer name (see ``v2drop.list_scorers()``), an instance of a registered
        scorer class, or None / ``"none"`` for no dropping.
    schedule : Schedule or dict or None
        Drop stages; None means no dropping.
    position_policy : {"preserve", "renumber"}
        ``preserve`` (default): kept tokens keep their original position ids and decoding
        continues the unpruned numbering; ``renumber``: contiguous positions after each drop
        (official PDrop behaviour).
    reference_depth : int, optional
        Decoder depth the schedule was written for (presets set it); ``rescaled`` uses it.
    **scorer_kwargs
        The scorer's parameters, e.g. ``metric="l1"`` for ``v2drop``.
    """

    __slots__ = ("scorer_name", "scorer", "schedule", "position_policy", "reference_depth")

    def __init__(
        self,
        scorer: str | Scorer | None = "v2drop",
        schedule: Schedule | dict | None = None,
        position_policy: str = "preserve",
        reference_depth: int | None = None,
        **scorer_kwargs: Any,
    ):
        if position_policy not in POSITION_POLICIES:
            raise ValueError(f"position_policy must be one of {POSITION_POLICIES}, got {position_policy!r}")
        if scorer in (None, "none"):
            if scorer_kwargs:
                raise ValueError(f"Method 'none' takes no scorer parameters, got {sorted(scorer_kwargs)}")
            name, instance = "none", None
        elif isinstance(scorer, Scorer):
            if scorer_kwargs:
                raise ValueError("Pass scorer parameters either in the Scorer instance or as kwargs, not both")
            name, instance = registered_name(type(scorer)), scorer
        else:
            name, instance = scorer, build_scorer(scorer, **scorer_kwargs)
        schedule = schedule if isinstance(schedule, Schedule) else Schedule.from_dict(schedule)
        if instance is None and schedule.stages:
            raise ValueError("A schedule with stages needs a scorer; use scorer='random' or another registered name")
        if instance is not None:
            for s in schedule.stages:
                instance.check_layer(s.layer)
        _set = object.__setattr__  # the only writes a Method ever gets
        _set(self, "scorer_name", name)
        _set(self, "scorer", instance)
        _set(self, "schedule", schedule)
        _set(self, "position_policy", position_policy)
        _set(self, "reference_depth", reference_depth)

    def __setattr__(self, key, value):
        raise dataclasses.FrozenInstanceError(
            f"Method is immutable; cannot set {key!r} (build a new Method, or use rescaled())"
        )

    def __delattr__(self, key):
        raise dataclasses.FrozenInstanceError(f"Method is immutable; cannot delete {key!r}")

    def __reduce__(self):
        # __slots__ + a blocking __setattr__: pickle (Lightning's spawn strategies) rebuilds from config data
        return (Method.from_dict, (self.to_dict(),))

    def _key(self) -> tuple:
        return (self.scorer_name, scorer_params(self.scorer), self.schedule, self.position_policy, self.reference_depth)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Method):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        # scorer parameters may be unhashable (lists); equal methods still hash equal without them
        return hash((self.scorer_name, self.schedule, self.position_policy, self.reference_depth))

    @classmethod
    def none(cls) -> Method:
        """No dropping: the unmodified model."""
        return cls(scorer=None)

    @property
    def drops(self) -> bool:
        """True when the method drops any token."""
        return self.scorer is not None and bool(self.schedule.stages)

    @property
    def stochastic(self) -> bool:
        """True when the method drops and its scorer draws at random (the scorer class sets ``stochastic = True``)."""
        return self.drops and bool(getattr(self.scorer, "stochastic", False))

    def seeded(self, seed: int) -> Method:
        """The same method with its stochastic scorer's ``seed`` set (another run key per seed); a deterministic method
        is a ValueError."""
        if not self.stochastic:
            raise ValueError(f"scorer {self.scorer_name!r} is deterministic: it has no seed to set")
        data = self.to_dict()
        data["scorer"] = {**data["scorer"], "seed": int(seed)}
        return Method.from_dict(data)

    # -- config data ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> Method:
        """Build from config data: ``{scorer: {name: v2drop, metric: l2}, schedule: {...}, ...}``."""
        if not isinstance(data, dict):
            raise ValueError(f"Method config data must be a mapping with keys {sorted(_METHOD_KEYS)}, got {data!r}")
        unknown = set(data) - _METHOD_KEYS
        if unknown:
            raise ValueError(f"Unknown method keys {sorted(unknown)}; valid keys: {sorted(_METHOD_KEYS)}")
        scorer = data.get("scorer", "none")
        kwargs: dict[str, Any] = {}
        if isinstance(scorer, dict):
            kwargs = {k: v for k, v in scorer.items() if k != "name"}
            scorer = scorer.get("name", "none")
        return cls(
            scorer=scorer,
            schedule=data.get("schedule"),
            position_policy=data.get("position_policy", "preserve"),
            reference_depth=data.get("reference_depth"),
            **kwargs,
        )

    def to_dict(self) -> dict:
        """Plain config data (inverse of ``from_dict``)."""
        scorer: Any = "none"
        if self.scorer is not None:
            scorer = {"name": self.scorer_name, **scorer_params(self.scorer)}
        return {
            "scorer": scorer,
            "schedule": self.schedule.to_dict(),
            "position_policy": self.position_policy,
            "reference_depth": self.reference_depth,
        }

    @classmethod
    def from_preset(cls, name: str, depth: int | None = None) -> Method:
        """Load a named preset (see ``list_presets()``) or a YAML file, rescaled to ``depth`` if given."""
        method = cls.from_dict(_method_data(name))
        return method.rescaled(depth) if depth is not None else method

    @classmethod
    def resolve(cls, spec: str | dict | Method | None, depth: int | None = None) -> Method:
        """A Method from a preset name, a YAML path, config data, ``"none"`` or a Method."""
        if spec is None or spec == "none":
            return cls.none()
        if isinstance(spec, Method):
            return spec.rescaled(depth) if depth is not None else spec
        if isinstance(spec, dict):
            method = cls.from_dict(spec)
            return method.rescaled(depth) if depth is not None else method
        return cls.from_preset(spec, depth)

    def rescaled(self, depth: int) -> Method:
        """A new method with stage layers moved proportionally to a model of ``depth`` layers (or this one if nothing
        moves).
        """
        if self.reference_depth in (None, depth) or not self.schedule.stages:
            return self
        return Method(self.scorer, self.schedule.rescaled(self.reference_depth, depth), self.position_policy, depth)

    def __repr__(self) -> str:
        return f"Method(scorer={self.scorer!r}, schedule={self.schedule!r}, position_policy={self.position_policy!r})"


def registered_name(cls: type) -> str:
    """The name ``cls`` is registered under in ``v2drop.scorers.SCORERS``; an unregistered class is an error."""
    for name in SCORERS.names():
        if SCORERS.get(name) is cls:
            return name
    raise ValueError(
        f"Scorer class {cls.__qualname__} is not registered, so a Method using it could not be saved and loaded; "
        f"register it with @register_scorer('<name>') (registered scorers: {', '.join(SCORERS.names())})"
    )


# -- presets -----------------------------------------------------------------------------------
def _method_data(name: str) -> dict:
    """Method config data of a preset name or a YAML path (a preset's identity keys left out).

    A bare schedule file becomes ``{schedule: ...}``.
    """
    from v2drop.config import read_yaml

    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        return get_preset(name).data
    data = read_yaml(path, what="method")
    if "stages" in data:
        data = {"schedule": data}
    return {k: v for k, v in data.items() if k not in IDENTITY_KEYS}


def resolve_method(method: str, schedule: str | None = None, scorer_args: dict | None = None) -> Method:
    """A Method from a command line's method (scorer, preset, YAML or ``none``), schedule and scorer parameters."""
    scorer_args = scorer_args or {}
    if method == "none":
        if schedule:
            raise ValueError("--method none drops nothing; leave out --schedule")
        return Method.none()
    if method not in SCORERS:
        if method in list_presets() or method.endswith((".yaml", ".yml")):
            data = _method_data(method)
            if schedule:
                data["schedule"] = _method_data(schedule).get("schedule")
            if scorer_args:
                scorer = data.get("scorer")
                data["scorer"] = {**(scorer if isinstance(scorer, dict) else {"name": scorer}), **scorer_args}
            return Method.from_dict(data)
        SCORERS.get(method)  # raises, listing the scorers
    if not schedule:
        raise ValueError(
            f"--method {method} needs --schedule (a preset name or YAML file); presets: {', '.join(list_presets())}"
        )
    data = _method_data(schedule)
    preset_scorer = data.get("scorer")
    preset_args = {}
    if isinstance(preset_scorer, dict) and preset_scorer.get("name") == method:
        preset_args = {k: v for k, v in preset_scorer.items() if k != "name"}
    data["scorer"] = {"name": method, **preset_args, **scorer_args}
    return Method.from_dict(data)
