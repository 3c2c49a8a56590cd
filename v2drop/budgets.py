"""The paper's token budgets, budgets in either counting convention, and methods fitted to them on any model.

A budget counts vision tokens one of two ways (``Budget.count``): ``average``, the vision tokens
retained per decoder layer averaged over the layers (the figure in-LLM papers report: FastV, PDrop,
SparseVLM, V²Drop's 192/128/64), or ``entering``, the vision tokens that enter the LLM, i.e. reach
its first decoder layer (the figure pre-LLM papers report: VisionZip, DivPrune, VisPruner). A plain
number is an ``average`` budget (what a preset's ``budget`` and a sweep's ``max_average_tokens``
always meant); ``{tokens: 128, count: entering}`` states the convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_BUDGETS = (192, 128, 64)  # average retained vision tokens of 576 on LLaVA-1.5-7B (the llava15 presets' budgets)
PAPER_MODEL = "llava15"  # the model of the presets that budget_method fits
PAPER_VISION_TOKENS = 576  # LLaVA-1.5-7B's vision tokens per image: the llava15 presets' reference_vision_tokens
# The controls every comparison table shows at each of its budgets (labels of llava15 presets): a random keep set,
# the image itself smaller, and its tokens average-pooled (docs/methods.md, "Controls").
CONTROLS = ("random", "downsample", "pool")


BUDGET_COUNTS = {
    "average": "vision tokens retained per decoder layer, averaged over the layers (in-LLM papers' count)",
    "entering": "vision tokens entering the LLM, i.e. reaching its first decoder layer (pre-LLM papers' count)",
}


@dataclass(frozen=True)
class Budget:
    """A vision-token budget: ``tokens`` counted the ``count`` way (a key of ``BUDGET_COUNTS``)."""

    tokens: float  # how many vision tokens (> 0)
    count: str = "average"  # average (layer-averaged) or entering (entering the LLM)

    def __post_init__(self):
        if self.count not in BUDGET_COUNTS:
            raise ValueError(
                f"budget count must be one of {', '.join(BUDGET_COUNTS)}, got {self.count!r} "
                "(average: layer-averaged vision tokens; entering: vision tokens entering the LLM)"
            )
        tokens = self.tokens
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens > 0:
            raise ValueError(f"budget tokens must be a positive number of vision tokens, got {tokens!r}")

    @classmethod
    def parse(cls, value, where: str = "budget") -> Budget | None:
        """A budget from config data: a number (an ``average`` budget, the plain meaning everywhere), ``{tokens: N,
        count: average | entering}``, a Budget, or None; anything else is a one-line ValueError naming ``where``."""
        if value is None or isinstance(value, Budget):
            return value
        try:
            if isinstance(value, dict):
                if set(value) != {"tokens", "count"}:
                    raise ValueError(
                        f"a budget mapping has exactly the keys tokens and count, got {sorted(map(str, value))}"
                    )
                return cls(value["tokens"], value["count"])
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return cls(value, "average")
            raise ValueError(f"expected a number of tokens or {{tokens: N, count: average | entering}}, got {value!r}")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        """``{"tokens": ..., "count": ...}`` (what ``parse`` reads back)."""
        return {"tokens": self.tokens, "count": self.count}

    def of(self, schedule, depth: int, n_vision: int) -> float:
        """What ``schedule`` keeps of ``n_vision`` tokens on a ``depth``-layer model, counted this budget's way."""
        if self.count == "average":
            return schedule.average_tokens(depth, n_vision)
        return schedule.tokens_per_layer(depth, n_vision)[0]

    def fit(self, schedule, depth: int, n_vision: int):
        """``schedule`` fitted to this budget for ``n_vision`` tokens on a ``depth``-layer model (``fit_budget``)."""
        return fit_budget(schedule, self, depth, n_vision)


class UnreachableBudget(ValueError):
    """A budget the schedule's stage layers cannot meet (an ``entering`` one without a stage before the LLM)."""


def _fraction(count: int, n: int) -> float:
    """The smallest relative keep fraction ``f`` with ``floor(n * f) == count`` (``count / n`` nudged up past
    floating-point error)."""
    f = count / n
    while math.floor(n * f) < count:
        f = math.nextafter(f, 2.0)
    return f


def fit_budget(schedule, budget, depth: int, n_vision: int):
    """The same stage layers with keep fractions fitted to ``budget`` (a ``Budget`` or what ``Budget.parse`` reads).

    ``average``: every keep fraction times one common factor (``v2drop.schedule.scale_to_average``);
    the largest layer-averaged count not above ``budget.tokens`` that such a factor reaches, exact when
    one reaches it (floor rounding of counts makes most targets fall between two reachable averages).
    ``entering``: the first stage (pre-LLM, or at layer 0) keeps exactly ``floor(budget.tokens)`` of the
    ``n_vision`` tokens, the later stages keep their relative fractions (so they keep the same share of
    what reaches them); exact for ``n_vision`` tokens. A schedule with no stage before layer 1 lets every
    token enter: it meets an ``entering`` budget of at least ``n_vision`` unchanged and cannot meet a
    smaller one (a ValueError). The result is a ``relative`` schedule.
    """
    from v2drop.schedule import Schedule, Stage, scale_to_average

    budget = Budget.parse(budget)
    if budget.count == "average":
        return scale_to_average(schedule, depth, n_vision, budget.tokens)
    count = math.floor(budget.tokens)
    first = schedule.stages[0] if schedule.stages else None
    if first is None or first.layer > 0:
        if count >= n_vision:
            return schedule
        raise UnreachableBudget(
            f"an entering budget of {budget.tokens} vision tokens needs a stage before the LLM or at layer 0; stages "
            f"at layers {list(schedule.layers)} let all {n_vision} enter (state the budget with count: average)"
        )
    if len(schedule.stages) > 1 and schedule.stages[1].layer == 0:
        raise ValueError(
            "an entering budget fits one stage before the first decoder layer; this schedule has two (pre_llm and 0)"
        )
    relative = schedule.to_relative(n_vision)
    keep = _fraction(min(count, n_vision), n_vision)
    stages = (Stage(first.layer, keep), *relative.stages[1:])
    return Schedule(stages, "relative", schedule.min_keep)


