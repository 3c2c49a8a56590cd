"""The paper's token budgets, and methods fitted to them on any model (for comparison tables and benchmarks)."""

from __future__ import annotations

PAPER_BUDGETS = (192, 128, 64)  # average retained vision tokens of 576 on LLaVA-1.5-7B
PAPER_VISION_TOKENS = 576
# label -> (preset prefix whose schedule is used, scorer settings). Every comparison table includes
# the simple baselines, run on V²Drop's progressive schedule.
VARIANTS = {
    "v2drop-l2": ("v2drop", {"metric": "l2"}),
    "v2drop-l1": ("v2drop", {"metric": "l1"}),
    "v2drop-cosine": ("v2drop", {"metric": "cosine"}),
    "fastv": ("fastv", {}),
    "pdrop": ("pdrop", {}),
    "sparsevlm": ("sparsevlm", {}),
    "random": ("v2drop", {"name": "random"}),
    "uniform": ("v2drop", {"name": "uniform"}),
    "position": ("v2drop", {"name": "position"}),
}


def budget_method(prefix: str, budget: int, depth: int, n_vision: int, **overrides):
    """The preset ``<prefix>-llava15-<budget>`` moved to a ``depth``-layer model with ``n_vision`` tokens.

    ``overrides`` replace scorer parameters, or with ``name`` the scorer itself (same schedule).
    Stage layers are rescaled and the keep fractions fitted (one common factor, see
    ``v2drop.schedule.scale_to_average``) so the average retained tokens are the same share of
    ``n_vision`` as ``budget`` is of 576. Returns None when no such preset exists.
    """
    from v2drop.method import Method, list_presets
    from v2drop.schedule import scale_to_average

    name = f"{prefix}-llava15-{budget}"
    if name not in list_presets():
        return None
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
