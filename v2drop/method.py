"""A method = a scorer (with its parameters) + a drop schedule + a position policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from v2drop.schedule import Schedule
from v2drop.scorers import Scorer, build_scorer

POSITION_POLICIES = ("preserve", "renumber")
PRESET_DIRS = [Path(__file__).resolve().parent.parent / "configs" / "presets"]
_METHOD_KEYS = {"scorer", "schedule", "position_policy", "reference_depth", "description"}


class Method:
    """What to drop, where and how: the object every entry point passes to the engine.

    Parameters
    ----------
    scorer : str or Scorer or None
        A registered scorer name (see ``v2drop.list_scorers()``), a scorer instance, or None /
        ``"none"`` for no dropping.
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
            self.scorer_name, self.scorer = "none", None
        elif isinstance(scorer, Scorer):
            if scorer_kwargs:
                raise ValueError("Pass scorer parameters either in the Scorer instance or as kwargs, not both")
            self.scorer_name, self.scorer = type(scorer).__name__, scorer
        else:
            self.scorer_name, self.scorer = scorer, build_scorer(scorer, **scorer_kwargs)
        self.schedule = Schedule.from_dict(schedule) if not isinstance(schedule, Schedule) else schedule
        if self.scorer is None and self.schedule.stages:
            raise ValueError("A schedule with stages needs a scorer; use scorer='random' or another registered name")
        if self.scorer is not None:
            for s in self.schedule.stages:
                self.scorer.check_layer(s.layer)
        self.position_policy = position_policy
        self.reference_depth = reference_depth

    @classmethod
    def none(cls) -> "Method":
        """No dropping: the unmodified model."""
        return cls(scorer=None)

    @property
    def drops(self) -> bool:
        """True when the method drops any token."""
        return self.scorer is not None and bool(self.schedule.stages)

    # -- config data ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "Method":
        """Build from config data: ``{scorer: {name: v2drop, metric: l2}, schedule: {...}, ...}``."""
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
            scorer = {"name": self.scorer_name, **_fields(self.scorer)}
        return {
            "scorer": scorer,
            "schedule": self.schedule.to_dict(),
            "position_policy": self.position_policy,
            "reference_depth": self.reference_depth,
        }

    @classmethod
    def from_preset(cls, name: str, depth: int | None = None) -> "Method":
        """Load a named preset from ``configs/presets`` (or a YAML path), rescaled to ``depth`` if given."""
        path = Path(name)
        if not (path.suffix in (".yaml", ".yml") and path.exists()):
            path = _preset_path(name)
        data = yaml.safe_load(path.read_text()) or {}
        method = cls.from_dict(data)
        return method.rescaled(depth) if depth is not None else method

    @classmethod
    def resolve(cls, spec: "str | dict | Method | None", depth: int | None = None) -> "Method":
        """A Method from a preset name, a YAML path, config data, ``"none"`` or a Method."""
        if spec is None or spec == "none":
            return cls.none()
        if isinstance(spec, Method):
            return spec.rescaled(depth) if depth is not None else spec
        if isinstance(spec, dict):
            method = cls.from_dict(spec)
            return method.rescaled(depth) if depth is not None else method
        return cls.from_preset(spec, depth)

    def rescaled(self, depth: int) -> "Method":
        """This method with stage layers moved proportionally to a model of ``depth`` layers."""
        if self.reference_depth in (None, depth) or not self.schedule.stages:
            return self
        new = object.__new__(Method)
        new.__dict__.update(self.__dict__)
        new.schedule = self.schedule.rescaled(self.reference_depth, depth)
        new.reference_depth = depth
        return new

    def __repr__(self) -> str:
        return f"Method(scorer={self.scorer!r}, schedule={self.schedule!r}, position_policy={self.position_policy!r})"


def list_presets() -> list[str]:
    """Sorted names of the YAML presets in ``configs/presets``."""
    return sorted({p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.yaml")})


def resolve_method(method: str, schedule: str | None = None, scorer_args: dict | None = None) -> Method:
    """A Method from a command line's method (scorer, preset, YAML or ``none``), schedule and scorer parameters."""
    from v2drop.scorers import SCORERS

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
        raise ValueError(f"--method {method} needs --schedule (a preset name or YAML file); presets: {', '.join(list_presets())}")
    data = _method_data(schedule)
    preset_scorer = data.get("scorer")
    preset_args = {}
    if isinstance(preset_scorer, dict) and preset_scorer.get("name") == method:
        preset_args = {k: v for k, v in preset_scorer.items() if k != "name"}
    data["scorer"] = {"name": method, **preset_args, **scorer_args}
    return Method.from_dict({k: v for k, v in data.items() if k != "description"})


def _method_data(name: str) -> dict:
    """Config data of a preset name or YAML path."""
    path = Path(name)
    if not path.exists():
        path = _preset_path(name)
    data = yaml.safe_load(path.read_text()) or {}
    if "stages" in data:  # a bare schedule file
        data = {"schedule": data}
    data.pop("description", None)
    return data


def _preset_path(name: str) -> Path:
    for d in PRESET_DIRS:
        if (d / f"{name}.yaml").exists():
            return d / f"{name}.yaml"
    raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(list_presets()) or '(none)'}")


def _fields(scorer: Scorer) -> dict:
    import dataclasses

    return {f.name: getattr(scorer, f.name) for f in dataclasses.fields(scorer)} if dataclasses.is_dataclass(scorer) else {}
