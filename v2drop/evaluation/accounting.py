"""Fair accounting of one evaluation: token counts both ways, a time split, agreement with the unpruned model and
bootstrap intervals (definitions: ``docs/methods.md``, "Measurements")."""

from __future__ import annotations

import statistics

import numpy as np

SEED = 0  # every bootstrap interval uses this seed: the same records give the same interval
RESAMPLES = 2000  # bootstrap resamples per interval


def sample_tokens(record: dict) -> dict:
    """One record's token counts: ``entering_llm`` (vision tokens the first decoder layer receives) and
    ``kv_cache_tokens`` (vision + text KV entries after prefill, summed over the decoder layers).

    Text tokens (every prompt token that is not a vision token) stay in every layer; recycled or merged tokens
    count as vision tokens, as in ``vision_tokens_per_layer``.
    """
    per_layer = record["vision_tokens_per_layer"]
    text = record["prompt_tokens"] - record["vision_tokens"]
    return {
        "entering_llm": per_layer[0] if per_layer else record["vision_tokens"],
        "kv_cache_tokens": sum(text + v for v in per_layer),
    }


def token_section(records: list[dict]) -> dict:
    """The ``tokens`` section of a result: means over samples of the per-layer vision counts, their layer average,
    the count entering the LLM and the KV-cache entries after prefill (``sample_tokens``), and that KV count without
    dropping (every prompt token in every layer)."""
    depth = max(len(r["vision_tokens_per_layer"]) for r in records)
    rows = [r["vision_tokens_per_layer"] for r in records]
    if any(len(v) != depth for v in rows):
        raise ValueError(
            f"records disagree on the model's depth: vision_tokens_per_layer lengths {sorted(set(map(len, rows)))}"
        )
    n = len(records)
    counts = [sample_tokens(r) for r in records]
    return {
        "per_layer": [sum(v[layer] for v in rows) / n for layer in range(depth)],
        "average": sum(r["average_vision_tokens"] for r in records) / n,
        "entering_llm": sum(c["entering_llm"] for c in counts) / n,
        "kv_cache_tokens": sum(c["kv_cache_tokens"] for c in counts) / n,
        "kv_cache_tokens_no_drop": sum(r["prompt_tokens"] * depth for r in records) / n,
    }


TIME_PARTS = ("vision", "scoring", "prefill", "decode", "ttft")


def sample_times(record: dict) -> dict:
    """One record's time split in seconds (None for a part its record did not measure): ``vision`` (embedding:
    encoder and projector), ``scoring`` (scorer work, inside prefill), ``prefill`` (first decoder layer to the first
    token's logits), ``decode`` (the remaining tokens), ``ttft`` (vision + prefill)."""
    vision = record.get("vision_seconds")
    prefill = record["prefill_seconds"]
    return {
        "vision": vision,
        "scoring": record["scoring_seconds"],
        "prefill": prefill,
        "decode": record["generate_seconds"] - prefill,
        "ttft": vision + prefill if vision is not None else None,
    }


def time_section(records: list[dict]) -> dict:
    """The ``time`` section of a result: each part of ``sample_times`` as ``{"median", "total"}`` seconds over the
    records (None when a record lacks it)."""
    times = [sample_times(r) for r in records]
    out = {}
    for part in TIME_PARTS:
        values = [t[part] for t in times]
        measured = None not in values
        out[part] = {
            "median": statistics.median(values) if measured else None,
            "total": sum(values) if measured else None,
        }
    return out


def bootstrap_ci(values, seed: int = SEED, confidence: float = 0.95, resamples: int = RESAMPLES) -> list[float]:
    """``[low, high]``: the percentile bootstrap interval of the mean of ``values`` (e.g. per-sample 0/1
    correctness) from ``scipy.stats.bootstrap`` with a fixed seed; equal values give a zero-width interval."""
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of numbers, got shape {data.shape}")
    if np.all(data == data[0]):
        return [float(data[0]), float(data[0])]
    res = bootstrap(
        (data,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
        axis=-1,
    )
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def paired_difference(
    pruned: dict, none: dict, seed: int = SEED, confidence: float = 0.95, resamples: int = RESAMPLES
) -> dict | None:
    """Accuracy of ``pruned`` minus that of ``none`` (each ``{sample id: correct}``) over the ids both have, with
    the paired percentile-bootstrap interval (samples resampled together); None when they share no id.

    ``{"n", "difference", "ci95": [low, high], "contains_zero"}``.
    """
    ids = [i for i in pruned if i in none]
    if not ids:
        return None
    diff = [float(pruned[i]) - float(none[i]) for i in ids]  # paired: the same sample ids resampled together
    low, high = bootstrap_ci(diff, seed=seed, confidence=confidence, resamples=resamples)
    mean = sum(diff) / len(diff)
    return {"n": len(ids), "difference": mean, "ci95": [low, high], "contains_zero": low <= 0.0 <= high}


def agreement(records: list[dict], none_records: list[dict]) -> float | None:
    """Share of ``records``' samples whose prediction equals the no-dropping run's prediction for the same sample id
    (over the ids both have; None when they share none)."""
    reference = {r["id"]: r["prediction"] for r in none_records}
    shared = [r for r in records if r["id"] in reference]
    if not shared:
        return None
    return sum(r["prediction"] == reference[r["id"]] for r in shared) / len(shared)


def seed_sample_ci(correct, seed: int = SEED, confidence: float = 0.95, resamples: int = RESAMPLES) -> list[float]:
    """``[low, high]``: the percentile bootstrap interval of the mean of ``correct`` (seeds × samples, e.g. 0/1
    correctness of one stochastic method run with several seeds on the same samples), resampling both.

    Each resample draws the samples with replacement, the same draw for every seed (paired over samples), and the
    seeds with replacement, and takes the mean of the drawn cells; a fixed ``seed`` gives the same interval. One seed
    is ``bootstrap_ci`` of its row (seed variation cannot be estimated from one seed).
    """
    data = np.asarray(correct, dtype=float)
    if data.ndim != 2 or 0 in data.shape:
        raise ValueError(f"seed_sample_ci needs a non-empty seeds × samples table of numbers, got shape {data.shape}")
    n_seeds, n_samples = data.shape
    if n_seeds == 1:
        return bootstrap_ci(data[0], seed=seed, confidence=confidence, resamples=resamples)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for b in range(resamples):
        rows = rng.integers(n_seeds, size=n_seeds)
        cols = rng.integers(n_samples, size=n_samples)
        means[b] = data[np.ix_(rows, cols)].mean()
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]
