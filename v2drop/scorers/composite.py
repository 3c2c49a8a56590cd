"""Scorers built from other registered scorers, in YAML: a weighted combination, and one per stage kind.

``composite`` combines its parts' scores (per-sample ranks or z-scores, weighted);
``staged`` runs one scorer at the pre-LLM stage and another at the decoder stages. Both are
ordinary registry entries whose parameters are plain data, so ``Method.to_dict``/``from_dict``
round-trip them and a sweep can search their weights. See ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from v2drop.scorers.base import (
    AttentionRequest,
    LayerState,
    Scorer,
    Selection,
    VisionRequest,
    build_scorer,
    register_scorer,
    scorer_params,
)

COMBINE = ("rank", "zscore")


def _part(data: Any, where: str, reserved: tuple[str, ...] = ()) -> tuple[str, dict, Scorer]:
    """(name, normalised config data, instance) of one sub-scorer given as ``{name: ..., <params>}``."""
    if isinstance(data, str):
        data = {"name": data}
    if not hasattr(data, "keys") or "name" not in data:
        raise ValueError(
            f"{where} must be a mapping with a 'name' (a registered scorer) and its parameters, got {data!r}"
        )
    data = dict(data)
    name = data.pop("name")
    extra = {k: data.pop(k) for k in reserved if k in data}
    scorer = build_scorer(name, **data)
    return name, {"name": name, **extra, **scorer_params(scorer)}, scorer


def rank_normalise(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, each valid entry's average rank among the valid entries, scaled to [0, 1] (0 = lowest).

    rank_i = #{j: s_j < s_i} + ½·#{j ≠ i: s_j = s_i}, divided by n − 1 (ties share their mean rank).
    """
    out = torch.zeros_like(scores, dtype=torch.float32)
    for b, n in enumerate(valid.sum(1).tolist()):
        s = scores[b, valid[b]].float()
        below = (s[None, :] < s[:, None]).sum(1).float()
        ties = (s[None, :] == s[:, None]).sum(1).float() - 1
        out[b, valid[b]] = (below + 0.5 * ties) / max(n - 1, 1)
    return out


