"""An evaluation result as a terminal table."""

from __future__ import annotations

from v2drop.evaluation.config import EvalResult


def format_table(result: EvalResult) -> str:
    """A terminal table: accuracy per family, its interval (and over seeds), agreement with no dropping and the cost
    figures."""
    m = result.metrics
    rel = m.get("relative_per_family", {})
    lines = [f"{'family':<16}{'accuracy':>10}{'vs none':>10}"]
    for fam, acc in sorted(result.per_family.items()):
        lines.append(f"{fam:<16}{acc:>10.3f}{(f'{rel[fam]:.1%}' if fam in rel else '-'):>10}")
    overall_rel = f"{m['relative_accuracy']:.1%}" if m.get("relative_accuracy") else "-"
    lines.append(f"{'overall':<16}{m['accuracy']:>10.3f}{overall_rel:>10}")
    if m.get("accuracy_ci95"):
        low, high = m["accuracy_ci95"]
        lines.append(f"accuracy 95% bootstrap interval [{low:.3f}, {high:.3f}]")
    if result.seeds:
        seeds = result.seeds
        low, high = seeds["ci95"]
        lines.append(
            f"over {len(seeds['seeds'])} seeds: accuracy {seeds['mean']:.3f}, 95% interval over samples and seeds "
            f"[{low:.3f}, {high:.3f}] (per seed: {', '.join(f'{a:.3f}' for a in seeds['accuracy'])})"
        )
    if result.agreement_with_none is not None:
        lines.append(f"answers equal to no dropping's: {result.agreement_with_none:.1%}")
    lines.append("")
    lines.append(
        f"samples {m['n']}, vision tokens {m['vision_tokens']:.0f}, average retained {m['average_vision_tokens']:.2f}"
    )
    lines.append(f"FLOPs {m['flops']:.3e} ({m['flops_ratio']:.1%} of no dropping)")
    if m.get("encoder_flops") is not None:  # vision-encoder stages
        lines.append(f"vision-encoder FLOPs {m['encoder_flops']:.3e} ({m['encoder_flops_ratio']:.1%} of no dropping)")
    tokens = result.tokens
    if tokens:
        lines.append(
            f"vision tokens entering the LLM {tokens['entering_llm']:.1f}, KV-cache entries after prefill "
            f"{tokens['kv_cache_tokens']:.0f} ({tokens['kv_cache_tokens'] / tokens['kv_cache_tokens_no_drop']:.1%} "
            "of no dropping)"
        )
    lines.append(
        f"median prefill {m['prefill_latency_median_s'] * 1e3:.1f} ms, generation "
        f"{m['generation_latency_median_s'] * 1e3:.1f} ms, "
        f"scoring {m['scoring_share_of_prefill']:.2%} of prefill"
    )
    timing = result.time or {}
    if (timing.get("ttft") or {}).get("median") is not None:
        parts = ", ".join(f"{k} {timing[k]['median'] * 1e3:.1f}" for k in ("vision", "scoring", "prefill", "decode"))
        lines.append(f"median ms: {parts}; time to first token {timing['ttft']['median'] * 1e3:.1f}")
    if m.get("peak_memory_mb_max") is not None:
        lines.append(f"peak memory of the LLM part: {m['peak_memory_mb_max']:.1f} MB (max over batches)")
    return "\n".join(lines)
