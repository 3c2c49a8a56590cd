"""One evaluation run end to end, as the ``experiments.evaluate`` command does it: checks first, then the model.

``check_evaluation`` does every check that can fail on the user's input (numbers, dtype, device,
method, benchmark and split, writable outputs, an earlier run's records, the baseline file, the
model's config.json, the data) without loading weights or creating anything; ``run_evaluation``
calls it, then loads the model and runs. An interrupted or failed run keeps its finished records
and says how to resume.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from v2drop import checks
from v2drop.evaluation.config import EvalConfig, EvalResult
from v2drop.evaluation.ranks import earlier_records, launched_rank, rank_files, read_finished
from v2drop.evaluation.records import write_trace


def default_run_dir(model: str, benchmark: str, method: str, schedule: str | None = None) -> Path:
    """``runs/eval/<model>-<benchmark>-<method>-<schedule>`` with unsafe characters replaced."""
    slug = re.sub(
        r"[^A-Za-z0-9_.-]+", "_", f"{Path(model).name}-{benchmark}-{method}-{Path(schedule or 'default').stem}"
    )
    return Path("runs") / "eval" / slug


@dataclass
class CheckedRun:
    """What ``check_evaluation`` resolved: the method, the benchmark, its split and samples, the baseline."""

    method: object  # the Method, rescaled to the model's depth
    benchmark: object  # the Benchmark instance
    split: str  # the split to evaluate
    samples: list  # the samples of that split (the first config.limit)
    baseline: dict | None  # the baseline result data, if given
    depth: int  # decoder layers of the model


def check_evaluation(
    config: EvalConfig,
    run_dir: str | os.PathLike,
    output=None,
    save_trace=None,
    baseline=None,
    resume: bool = False,
    lvlm=None,
) -> CheckedRun:
    """Every check of ``run_evaluation`` that needs no model weights; raises ValueError/FileNotFoundError, creates
    nothing.
    """
    from v2drop.benchmarks import get_benchmark
    from v2drop.evaluation.harness import check_sample
    from v2drop.method import Method

    checks.check_eval_config(config)
    method = Method.resolve(config.method)
    benchmark = get_benchmark(config.benchmark, data_dir=config.data_dir, **config.benchmark_args)
    split = benchmark.resolve_split(config.split)
    run_dir = Path(run_dir)
    checks.check_writable(run_dir, directory=True)
    for path in [run_dir / "result.json", run_dir / "records.jsonl"] + [Path(p) for p in (output, save_trace) if p]:
        checks.check_writable(path)
    # Only the launching process can tell an earlier run: the ranks Lightning's launcher starts
    # (the same command again, LOCAL_RANK set) find the records file rank 0 has just created.
    earlier = earlier_records(run_dir / "records.jsonl")
    if earlier is not None and not resume and not launched_rank():
        raise ValueError(
            f"{earlier} exists from an earlier run; add --resume to continue it or --run-dir to start elsewhere"
        )
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
    records: Path, command: str = "rerun the same command with --resume (run_evaluation(..., resume=True))"
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
    run_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    save_trace: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
    resume: bool = False,
    lvlm=None,
) -> EvalResult | None:
    """Evaluate ``config`` into ``run_dir`` (``records.jsonl``, ``result.json``); None on ranks other than 0.

    Every check that can fail (numbers, dtype, device, method, benchmark and split, writable
    outputs, an earlier run's records, the baseline file, the model's config, the data) runs
    before the model loads and before ``run_dir`` is created (``check_evaluation``).

    Parameters
    ----------
    run_dir : path
        Receives ``records.jsonl`` (one record per sample, as they finish) and ``result.json``.
        With several ranks (``config.devices``, ``config.num_nodes``) each rank appends to
        ``records.rank<k>.jsonl`` and rank 0 merges them into ``records.jsonl`` at the end.
    output : path, optional
        Also write the result JSON here.
    save_trace : path, optional
        Write each sample's kept vision positions per stage here (JSONL).
    baseline : path, optional
        A no-dropping ``result.json`` to report relative accuracy against.
    resume : bool
        Continue an interrupted run in ``run_dir``, skipping finished samples.
    lvlm : LVLM, optional
        An already loaded model instead of ``v2drop.load(config.model, ...)``.
    """
    import v2drop
    from v2drop.evaluation.harness import evaluate

    checked = check_evaluation(config, run_dir, output, save_trace, baseline, resume, lvlm)
    run_dir = Path(run_dir)
    records = run_dir / "records.jsonl"
    if lvlm is None:
        lvlm = v2drop.load(
            config.model,
            attn_implementation=config.attn_implementation,
            dtype=config.dtype,
            device=config.device,
            device_map=config.device_map,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = evaluate(
            lvlm,
            checked.benchmark,
            checked.method,
            config,
            records_path=records,
            resume=resume,
            baseline=checked.baseline,
            samples=checked.samples,
        )
    except BaseException as err:  # an interrupt or a failure mid-run: the records written so far stay valid
        note = resume_note(records)
        if note:
            err.add_note(note)
        raise
    if result is None:
        return None  # another rank: rank 0 writes the merged records and the result
    result.split = checked.split
    data = json.dumps(result.to_json(), indent=2)
    for path in [run_dir / "result.json"] + ([Path(output)] if output else []):
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
    if save_trace:
        Path(save_trace).parent.mkdir(parents=True, exist_ok=True)
        write_trace(records, save_trace)
    return result
