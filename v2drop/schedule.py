"""Drop schedules: at which decoder layers vision tokens are dropped, and how many survive.

A schedule is plain data: ordered stages ``(layer, keep)``. Semantics (see ``docs/methods.md``):
"drop at layer l" removes tokens just before decoder layer ``l`` runs (0-based); layer ``-1``
(``PRE_LLM``, written ``pre_llm`` in YAML) is the pre-LLM stage, which runs on the projected
vision features (and the vision tower's own outputs) before the decoder, ahead of any stage at
layer 0. A stage at a vision-encoder layer (``vision:<l>`` in YAML) runs inside the vision tower,
just before encoder layer ``l`` (0-based) runs, on its input ``hidden_states[l]`` of every tower image;
it is stored as the layer ``VISION + l`` (below -1), so stages stay ordered: encoder stages, the
pre-LLM stage, decoder stages. A relative
keep fraction applies to the vision tokens still present at that stage, with at least
``min_keep`` surviving: ``count = max(min_keep, floor(n * keep))`` (never more than ``n``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

KEEP_MODES = ("relative", "cumulative", "absolute")
PRE_LLM = -1  # the stage layer of a pre-LLM stage: before decoder layer 0, on the projector output
VISION = -1000  # a stage before vision-encoder layer l is stored as the layer VISION + l (0 <= l < MAX_TOWER_LAYERS)
MAX_TOWER_LAYERS = 100
_LAYER_HELP = "a decoder layer index >= 0, 'pre_llm', or 'vision:<encoder layer>' (e.g. 'vision:2')"


def vision_layer(layer: int) -> int:
    """The stage layer of a stage before vision-encoder layer ``layer`` (0-based): ``VISION + layer``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < MAX_TOWER_LAYERS:
        raise ValueError(f"A vision-encoder stage layer is an int in [0, {MAX_TOWER_LAYERS - 1}], got {layer!r}")
    return VISION + layer


def is_vision_layer(layer: int) -> bool:
    """Whether a stage layer is a vision-encoder stage (``VISION <= layer < VISION + MAX_TOWER_LAYERS``)."""
    return VISION <= layer < VISION + MAX_TOWER_LAYERS


def layer_name(layer: int) -> int | str:
    """A stage layer as config data writes it: ``vision:<l>`` for an encoder stage, else the int."""
    return f"vision:{layer - VISION}" if is_vision_layer(layer) else layer