def scorer_variants() -> dict[str, tuple[str, dict]]:
    """``{label: (preset label whose schedule is used, scorer settings)}`` for every registered scorer.

    V²Drop comes first, once per variation metric; every other scorer follows in registry order,
    on its own LLaVA-1.5 presets (label = its name) when it has them, followed by its named variants
    (presets labelled ``<name>-<variant>`` running it, e.g. ``dart-official``), else on the first LLaVA-1.5
    preset with a budget that runs it (a composite or staged scorer: ``composite-v2drop-dart``,
    fitted to each budget by ``budget_method``), else on V²Drop's progressive schedule (so a newly
    registered scorer appears in every comparison without an edit here). The ``given`` oracle is
    left out: without per-sample positions every score ties and it keeps the first vision tokens.
    """
    from v2drop.presets import find_presets
    from v2drop.scorers import list_scorers
    from v2drop.scorers.v2drop import METRICS

    budgeted = [p for p in find_presets(model=PAPER_MODEL) if p.budget is not None]
    variants = {f"v2drop-{metric}": ("v2drop", {"metric": metric}) for metric in METRICS}
    for name in list_scorers():
        if name in ("v2drop", "given"):
            continue
        if any(p.label == name for p in budgeted):
            variants[name] = (name, {})
            # its named variants (label ``<name>-<variant>``, e.g. ``dart-official``) are rows of their own
            for label in dict.fromkeys(
                p.label for p in budgeted if p.scorer == name and p.label.startswith(f"{name}-")
            ):
                variants[label] = (label, {})
            continue
        own = [p.label for p in budgeted if p.scorer == name]
        variants[name] = (own[0], {}) if own else ("v2drop", {"name": name})
    return variants


def budget_method(label: str, budget, depth: int, n_vision: int, **overrides):
    """The LLaVA-1.5 preset of ``label`` at ``budget``, moved to a ``depth``-layer model with ``n_vision`` tokens.

    ``budget`` is a number (an ``average`` budget, as the presets' budgets) or a budget in either
    convention (``Budget.parse``). ``overrides`` replace scorer parameters, or with ``name`` the
    scorer itself (same schedule). Stage layers are rescaled and the keep fractions fitted
    (``fit_budget``) so the retained tokens, counted the budget's way, are the same share of
    ``n_vision`` as ``budget`` is of the preset's ``reference_vision_tokens``. Without a preset for
    ``budget``, the label's preset closest to it is fitted instead (a composite written for 128
    also gives 192 and 64). Returns None when the label has no LLaVA-1.5 preset with a budget.
    """
    from v2drop.method import Method
    from v2drop.presets import find_presets

    budget = Budget.parse(budget)
    candidates = [p for p in find_presets(label=label, model=PAPER_MODEL) if p.budget is not None]
    if not candidates:
        return None
    preset = min(candidates, key=lambda p: (p.budget_count != budget.count, abs(p.budget - budget.tokens)))
    data = preset.method().to_dict()
    if "name" in overrides:  # another scorer on this preset's schedule: drop the preset scorer's parameters
        data["scorer"] = dict(overrides)
    elif overrides:
        data["scorer"] = {**data["scorer"], **overrides}
    method = Method.from_dict(data).rescaled(depth)
    target = Budget(budget.tokens / preset.reference_vision_tokens * n_vision, budget.count)
    data = method.to_dict()
    data["schedule"] = target.fit(method.schedule, depth, n_vision).to_dict()
    return Method.from_dict(data)


def with_scorer_args(method, **kwargs):
    """The same method with extra scorer parameters (e.g. ``faithful=True``)."""
    from v2drop.method import Method

    data = method.to_dict()
    data["scorer"] = {**data["scorer"], **kwargs}
    return Method.from_dict(data)


def label_budget(label: str) -> int | None:
    """The budget a run label names: a preset's ``budget`` (``fastv-llava15-128``), or ``<variant>@<budget>`` (the
    analyses' labels); None for anything else (``none``, a sweep trial)."""
    from v2drop.presets import get_preset, list_presets

    if label in list_presets():
        return get_preset(label).budget
    head, _, tail = label.rpartition("@")
    return int(tail) if head and tail.isdigit() else None


def missing_controls(labels) -> dict[int, list[str]]:
    """Per budget some of ``labels`` show, the ``CONTROLS`` presets at that budget that none of them runs.

    A control counts as run at budget b under its preset's name (``pool-llava15-128``) or as an
    analysis label (``pool@128``); only budgets a control has a preset for are listed.
    """
    from v2drop.presets import find_presets

    labels = set(labels)
    budgets = sorted({b for b in map(label_budget, labels) if b is not None}, reverse=True)
    out = {}
    for budget in budgets:
        missing = [
            p.name
            for control in CONTROLS
            for p in find_presets(label=control, model=PAPER_MODEL, budget=budget)
            if p.name not in labels and f"{control}@{budget}" not in labels
        ]
        if missing:
            out[budget] = missing
    return out
