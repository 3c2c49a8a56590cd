"""The paper's token budgets, and methods fitted to them on any model (for comparison tables and benchmarks)."""

from __future__ import annotations

PAPER_BUDGETS = (192, 128, 64)  # average retained vision tokens of 576 on LLaVA-1.5-7B (the llava15 presets' budgets)
PAPER_MODEL = "llava15"  # the model of the presets that budget_method fits
PAPER_VISION_TOKENS = 576  # LLaVA-1.5-7B's vision tokens per image: the llava15 presets' reference_vision_tokens
# The controls every comparison table shows at each of its budgets (labels of llava15 presets): a random keep set,
# the image itself smaller, and its tokens average-pooled (docs/methods.md, "Controls").
CONTROLS = ("random", "downsample", "pool")


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


def budget_method(label: str, budget: int, depth: int, n_vision: int, **overrides):
    """The LLaVA-1.5 preset of ``label`` at ``budget``, moved to a ``depth``-layer model with ``n_vision`` tokens.

    ``overrides`` replace scorer parameters, or with ``name`` the scorer itself (same schedule).
    Stage layers are rescaled and the keep fractions fitted (one common factor, see
    ``v2drop.schedule.scale_to_average``) so the average retained tokens are the same share of
    ``n_vision`` as ``budget`` is of the preset's ``reference_vision_tokens``. Without a preset for
    ``budget``, the label's preset closest to it is fitted instead (a composite written for 128
    also gives 192 and 64). Returns None when the label has no LLaVA-1.5 preset with a budget.
    """
    from v2drop.method import Method
    from v2drop.presets import find_presets
    from v2drop.schedule import scale_to_average

    candidates = [p for p in find_presets(label=label, model=PAPER_MODEL) if p.budget is not None]
    if not candidates:
        return None
    preset = min(candidates, key=lambda p: abs(p.budget - budget))
    data = preset.method().to_dict()
    if "name" in overrides:  # another scorer on this preset's schedule: drop the preset scorer's parameters
        data["scorer"] = dict(overrides)
    elif overrides:
        data["scorer"] = {**data["scorer"], **overrides}
    method = Method.from_dict(data).rescaled(depth)
    target = budget / preset.reference_vision_tokens * n_vision
    data = method.to_dict()
    data["schedule"] = scale_to_average(method.schedule, depth, n_vision, target).to_dict()
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
