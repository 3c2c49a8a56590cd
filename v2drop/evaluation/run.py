"""One evaluation run end to end, as the ``experiments.evaluate`` command does it: checks first, then the model.

``check_evaluation`` does every check that can fail on the user's input (numbers, dtype, device,
method, benchmark and split, a writable run store and outputs, the baseline file, the model's
config.json, the data) without loading weights or creating anything; ``run_evaluation`` calls it,
then loads the model and evaluates into the run store (``v2drop.evaluation.store``): a finished
key is read back, an interrupted one continues. An interrupted or failed run keeps its finished
records and says how to continue.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from v2drop import checks
from v2drop.evaluation.config import EvalConfig, EvalResult
from v2drop.evaluation.ranks import rank_files, read_finished
from v2drop.evaluation.records import write_trace
from v2drop.evaluation.store import store_dir
from v2drop.lvlm import check_processor_kwargs


@dataclass
class CheckedRun:
    """What ``check_evaluation`` resolved: the method, the benchmark, its split and samples, the baseline."""

    method: object  # the Method, rescaled to the model's depth
    benchmark: object  # the Benchmark instance
    split: str  # the split to evaluate
    samples: list  # the samples of that split (the first config.limit)
    baseline: dict | None  # the baseline result data, if given
    depth: int  # decoder layers of the model


def check_evaluation(config: EvalConfig, output=None, save_trace=None, baseline=None, lvlm=None) -> CheckedRun:
    """Every check of ``run_evaluation`` that needs no model weights; raises ValueError/FileNotFoundError, creates
    nothing.
    """
    from v2drop.benchmarks import get_benchmark
    from v2drop.evaluation.harness import check_sample
    from v2drop.method import Method

    checks.check_eval_config(config)
    checks.check_int("seeds", config.seeds, 1, optional=True)
    method = Method.resolve(config.method)
    benchmark = get_benchmark(config.benchmark, data_dir=config.data_dir, **config.benchmark_args)
    split = benchmark.resolve_split(config.split)
    checks.check_writable(store_dir(config.store), directory=True)
    for path in [Path(p) for p in (output, save_trace) if p]:
        checks.check_writable(path)
    base = checks.read_result(baseline) if baseline else None
    depth = lvlm.depth if lvlm is not None else checks.model_depth(config.model)
    method = method.rescaled(depth)
    samples = benchmark.load(split, config.limit)
    if not samples:
        raise ValueError(f"Benchmark {benchmark.name!r} split {split!r} has no samples")
    for sample in samples:
        check_sample(sample, benchmark)
    return CheckedRun(method, benchmark, split, samples, base, depth)


def resume_note(
    records: Path, command: str = "rerun the same command (run_evaluation with the same config)"
) -> str | None:
    """How many finished records ``records`` and its rank files keep and how to continue, or None when they hold
    none."""
    n = len(read_finished(records))
    ranks = rank_files(records)
    where = f"{records}" + (
        f" and {len(ranks)} rank file(s) beside it ({records.stem}.rank*{records.suffix})" if ranks else ""
    )
    return f"{n} finished sample(s) are kept in {where}; {command} to continue" if n else None


def run_evaluation(
    config: EvalConfig,
    output: str | os.PathLike | None = None,
    save_trace: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
    lvlm=None,
) -> EvalResult | None:
    """Evaluate ``config`` into the run store (``config.store``); None on ranks other than 0.

    Every check that can fail (numbers, dtype, device, method, benchmark and split, writable
    outputs, the baseline file, the model's config, the data) runs before the model loads and
    before anything is created (``check_evaluation``). The result is filed under its key in the
    store (``v2drop.evaluation.store``): a finished key is read back without model work
    (``result.reused``), an interrupted one continues from its records.

    With ``config.seeds = N`` a stochastic method (``Method.stochastic``) runs with seeds 0..N-1, each
    filed under its own key; the result is seed 0's with ``seeds`` holding every seed's accuracy, their
    mean and its 95% interval over samples and seeds (``accounting.seed_sample_ci``). A deterministic
    method runs once, with a note saying so.

    Parameters
    ----------
    output : path, optional
        Also write the result JSON here.
    save_trace : path, optional
        Write each sample's kept vision positions per stage here (JSONL).
    baseline : path, optional
        A no-dropping ``result.json`` to report relative accuracy against (in the returned result
        and ``output``; the stored result has none).
    lvlm : LVLM, optional
        An already loaded model instead of ``v2drop.load(config.model, ...)``.
    """
    import v2drop
    from v2drop.evaluation.harness import apply_baseline

    checked = check_evaluation(config, output, save_trace, baseline, lvlm)
    if lvlm is None:
        lvlm = v2drop.load(
            config.model,
            attn_implementation=config.attn_implementation,
            dtype=config.dtype,
            device=config.device,
            device_map=config.device_map,
        )
    check_processor_kwargs(lvlm.processor, config.processor_args)  # a bad option fails before any sample runs
    try:
        result = _evaluate_seeds(lvlm, checked, config)
    except BaseException as err:  # an interrupt or a failure mid-run: the records written so far stay valid
        records = _unfinished_records(config, lvlm, checked)
        note = resume_note(records) if records is not None else None
        if note:
            err.add_note(note)
        raise
    if result is None:
        return None  # another rank: rank 0 writes the merged records and the result
    if checked.baseline is not None:
        result = apply_baseline(result, checked.baseline)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result.to_json(), indent=2))
    if save_trace:
        Path(save_trace).parent.mkdir(parents=True, exist_ok=True)
        write_trace(result.records_path, save_trace)
    return result


def _evaluate_seeds(lvlm, checked: CheckedRun, config: EvalConfig) -> EvalResult | None:
    """``evaluate_in_store`` once, or once per seed of ``config.seeds`` for a stochastic method (see
    ``run_evaluation``)."""
    from dataclasses import replace

    from v2drop.evaluation.accounting import seed_sample_ci
    from v2drop.evaluation.records import read_records
    from v2drop.evaluation.store import evaluate_in_store

    method = checked.method
    if config.seeds is None or not method.stochastic:
        result = evaluate_in_store(
            lvlm, checked.benchmark, method, config, samples=checked.samples, split=checked.split
        )
        if result is not None and config.seeds is not None:
            result.notes = [*result.notes, f"seeds: {method.scorer_name or 'none'} is deterministic; run once"]
        return result
    results = []
    for seed in range(config.seeds):
        seeded = method.seeded(seed)
        one = replace(config, method=seeded.to_dict())
        results.append(
            evaluate_in_store(lvlm, checked.benchmark, seeded, one, samples=checked.samples, split=checked.split)
        )
    if results[0] is None:
        return None  # another rank
    tables = [{r["id"]: float(bool(r["correct"])) for r in read_records(res.records_path)} for res in results]
    ids = list(tables[0])
    matrix = [[t[i] for i in ids] for t in tables]
    accuracies = [res.metrics["accuracy"] for res in results]
    result = results[0]
    result.seeds = {
        "seeds": list(range(config.seeds)),
        "accuracy": accuracies,
        "mean": sum(accuracies) / len(accuracies),
        "ci95": seed_sample_ci(matrix),
        "folders": [Path(res.records_path).parent.name for res in results],
    }
    return result


def _unfinished_records(config: EvalConfig, lvlm, checked: CheckedRun) -> Path | None:
    """The records file of the run's store folder (None when the key cannot be made)."""
    from v2drop.evaluation.store import RunKey

    try:
        key = RunKey.of(lvlm, config, checked.split, checked.samples, checked.method.rescaled(lvlm.depth))
    except Exception:  # noqa: BLE001 - only a note is at stake
        return None
    return store_dir(config.store) / key.folder_name / "records.jsonl"
