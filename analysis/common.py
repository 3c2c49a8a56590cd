"""Shared helpers for the analysis commands: their options, evaluations through the run store, Table 1 rows and
output (CSV, markdown, PNG)."""

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


def run_methods(lvlm, benchmark, methods: dict, config, samples=None) -> dict:
    """Evaluate each labelled method into the run store (``config.store``); returns label -> result data.

    A method whose run key is finished in the store is read back, not rerun (the key holds the
    weights, ``LVLM.weights_fingerprint``: a retrained model under the same name is rerun); an
    interrupted one continues from its records (``v2drop.evaluation.store``).
    """
    from dataclasses import replace

    from v2drop.evaluation import evaluate_in_store

    results = {}
    for label, method in methods.items():
        labelled = replace(config, method=method.to_dict(), label=label)
        results[label] = evaluate_in_store(lvlm, benchmark, method, labelled, samples=samples).to_json()
    return results


def read_records(result: dict) -> list[dict]:
    """The per-sample records of one result of ``run_methods``."""
    from v2drop.evaluation import read_records as read_jsonl

    return read_jsonl(result["records_path"])


def table_rows(results: dict, extra: dict | None = None) -> list[dict]:
    """Table 1 rows (``v2drop.evaluation.collect.method_benchmark_table``, the one builder) of ``run_methods``'
    results, in their order, with each label's ``extra`` columns and its overall ``accuracy``."""
    from v2drop.evaluation.collect import method_benchmark_table, run_result

    runs = [run_result(res, res["records_path"], label) for label, res in results.items()]
    rows = [row for rows in method_benchmark_table(runs, order=list(results)).values() for row in rows]
    for row in rows:
        row.update((extra or {}).get(row["method"], {}))
        row["accuracy"] = results[row["method"]]["metrics"]["accuracy"]
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
    output: str | None = None  # tables and figures; None = runs/analysis/<command>
    store: str | None = None  # the run store evaluations are filed in; None = $V2DROP_STORE or runs/store

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
    from v2drop.evaluation.store import store_dir

    checks.check_writable(store_dir(args.store), directory=True)
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
        store=args.store,
    )
    return lvlm, benchmark, samples, vision_tokens_of(lvlm, samples[0]), config, run_dir(name, args.output)
