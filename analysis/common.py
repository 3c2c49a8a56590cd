"""Shared helpers for the analysis commands: their options, run directories and table output (CSV, markdown, PNG)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

from v2drop.budgets import PAPER_BUDGETS, PAPER_VISION_TOKENS, budget_method, scorer_variants  # noqa: E402,F401  (re-exported for the scripts)
from v2drop.tables import write_table  # noqa: E402,F401


def run_dir(name: str, root: str | Path | None = None) -> Path:
    """``runs/analysis/<name>`` (or ``root``), created."""
    path = Path(root) if root else Path("runs") / "analysis" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(data, path: Path) -> None:
    """Pretty JSON."""
    path.write_text(json.dumps(data, indent=2, default=str))


def vision_tokens_of(lvlm, sample) -> int:
    """Vision tokens the model gets for ``sample``."""
    prompt = lvlm.format_prompt(sample.question, n_images=len(sample.images))
    inputs = lvlm.prepare([prompt], [list(sample.images)])
    return int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())


def run_methods(lvlm, benchmark, methods: dict, out: Path, config, samples=None) -> dict:
    """Evaluate each labelled method, caching ``out/<label>/result.json``; returns label -> result dict.

    A label whose result exists for the same method, config and weights (``LVLM.weights_fingerprint``:
    a retrained model under the same name is rerun) is read back, not rerun; an interrupted label
    resumes from its records.
    """
    from dataclasses import asdict

    from v2drop.evaluation import evaluate

    results = {}
    for label, method in methods.items():
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "result.json"
        wanted = {
            "method": method.to_dict(),
            "config": {**asdict(config), "method": method.to_dict()},
            "weights": lvlm.weights_fingerprint,
        }
        if path.exists():
            old = json.loads(path.read_text())
            if all(old.get(key) == value for key, value in wanted.items()):
                results[label] = old
                continue
            (folder / "records.jsonl").unlink(missing_ok=True)
        from dataclasses import replace

        result = evaluate(
            lvlm,
            benchmark,
            method,
            replace(config, method=method.to_dict()),
            records_path=folder / "records.jsonl",
            resume=True,
            samples=samples,
        )
        results[label] = {**result.to_json(), "weights": lvlm.weights_fingerprint}
        write_json(results[label], path)
    return results


def read_records(out: Path, label: str) -> list[dict]:
    """The per-sample records of one label of ``run_methods``."""
    return [json.loads(line) for line in (out / label / "records.jsonl").read_text().splitlines() if line.strip()]


def relative_rows(results: dict, baseline: str = "none", extra: dict | None = None) -> list[dict]:
    """Rows of per-family accuracy, overall accuracy and the paper's average (mean of per-family ratios to
    ``baseline``).
    """
    base = results[baseline]["per_family"]
    rows = []
    for label, res in results.items():
        fams = res["per_family"]
        ratios = [fams[f] / base[f] for f in fams if base.get(f)]
        m = res["metrics"]
        row = {"method": label, **(extra or {}).get(label, {})}
        row.update({f: fams[f] for f in sorted(fams)})
        row.update(
            {
                "accuracy": m["accuracy"],
                "avg_vs_none": sum(ratios) / len(ratios) if ratios else None,
                "avg_vision_tokens": m["average_vision_tokens"],
                "flops_ratio": m["flops_ratio"],
                "prefill_ms": m["prefill_latency_median_s"] * 1e3,
                "generation_ms": m["generation_latency_median_s"] * 1e3,
            }
        )
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


@dataclass
class AnalysisConfig:
    """The options every analysis command that runs a model shares (each command adds its own in a subclass)."""

    model: str = "proxy"  # model name for v2drop.load
    benchmark: str = "digits"  # registered benchmark
    split: str | None = None  # benchmark split; None = the benchmark's default split
    limit: int | None = None  # first N samples; None = the whole split
    batch_size: int = 8  # samples per generate call
    threads: int = 2  # torch CPU threads
    attn_implementation: str = "sdpa"  # eager, sdpa or flash_attention_2
    output: str | None = None  # run directory; None = runs/analysis/<command>

    def __post_init__(self):
        from v2drop import checks

        checks.check_int("--limit", self.limit, 1, optional=True)
        checks.check_int("--batch-size", self.batch_size, 1)
        checks.check_int("--threads", self.threads, 1)
        checks.check_attn(self.attn_implementation)


def resolve_split(args: AnalysisConfig, benchmark) -> str:
    """``split`` checked against the benchmark's splits, or its default split when not given; stored back on
    ``args``."""
    args.split = benchmark.resolve_split(args.split)
    return args.split


def check_args(args: AnalysisConfig, name: str):
    """The shared options checked before any model loads or directory is made (numbers and attention are checked by
    ``AnalysisConfig`` itself): benchmark and split, the output directory, the model's config.json. Returns the
    benchmark."""
    from v2drop import checks
    from v2drop.benchmarks import get_benchmark

    benchmark = get_benchmark(args.benchmark)
    resolve_split(args, benchmark)
    checks.check_writable(Path(args.output) if args.output else Path("runs") / "analysis" / name, directory=True)
    checks.model_config(args.model)
    return benchmark


def setup(args: AnalysisConfig, name: str):
    """Check the arguments, load benchmark samples and model, and build the shared evaluation config."""
    import torch

    import v2drop
    from v2drop.evaluation import EvalConfig

    benchmark = check_args(args, name)
    samples = benchmark.load(args.split, args.limit)
    torch.set_num_threads(args.threads)
    lvlm = v2drop.load(args.model, attn_implementation=args.attn_implementation)
    config = EvalConfig(
        model=args.model,
        benchmark=args.benchmark,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        threads=args.threads,
        attn_implementation=args.attn_implementation,
        progress=True,
    )
    return lvlm, benchmark, samples, vision_tokens_of(lvlm, samples[0]), config, run_dir(name, args.output)
