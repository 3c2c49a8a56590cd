"""Named methods shipped with the package: ``v2drop/presets/<name>.yaml``, each with its identity as data.

A preset file holds a method's config data (``scorer``, ``schedule``, ``position_policy``,
``reference_depth``; see ``Method.from_dict``) and the keys of ``IDENTITY_KEYS``, which say what
the preset is, so that code asks for presets by these fields (``find_presets``) and never parses
their names. The name is made from the data (``preset_name``): a file whose name does not match
its data is an error when it is read. The files are read with ``importlib.resources``, so an
installed wheel has them too.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cache
from importlib import resources
from typing import Any

import yaml

# Every key a preset file has besides the method's config data, with its meaning.
IDENTITY_KEYS = {
    "description": "one line: the method, its stages and its average number of kept vision tokens",
    "label": "the name's first part, the method as tables name it: its scorer's, or a mix's (composite-v2drop-dart)",
    "model": "the name's second part, the model the setting is for: llava15 (LLaVA-1.5-7B), qwen2vl (Qwen2-VL-7B), "
    "onevision (LLaVA-OneVision-7B, video) or qwen25vl (Qwen2.5-VL-7B, video)",
    "budget": "optional: vision tokens kept of reference_vision_tokens: a number counts them averaged over the decoder "
    "layers (192/128/64); {tokens: N, count: average | entering} says which way (entering: entering the LLM)",
    "reduction": "optional: share of the vision tokens removed on average, where their count varies (Qwen2-VL: 0.778)",
    "reference_vision_tokens": "optional: the vision tokens per image that budget and absolute keep counts count (576)",
    "retention": "optional: share of the vision tokens kept, where papers give a percentage (video: 0.25/0.15/0.10)",
}
REQUIRED_KEYS = ("description", "label", "model")


@dataclasses.dataclass(frozen=True)
class Preset:
    """What a preset is, read from its file (see ``IDENTITY_KEYS``); ``data`` is its method's config data."""

    name: str  # the file name without ".yaml"
    label: str  # the method as tables name it (a scorer's name or a mix's)
    scorer: str  # the registered scorer it runs (its scorer.name)
    model: str  # the model whose setting it is: llava15, qwen2vl, onevision or qwen25vl
    description: str  # one line on the method, its stages and its budget
    budget: int | None = None  # kept vision tokens of reference_vision_tokens, counted budget_count's way, if any
    reduction: float | None = None  # share of the vision tokens removed on average, if that is its measure
    reference_vision_tokens: int | None = None  # vision tokens per image its budget and absolute counts count
    retention: float | None = None  # share of the vision tokens kept, if a percentage is its measure
    data: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # method config data
    budget_count: str = "average"  # how budget counts: average (over decoder layers) or entering (the LLM)

    def method(self, depth: int | None = None):
        """The preset's ``Method``, rescaled to a model of ``depth`` decoder layers if given."""
        from v2drop.method import Method

        method = Method.from_dict(self.data)
        return method.rescaled(depth) if depth is not None else method


def preset_name(
    label: str, model: str, budget: int | None = None, reduction: float | None = None, retention: float | None = None
) -> str:
    """The name a preset with these fields has: ``<label>-<model>[-<budget>][-<reduction in per mille>][-<retention in
    percent>]``."""
    parts = [label, model]
    if budget is not None:
        parts.append(str(budget))
    if reduction is not None:
        parts.append(str(round(reduction * 1000)))
    if retention is not None:
        parts.append(str(round(retention * 100)))
    return "-".join(parts)


def _preset_dir():
    return resources.files("v2drop").joinpath("presets")


def list_presets() -> list[str]:
    """Sorted names of the presets shipped in ``v2drop/presets``."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``; an unknown name is an error listing the presets."""
    entry = _preset_dir().joinpath(f"{name}.yaml")
    if not entry.is_file():
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(list_presets()) or '(none)'}")
    return entry.read_text()


def parse_preset(name: str, data: Any) -> Preset:
    """The ``Preset`` a file ``<name>.yaml`` with content ``data`` is; missing or contradicting fields are errors."""
    where = f"Preset {name!r} (v2drop/presets/{name}.yaml)"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(REQUIRED_KEYS)} and a method, got {data!r}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}; every preset sets {', '.join(REQUIRED_KEYS)}")
    identity = {k: data.get(k) for k in IDENTITY_KEYS}
    budget_count = "average"
    if isinstance(identity["budget"], dict):  # {tokens, count}: the budget in a stated convention
        from v2drop.budgets import Budget

        budget = Budget.parse(identity["budget"], f"{where}: budget")
        identity["budget"], budget_count = budget.tokens, budget.count
    for key in ("label", "model", "description"):
        if not isinstance(identity[key], str) or not identity[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {identity[key]!r}")
    for key in ("budget", "reference_vision_tokens"):
        value = identity[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key} must be a positive whole number or absent, got {value!r}")
    reduction = identity["reduction"]
    if reduction is not None and (
        isinstance(reduction, bool) or not isinstance(reduction, float) or not 0 < reduction < 1
    ):
        raise ValueError(f"{where}: reduction must be a share between 0 and 1 or absent, got {reduction!r}")
    retention = identity["retention"]
    if retention is not None and (
        isinstance(retention, bool) or not isinstance(retention, float) or not 0 < retention < 1
    ):
        raise ValueError(f"{where}: retention must be a share between 0 and 1 or absent, got {retention!r}")
    if sum(identity[k] is not None for k in ("budget", "reduction", "retention")) > 1:
        raise ValueError(f"{where}: set at most one of budget, reduction and retention (each names the preset)")
    expected = preset_name(identity["label"], identity["model"], identity["budget"], reduction, retention)
    if expected != name:
        raise ValueError(
            f"{where} contradicts its data: label {identity['label']!r}, model {identity['model']!r}, "
            f"budget {identity['budget']!r}, reduction {reduction!r}, retention {retention!r} make the name "
            f"{expected!r}; "
            "rename the file or fix those fields"
        )
    method = {k: v for k, v in data.items() if k not in IDENTITY_KEYS}
    keep_mode = (method.get("schedule") or {}).get("keep_mode", "relative")
    if identity["reference_vision_tokens"] is None and (identity["budget"] is not None or keep_mode == "absolute"):
        raise ValueError(
            f"{where} counts vision tokens (a budget or absolute keep counts) but sets no reference_vision_tokens"
        )
    scorer = method.get("scorer", "none")
    scorer = scorer.get("name", "none") if isinstance(scorer, dict) else scorer
    return Preset(name=name, scorer=scorer, data=method, budget_count=budget_count, **identity)


@cache
def _read(name: str) -> Preset:
    return parse_preset(name, yaml.safe_load(preset_text(name)))


def get_preset(name: str) -> Preset:
    """Shipped preset ``name`` with its identity; an unknown name is an error listing the presets."""
    preset = _read(name)
    return dataclasses.replace(preset, data=copy.deepcopy(preset.data))  # the caller may edit its copy of the data


def find_presets(
    label: str | None = None,
    scorer: str | None = None,
    model: str | None = None,
    budget: int | None = None,
    retention: float | None = None,
) -> list[Preset]:
    """The shipped presets whose fields equal every given one (None: any), sorted by name.

    E.g. ``find_presets(scorer="fastv", model="llava15")`` gives FastV's LLaVA-1.5 presets.
    """
    wanted = {"label": label, "scorer": scorer, "model": model, "budget": budget, "retention": retention}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    presets = (get_preset(n) for n in list_presets())
    return [p for p in presets if all(getattr(p, k) == v for k, v in wanted.items())]
