"""The paper's token budgets, and methods fitted to them on any model (for comparison tables and benchmarks)."""

from __future__ import annotations

PAPER_BUDGETS = (192, 128, 64)  # average retained vision tokens of 576 on LLaVA-1.5-7B
PAPER_VISION_TOKENS = 576


def scorer_variants() -> dict[str, tuple[str, dict]]:
    """``{label: (preset prefix whose schedule is used, scorer settings)}`` for every registered scorer.

    V²Drop comes first, once per variation metric; every other scorer follows in registry order,
    on its own ``<name>-llava15-<budget>`` presets when it has them, else on the first LLaVA-1.5
    preset that uses it (a composite or staged scorer: ``composite-v2drop-dart``, fitted to each
    budget by ``budget_method``), else on V²Drop's progressive schedule (so a newly registered
    scorer appears in every comparison without an edit here). The ``given`` oracle is left out:
    without per-sample positions every score ties and it keeps the first vision tokens.
    """
    from v2drop.method import Method, list_presets
    from v2drop.scorers import list_scorers
    from v2drop.scorers.v2drop import METRICS

    presets = list_presets()
    variants = {f"v2drop-{metric}": ("v2drop", {"metric": metric}) for metric in METRICS}
    for name in list_scorers():
        if name in ("v2drop", "given"):
            continue
        if any(p.startswith(f"{name}-llava15-") for p in presets):
            variants[name] = (name, {})
            continue
        own = [p for p in presets if "-llava15-" in p and Method.from_preset(p).scorer_name == name]
        variants[name] = (own[0].split("-llava15-")[0], {}) if own else ("v2drop", {"name": name})
    return variants


def budget_method(prefix: str, budget: int, depth: int, n_vision: int, **overrides):
    """The preset ``<prefix>-llava15-<budget>`` moved to a ``depth``-layer model with ``n_vision`` tokens.

    ``overrides`` replace scorer parameters, or with ``name`` the scorer itself (same schedule).
    Stage layers are rescaled and the keep fractions fitted (one common factor, see
    ``v2drop.schedule.scale_to_average``) so the average retained tokens are the same share of
    ``n_vision`` as ``budget`` is of 576. Without a preset for ``budget``, the prefix's preset
    closest to it is fitted instead (a composite written for 128 also gives 192 and 64). Returns
    None when the prefix has no LLaVA-1.5 preset.
    """
    from v2drop.method import Method, list_presets
    from v2drop.schedule import scale_to_average

    name = f"{prefix}-llava15-{budget}"
    if name not in list_presets():
        others = [p for p in list_presets() if p.startswith(f"{prefix}-llava15-") and p.rsplit("-", 1)[1].isdigit()]
        if not others:
            return None
        name = min(others, key=lambda p: abs(int(p.rsplit("-", 1)[1]) - budget))
    data = Method.from_preset(name).to_dict()
    if "name" in overrides:  # another scorer on this preset's schedule: drop the preset scorer's parameters
        data["scorer"] = dict(overrides)
    elif overrides:
        data["scorer"] = {**data["scorer"], **overrides}
    method = Method.from_dict(data).rescaled(depth)
    target = budget / PAPER_VISION_TOKENS * n_vision
    data = method.to_dict()
    data["schedule"] = scale_to_average(method.schedule, depth, n_vision, target).to_dict()
    return Method.from_dict(data)


def with_scorer_args(method, **kwargs):
    """The same method with extra scorer parameters (e.g. ``faithful=True``)."""
    from v2drop.method import Method

    data = method.to_dict()
    data["scorer"] = {**data["scorer"], **kwargs}
    return Method.from_dict(data)