def stage_layer(value) -> int:
    """A stage layer from config data: an int >= 0, ``"pre_llm"`` / -1, or ``"vision:<l>"`` (an encoder layer)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "pre_llm":
            return PRE_LLM
        if text.startswith("vision:"):
            try:
                return vision_layer(int(text[len("vision:") :]))
            except ValueError:
                raise ValueError(f"A stage layer is {_LAYER_HELP}, got {value!r}") from None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"A stage layer is {_LAYER_HELP}, got {value!r}") from None
    if isinstance(value, bool) or int(value) != value or value < PRE_LLM and not is_vision_layer(int(value)):
        raise ValueError(f"A stage layer is {_LAYER_HELP}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Stage:
    """One drop stage: before decoder ``layer`` runs (``PRE_LLM`` = -1: before the decoder; ``VISION + l``: before
    vision-encoder layer ``l``), keep ``keep`` of the vision tokens.
    """

    layer: int
    keep: float

    def __post_init__(self):
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            object.__setattr__(self, "layer", stage_layer(self.layer))  # "pre_llm" -> -1

    @property
    def pre_llm(self) -> bool:
        """True for the pre-LLM stage (layer ``PRE_LLM``)."""
        return self.layer == PRE_LLM

    @property
    def vision(self) -> bool:
        """True for a vision-encoder stage (``vision:<l>``)."""
        return is_vision_layer(self.layer)


@dataclass(frozen=True)
class Schedule:
    """Ordered drop stages plus how to read their ``keep`` values.

    Parameters
    ----------
    stages : tuple of Stage
        Stage layers strictly increase; an empty tuple means no dropping.
    keep_mode : {"relative", "cumulative", "absolute"}
        ``relative`` (default): fraction of the vision tokens present at that stage;
        ``cumulative``: fraction of the original vision tokens; ``absolute``: a token count.
    min_keep : int
        Vision tokens that always survive a stage (1, as in the official V²Drop code).
    tower_reference : int or None
        For vision-encoder stages: the ``hidden_states`` index of the feature-selection layer of the
        tower they were written for (23 for LLaVA-1.5's 24-layer CLIP read at layer -2); on another
        tower the engine moves them proportionally (``fit_tower``). None: the layers are used as given.
    """

    stages: tuple[Stage, ...] = ()
    keep_mode: str = "relative"
    min_keep: int = 1
    tower_reference: int | None = None

    def __post_init__(self):
        stages = tuple(s if isinstance(s, Stage) else Stage(stage_layer(s[0]), float(s[1])) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if self.keep_mode not in KEEP_MODES:
            raise ValueError(f"keep_mode must be one of {KEEP_MODES}, got {self.keep_mode!r}")
        if not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise ValueError(f"min_keep must be a non-negative integer, got {self.min_keep!r}")
        if self.tower_reference is not None and (
            isinstance(self.tower_reference, bool)
            or not isinstance(self.tower_reference, int)
            or self.tower_reference < 1
        ):
            raise ValueError(
                f"tower_reference must be a positive int (a hidden_states index of the vision tower), got "
                f"{self.tower_reference!r}"
            )
        for i, stage in enumerate(stages):
            if stage.layer < PRE_LLM and not stage.vision:
                raise ValueError(
                    f"Stage {i}: layer must be >= 0, -1 ('pre_llm') for the pre-LLM stage, or 'vision:<l>' for a "
                    f"vision-encoder stage, got {stage.layer}"
                )
            if i and stage.layer <= stages[i - 1].layer:
                layers = [layer_name(s.layer) for s in stages]
                raise ValueError(f"Stage layers must strictly increase, got {layers}")
            if self.keep_mode == "absolute":
                if stage.keep < 0 or stage.keep != int(stage.keep):
                    raise ValueError(
                        f"Stage {i} (layer {stage.layer}): absolute keep must be a count >= 0, got {stage.keep}"
                    )
            elif not 0.0 <= stage.keep <= 1.0:
                raise ValueError(f"Stage {i} (layer {stage.layer}): keep fraction must be in [0, 1], got {stage.keep}")
        if self.keep_mode == "cumulative":
            keeps = [s.keep for s in stages]
            if any(b > a for a, b in zip(keeps, keeps[1:])):
                raise ValueError(f"Cumulative keep fractions cannot grow from stage to stage, got {keeps}")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def none(cls) -> Schedule:
        """A schedule that drops nothing."""
        return cls(())

    @classmethod
    def one_shot(cls, layer: int, keep: float, keep_mode: str = "relative", min_keep: int = 1) -> Schedule:
        """A single drop stage at ``layer``."""
        return cls((Stage(layer, keep),), keep_mode, min_keep)

    @classmethod
    def progressive(
        cls, layers: Sequence[int], keeps: Sequence[float], keep_mode: str = "relative", min_keep: int = 1
    ) -> Schedule:
        """Several drop stages, one per layer in ``layers`` (``"pre_llm"`` or -1 for a pre-LLM first stage)."""
        if len(layers) != len(keeps):
            raise ValueError(f"Got {len(layers)} layers but {len(keeps)} keep values")
        return cls(tuple(Stage(stage_layer(l), float(k)) for l, k in zip(layers, keeps)), keep_mode, min_keep)

    @classmethod
    def from_dict(cls, data: dict | None) -> Schedule:
        """Build from config data: ``{"stages": [[layer, keep], ...], "keep_mode": ..., "min_keep": ...}`` (layer may be
        ``"pre_llm"`` or ``"vision:<l>"``).
        """
        if data is None:
            return cls.none()
        if isinstance(data, Schedule):
            return data
        unknown = set(data) - {"stages", "keep_mode", "min_keep", "tower_reference"}
        if unknown:
            raise ValueError(
                f"Unknown schedule keys {sorted(unknown)}; valid keys: stages, keep_mode, min_keep, tower_reference"
            )
        stages = []
        for s in data.get("stages") or ():
            if isinstance(s, dict):
                stages.append(Stage(stage_layer(s["layer"]), float(s["keep"])))
            else:
                if len(s) != 2:
                    raise ValueError(f"A stage is [layer, keep] (layer {_LAYER_HELP}), got {s!r}")
                stages.append(Stage(stage_layer(s[0]), float(s[1])))
        return cls(
            tuple(stages), data.get("keep_mode", "relative"), int(data.get("min_keep", 1)), data.get("tower_reference")
        )

    def to_dict(self) -> dict:
        """Plain config data (inverse of ``from_dict``); the pre-LLM stage's layer is written as -1, an encoder stage's
        as ``"vision:<l>"``.
        """
        return {
            "stages": [[layer_name(s.layer), s.keep] for s in self.stages],
            "keep_mode": self.keep_mode,
            "min_keep": self.min_keep,
            **({"tower_reference": self.tower_reference} if self.tower_reference is not None else {}),
        }

    # -- queries --------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """The stage layers, in order."""
        return tuple(s.layer for s in self.stages)

    @property
    def pre_llm(self) -> Stage | None:
        """The pre-LLM stage, if the schedule has one (always the first stage)."""
        return self.stages[0] if self.stages and self.stages[0].pre_llm else None

    @property
    def vision_stages(self) -> tuple[Stage, ...]:
        """The vision-encoder stages (always first, in encoder order)."""
        return tuple(s for s in self.stages if s.vision)

    @property
    def is_one_shot(self) -> bool:
        """True for a single-stage schedule."""
        return len(self.stages) == 1

    def check_depth(self, depth: int) -> None:
        """Raise if a stage layer does not exist in a model with ``depth`` decoder layers."""
        for s in self.stages:
            if s.layer >= depth:
                raise ValueError(
                    f"Stage layer {s.layer} does not exist: the model has {depth} decoder layers (0..{depth - 1}). "
                    f"Use schedule.rescaled(from_depth, {depth}) or Method.rescaled({depth}) for a preset made for "
                    "another depth."
                )

    def kept_count(self, stage_idx: int, n_present: int, n_original: int) -> int:
        """Vision tokens kept by stage ``stage_idx`` when ``n_present`` (of ``n_original``) are present."""
        keep = self.stages[stage_idx].keep
        if self.keep_mode == "relative":
            target = math.floor(n_present * keep)
        elif self.keep_mode == "cumulative":
            target = math.floor(n_original * keep)
        else:
            target = int(keep)
        return min(n_present, max(self.min_keep, target))

    def tokens_per_layer(self, depth: int, n_vision: int) -> list[int]:
        """Vision tokens present in each of the ``depth`` decoder layers (encoder stages read ``n_vision`` as one
        image's patches).
        """
        self.check_depth(depth)
        counts, n = [], n_vision
        stage_at = {s.layer: i for i, s in enumerate(self.stages)}
        for i, s in enumerate(self.stages):  # encoder stages, then the pre-LLM stage: before layer 0
            if s.layer < 0:
                n = self.kept_count(i, n, n_vision)
        for layer_idx in range(depth):
            if layer_idx in stage_at:
                n = self.kept_count(stage_at[layer_idx], n, n_vision)
            counts.append(n)
        return counts

    def average_tokens(self, depth: int, n_vision: int) -> float:
        """Average retained vision tokens over all layers (the papers' "192 / 128 / 64")."""
        return sum(self.tokens_per_layer(depth, n_vision)) / depth

    # -- conversions ----------------------------------------------------------------------------
    def counts(self, n_vision: int) -> list[int]:
        """Vision tokens kept after each stage, for ``n_vision`` original tokens."""
        out, n = [], n_vision
        for i in range(len(self.stages)):
            n = self.kept_count(i, n, n_vision)
            out.append(n)
        return out

    def to_absolute(self, n_vision: int) -> Schedule:
        """The same drops as absolute counts for ``n_vision`` original tokens."""
        return Schedule(
            tuple(Stage(s.layer, c) for s, c in zip(self.stages, self.counts(n_vision))),
            "absolute",
            self.min_keep,
            self.tower_reference,
        )

    def to_cumulative(self, n_vision: int) -> Schedule:
        """The same drops as fractions of the ``n_vision`` original tokens."""
        return Schedule(
            tuple(Stage(s.layer, c / n_vision) for s, c in zip(self.stages, self.counts(n_vision))),
            "cumulative",
            self.min_keep,
            self.tower_reference,
        )

    def to_relative(self, n_vision: int) -> Schedule:
        """The same drops as fractions of the tokens present at each stage (exact for ``n_vision``)."""
        rel, prev = [], n_vision
        for s, c in zip(self.stages, self.counts(n_vision)):
            rel.append(Stage(s.layer, c / prev if prev else 0.0))
            prev = c
        return Schedule(tuple(rel), "relative", self.min_keep, self.tower_reference)

    def rescaled(self, from_depth: int, to_depth: int) -> Schedule:
        """Move stage layers proportionally from a ``from_depth``-layer model to a ``to_depth``-layer one.

        Layer 0, the pre-LLM stage and vision-encoder stages stay where they are.
        """
        if from_depth <= 0 or to_depth <= 0:
            raise ValueError(f"Depths must be positive, got {from_depth} and {to_depth}")
        layers = [max(1, round(s.layer * to_depth / from_depth)) if s.layer > 0 else s.layer for s in self.stages]
        for i in range(1, len(layers)):
            layers[i] = max(layers[i], layers[i - 1] + 1)
        if layers and layers[-1] >= to_depth:
            raise ValueError(
                f"Cannot rescale stages {list(self.layers)} from {from_depth} to {to_depth} layers: "
                f"{len(layers)} distinct stage layers do not fit"
            )
        stages = tuple(Stage(l, s.keep) for l, s in zip(layers, self.stages))
        return Schedule(stages, self.keep_mode, self.min_keep, self.tower_reference)

    def fit_tower(self, selection: int) -> Schedule:
        """The vision-encoder stages moved to a tower whose feature-selection layer is ``hidden_states[selection]``.

        Each encoder layer ``l > 0`` becomes ``max(1, round(l · selection / tower_reference))``; stages
        landing on one layer become one: relative keeps multiply, cumulative and absolute ones take
        the last. Without ``tower_reference`` (or on the reference tower) the schedule is returned
        as it is; a stage beyond the selection layer is then an error.
        """
        vision = self.vision_stages
        if self.tower_reference not in (None, selection) and vision:
            merged: dict[int, float] = {}
            for s in vision:
                l = s.layer - VISION
                l = max(1, round(l * selection / self.tower_reference)) if l > 0 else 0
                if l in merged and self.keep_mode == "relative":
                    merged[l] *= s.keep
                else:
                    merged[l] = s.keep
            rest = tuple(s for s in self.stages if not s.vision)
            fitted = tuple(Stage(VISION + l, k) for l, k in merged.items()) + rest
            return Schedule(fitted, self.keep_mode, self.min_keep, selection)
        for s in vision:
            if s.layer - VISION > selection:
                raise ValueError(
                    f"Stage {layer_name(s.layer)} lies beyond the vision tower's feature-selection layer "
                    f"(hidden_states[{selection}]), so it could not change what the projector receives; use encoder "
                    f"layers 0..{selection}, or set the schedule's tower_reference to move them proportionally"
                )
        return self


def _fit(build, hi: float, depth: int, n_vision: int, target_average: float, what: str) -> Schedule:
    """``build(x)`` for the largest x in [0, hi] whose average is not above the target, as a short decimal.

    The average grows with x in steps (floor rounding), so bisection finds the step; among the
    values with the same counts, the one with the fewest decimals is returned.
    """
    lowest = build(0.0).average_tokens(depth, n_vision)
    if lowest > target_average:
        raise ValueError(
            f"Target average {target_average} is unreachable with {what}: the smallest keep averages {lowest:.2f}"
        )
    lo = 0.0
    if build(hi).average_tokens(depth, n_vision) <= target_average:
        lo = hi
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if build(mid).average_tokens(depth, n_vision) <= target_average:
                lo = mid
            else:
                hi = mid
    exact = build(lo).average_tokens(depth, n_vision)
    for digits in range(2, 12):
        short = round(lo, digits)
        if short <= lo and build(short).average_tokens(depth, n_vision) == exact:
            return build(short)
    return build(lo)


def scale_to_average(schedule: Schedule, depth: int, n_vision: int, target_average: float) -> Schedule:
    """The same stages with every keep fraction multiplied by one factor, fitted to a target average.

    Keeps a method's stage layers and the ratios between its stages and finds the factor giving
    the largest average retained tokens not above ``target_average``; used to compare methods at
    equal budgets on a model other than the one a preset was written for. Absolute schedules are
    first read as cumulative fractions of ``n_vision``.
    """
    if schedule.keep_mode == "absolute":
        schedule = schedule.to_cumulative(n_vision)
    top = max((s.keep for s in schedule.stages), default=0.0)
    if top == 0:
        return schedule

    def build(factor: float) -> Schedule:
        stages = tuple(Stage(s.layer, min(1.0, s.keep * factor)) for s in schedule.stages)
        return Schedule(stages, schedule.keep_mode, schedule.min_keep, schedule.tower_reference)

    return _fit(build, 1.0 / top, depth, n_vision, target_average, f"stages {list(schedule.layers)}")


def solve_keep(
    layers: Sequence[int],
    target_average: float,
    depth: int,
    n_vision: int,
    fixed: dict[int, float] | None = None,
    min_keep: int = 1,
) -> Schedule:
    """Relative keep fractions for ``layers`` whose average retained tokens best meet a target.

    Stages listed in ``fixed`` (layer -> keep) keep their value; all other stages share one
    relative fraction ``r``, the one giving the largest average not above ``target_average``
    (floor rounding makes an exact hit rare).

    Examples
    --------
    FastV's one-shot K=2 at an average of 128 on LLaVA-1.5: ``solve_keep([2], 128, 32, 576)``.
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(layers)
    if unknown:
        raise ValueError(f"fixed names layers {sorted(unknown)} that are not among the stage layers {list(layers)}")
    if not 0 < target_average <= n_vision:
        raise ValueError(f"target_average must be in (0, {n_vision}], got {target_average}")

    def build(r: float) -> Schedule:
        return Schedule.progressive(layers, [fixed.get(l, r) for l in layers], min_keep=min_keep)

    return _fit(build, 1.0, depth, n_vision, target_average, f"stages {list(layers)}")