def zscore_normalise(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, (s − mean) / std over the valid finite entries (population std; 0 when constant).

    Non-finite valid entries (−inf: "never keep") get the row's lowest z-score minus 1.
    """
    out = torch.zeros_like(scores, dtype=torch.float32)
    for b in range(scores.shape[0]):
        s = scores[b, valid[b]].float()
        finite = torch.isfinite(s)
        if not finite.any():
            continue
        mean, std = s[finite].mean(), s[finite].std(unbiased=False)
        z = (s - mean) / std if std > 0 else torch.zeros_like(s)
        z = torch.where(finite, z, z[finite].min() - 1.0)
        out[b, valid[b]] = z
    return out


@register_scorer("composite")
@dataclass
class CompositeScorer(Scorer):
    """A weighted combination of registered scorers: Σ weight · normalise(part's scores).

    Parameters
    ----------
    parts : list of dict
        Each ``{name: <registered scorer>, weight: <float>, <its parameters>}`` (weight 1 if left
        out). The composite needs the union of what its parts need (previous hidden states,
        attention rows, vision-tower outputs); parts asking for attention rows of different layers
        or different query tokens cannot be combined.
    combine : {"rank", "zscore"}
        ``rank``: per-sample average ranks scaled to [0, 1]; ``zscore``: per-sample standardised scores.

    Selection is the default top-k of the combined score (a part's own ``select``, e.g. SparseVLM's
    recycling, is not used).
    """

    parts: list = field(default_factory=lambda: [{"name": "v2drop", "weight": 0.7}, {"name": "fastv", "weight": 0.3}])
    combine: str = "rank"

    def __post_init__(self):
        if self.combine not in COMBINE:
            raise ValueError(f"composite combine must be one of {COMBINE}, got {self.combine!r}")
        if not self.parts:
            raise ValueError("composite parts is empty: give at least one {name: <scorer>, weight: <float>}")
        normalised, scorers, weights = [], [], []
        for i, part in enumerate(self.parts):
            data = dict(part) if hasattr(part, "keys") else {"name": part}
            weight = data.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"composite parts[{i}].weight must be a number, got {weight!r}")
            name, config, scorer = _part(data, f"composite parts[{i}]")
            if name == "staged":
                raise ValueError(
                    "composite parts cannot be 'staged' (a staged scorer chooses per stage; put composites inside it "
                    "instead)"
                )
            normalised.append(
                {"name": name, "weight": float(weight), **{k: v for k, v in config.items() if k != "name"}}
            )
            scorers.append(scorer)
            weights.append(float(weight))
        self.parts = normalised
        self._scorers, self._weights = scorers, weights
        # An instance attribute: the union of the parts' needs.
        self.needs_prev_hidden = any(s.needs_prev_hidden for s in scorers)
        self.needs_prev_keys = any(s.needs_prev_keys for s in scorers)
        self._request = self._merged_request()

    def _merged_request(self) -> AttentionRequest | None:
        """One attention request serving every part that asks for rows; conflicting ones are an error."""
        asking = [(s, s.attention_request()) for s in self._scorers if s.attention_request() is not None]
        if not asking:
            return None
        offsets = {r.layer_offset for _, r in asking}
        if len(offsets) > 1:
            raise ValueError(
                f"composite parts need attention rows of different layers (layer offsets {sorted(offsets)}); "
                "combine scorers that read the same layer's rows"
            )
        queries = {type(s).attention_queries for s, _ in asking}
        if len(queries) > 1:
            raise ValueError(
                "composite parts choose different attention query tokens ("
                + ", ".join(type(s).__name__ for s, _ in asking)
                + "); combine scorers that share their queries"
            )
        self._query_scorer = asking[0][0]
        return AttentionRequest(layer_offset=offsets.pop(), full_map=any(r.full_map for _, r in asking))

    def attention_request(self) -> AttentionRequest | None:
        """The parts' common attention rows (full map if any part wants it)."""
        return self._request

    def attention_queries(self, embeds, vision, attention_mask):
        """The query tokens of the parts that read attention rows (they agree)."""
        return self._query_scorer.attention_queries(embeds, vision, attention_mask)

    def vision_request(self) -> VisionRequest | None:
        """Everything any part asks of the vision tower."""
        out = None
        for s in self._scorers:
            wanted = s.vision_request()
            if wanted is not None:
                out = wanted.union(out)
        return out

    def check_layer(self, layer_idx: int) -> None:
        """Every part must be able to run at the stage."""
        for s in self._scorers:
            s.check_layer(layer_idx)

    def score(self, state: LayerState) -> torch.Tensor:
        """Σ weight · normalise(part scores), per sample over its valid vision tokens; padded entries 0."""
        normalise = rank_normalise if self.combine == "rank" else zscore_normalise
        total = torch.zeros(state.vision_idx.shape, dtype=torch.float32, device=state.vision_idx.device)
        for scorer, weight in zip(self._scorers, self._weights):
            scores = scorer.score(state).float().nan_to_num(nan=float("-inf"))
            total += weight * normalise(scores, state.vision_valid)
        return total

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The parts' FLOPs (the combination itself is O(n²) comparisons at most, not counted)."""
        return sum(s.flops(n_vision, n_tokens, hidden) for s in self._scorers)


@register_scorer("staged")
@dataclass
class StagedScorer(Scorer):
    """One scorer for the pre-LLM stage and another for the decoder stages of the same schedule.

    Parameters
    ----------
    pre_llm : dict or None
        ``{name: <registered scorer>, <its parameters>}`` running at the pre-LLM stage (layer -1);
        None (default) if the schedule has none.
    llm : dict
        The scorer running at every decoder stage (layer >= 0).

    Stage kinds rather than layer numbers select the part, so ``Method.rescaled`` (which moves
    decoder layers) never separates a stage from its scorer.
    """

    pre_llm: dict | None = None
    llm: dict = field(default_factory=lambda: {"name": "v2drop"})

    def __post_init__(self):
        self._pre = None
        if self.pre_llm is not None:
            _, self.pre_llm, self._pre = _part(self.pre_llm, "staged pre_llm")
        if self.llm is None:
            raise ValueError("staged llm must name the scorer of the decoder stages, e.g. {name: v2drop}")
        _, self.llm, self._llm = _part(self.llm, "staged llm")
        for part in (self._pre, self._llm):
            if isinstance(part, StagedScorer):
                raise ValueError("a staged scorer's parts cannot be staged themselves")
        self.needs_prev_hidden = self._llm.needs_prev_hidden
        self.needs_prev_keys = self._llm.needs_prev_keys

    def at(self, layer_idx: int) -> Scorer:
        """The pre-LLM part for layer -1, the decoder part otherwise."""
        if layer_idx >= 0:
            return self._llm
        if self._pre is None:
            raise ValueError(
                "This staged scorer has no pre_llm part, so its schedule cannot have a pre-LLM stage (layer -1); "
                "set pre_llm: {name: <scorer>}"
            )
        return self._pre

    def check_layer(self, layer_idx: int) -> None:
        """The part running at ``layer_idx`` must be able to run there."""
        self.at(layer_idx).check_layer(layer_idx)

    def attention_request(self) -> AttentionRequest | None:
        """The decoder part's request (the engine asks ``at(layer)`` for each stage's own)."""
        return self._llm.attention_request()

    def score(self, state: LayerState) -> torch.Tensor:
        """The scores of the part running at ``state.layer_idx``."""
        return self.at(state.layer_idx).score(state)

    def select(self, state: LayerState, scores: torch.Tensor, counts: list[int]) -> Selection:
        """The selection of the part running at ``state.layer_idx`` (e.g. VisionZip's merging)."""
        return self.at(state.layer_idx).select(state, scores, counts)

    def flops(self, n_vision: int, n_tokens: int, hidden: int) -> float:
        """The decoder part's FLOPs (``cost`` asks ``at(layer)`` for each stage's own)."""
        return self._llm.flops(n_vision, n_tokens, hidden)


def with_params(scorer: dict, params: dict) -> dict:
    """A copy of scorer config data with dotted-path parameters set, for sweeps over nested parameters.

    ``with_params({"name": "composite", "parts": [...]}, {"parts.0.weight": 0.5, "combine": "zscore"})``;
    list indices are numbers, mapping keys names (``"llm.metric"`` for a staged scorer). A path
    that does not exist in the data is an error naming it.
    """
    import copy

    out = copy.deepcopy(dict(scorer))
    for path, value in params.items():
        keys, node = path.split("."), out
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ValueError(
                        f"Scorer parameter path {path!r}: {key!r} is not an index of a {len(node)}-item list"
                    )
                key = int(key)
            elif not isinstance(node, dict) or (key not in node and not last):
                raise ValueError(f"Scorer parameter path {path!r}: no {key!r} in {node!r}")
            if last:
                node[key] = value
            else:
                node = node[key]
    return out
