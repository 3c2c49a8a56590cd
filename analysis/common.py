"""Shared helpers for the analysis commands: run directories and table output (CSV, markdown, PNG)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display


def run_dir(name: str, root: str | Path | None = None) -> Path:
    """``runs/analysis/<name>`` (or ``root``), created."""
    path = Path(root) if root else Path("runs") / "analysis" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_table(rows: Sequence[dict], path_stem: Path, columns: Sequence[str] | None = None, floatfmt: str = "{:.4g}") -> str:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md``; return the markdown."""
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    path_stem.with_suffix(".md").write_text(markdown)
    return markdown


def write_json(data, path: Path) -> None:
    """Pretty JSON."""
    path.write_text(json.dumps(data, indent=2, default=str))


# --- running methods at the paper's budgets -------------------------------------------------------

PAPER_BUDGETS = (192, 128, 64)  # average retained vision tokens of 576 on LLaVA-1.5-7B
PAPER_VISION_TOKENS = 576


def scorer_variants() -> dict[str, tuple[str, dict]]:
    """``{label: (preset prefix whose schedule is used, scorer settings)}`` for every registered scorer.

    V²Drop comes first, once per variation metric; every other scorer follows in registry order,
    on its own ``<name>-llava15-<budget>`` presets when it has them, else on V²Drop's progressive
    schedule (so a newly registered scorer appears in every comparison table without an edit here).
    """
    from v2drop.method import list_presets
    from v2drop.scorers import list_scorers
    from v2drop.scorers.variation import METRICS

    presets = list_presets()
    variants = {f"v2drop-{metric}": ("v2drop", {"metric": metric}) for metric in METRICS}
    for name in list_scorers():
        if name == "v2drop":
            continue
        has_presets = any(p.startswith(f"{name}-llava15-") for p in presets)
        variants[name] = (name, {}) if has_presets else ("v2drop", {"name": name})
    return variants


# Kept as a module constant for callers that import it; built from the registry at import time.
VARIANTS = scorer_variants()


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


def vision_tokens_of(lvlm, sample) -> int:
    """Vision tokens the model gets for ``sample``."""
    prompt = lvlm.format_prompt(sample.question, n_images=len(sample.images))
    inputs = lvlm.prepare([prompt], [list(sample.images)])
    return int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())


def run_methods(lvlm, benchmark, methods: dict, out: Path, config, samples=None) -> dict:
    """Evaluate each labelled method, caching ``out/<label>/result.json``; returns label -> result dict.

    A label whose result exists for the same method and config is read back, not rerun; an
    interrupted label resumes from its records.
    """
    from dataclasses import asdict

    from v2drop.evaluation import evaluate

    results = {}
    for label, method in methods.items():
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "result.json"
        wanted = {"method": method.to_dict(), "config": {**asdict(config), "method": method.to_dict()}}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("method") == wanted["method"] and old.get("config") == wanted["config"]:
                results[label] = old
                continue
            (folder / "records.jsonl").unlink(missing_ok=True)
        from dataclasses import replace

        result = evaluate(lvlm, benchmark, method, replace(config, method=method.to_dict()),
                          records_path=folder / "records.jsonl", resume=True, samples=samples)
        results[label] = result.to_json()
        write_json(results[label], path)
    return results


def read_records(out: Path, label: str) -> list[dict]:
    """The per-sample records of one label of ``run_methods``."""
    return [json.loads(line) for line in (out / label / "records.jsonl").read_text().splitlines() if line.strip()]


def relative_rows(results: dict, baseline: str = "none", extra: dict | None = None) -> list[dict]:
    """Rows of per-family accuracy, overall accuracy and the paper's average (mean of per-family ratios to ``baseline``)."""
    base = results[baseline]["per_family"]
    rows = []
    for label, res in results.items():
        fams = res["per_family"]
        ratios = [fams[f] / base[f] for f in fams if base.get(f)]
        m = res["metrics"]
        row = {"method": label, **(extra or {}).get(label, {})}
        row.update({f: fams[f] for f in sorted(fams)})
        row.update({
            "accuracy": m["accuracy"],
            "avg_vs_none": sum(ratios) / len(ratios) if ratios else None,
            "avg_vision_tokens": m["average_vision_tokens"],
            "flops_ratio": m["flops_ratio"],
            "prefill_ms": m["prefill_latency_median_s"] * 1e3,
            "generation_ms": m["generation_latency_median_s"] * 1e3,
        })
        rows.append(row)
    return rows


def save_figure(fig, out: Path, name: str, dpi: int = 120, message: str | None = None) -> Path:
    """Lay out ``fig``, save it as ``out/<name>.png``, close it and print ``message`` (default ``wrote <out>``)."""
    import matplotlib.pyplot as plt

    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)  # commands run inside one process (tests) would otherwise keep every figure alive
    print(message or f"wrote {out}")
    return path


def command_parser(doc: str):
    """An argument parser with ``doc`` as its description and the arguments every analysis command shares."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    return parser


def add_common_args(parser) -> None:
    """The arguments every analysis command shares."""
    parser.add_argument("--model", default="proxy", help="model name for v2drop.load")
    parser.add_argument("--benchmark", default="digits", help="registered benchmark")
    parser.add_argument("--split", default=None, help="benchmark split (default: the benchmark's default split)")
    parser.add_argument("--limit", type=int, default=None, help="first N samples (default: the whole split)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--out", default=None, help="run directory (default runs/analysis/<command>)")


def resolve_split(args, benchmark) -> str:
    """``--split`` if given, else the benchmark's default split (``test`` for benchmarks that declare none); stored back on ``args``."""
    if args.split is None:
        args.split = getattr(benchmark, "default_split", None) or "test"
    return args.split


def setup(args, name: str):
    """Load model and benchmark, check them, and build the shared evaluation config."""
    import torch

    import v2drop
    from v2drop.benchmarks import get_benchmark
    from v2drop.evaluation import EvalConfig

    torch.set_num_threads(args.threads)
    benchmark = get_benchmark(args.benchmark)
    lvlm = v2drop.load(args.model, attn_implementation=args.attn)
    samples = benchmark.load(resolve_split(args, benchmark), args.limit)
    config = EvalConfig(model=args.model, benchmark=args.benchmark, split=args.split, limit=args.limit,
                        batch_size=args.batch_size, threads=args.threads, attn_implementation=args.attn, progress=True)
    return lvlm, benchmark, samples, vision_tokens_of(lvlm, samples[0]), config, run_dir(name, args.out)
