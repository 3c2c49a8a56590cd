"""One evaluation run end to end, as the ``experiments.evaluate`` command does it: checks first, then the model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from v2drop.evaluation.config import EvalConfig, EvalResult
from v2drop.evaluation.records import write_trace


def default_run_dir(model: str, benchmark: str, method: str, schedule: str | None = None) -> Path:
    """``runs/eval/<model>-<benchmark>-<method>-<schedule>`` with unsafe characters replaced."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(model).name}-{benchmark}-{method}-{Path(schedule or 'default').stem}")
    return Path("runs") / "eval" / slug


def check_writable(path: str | os.PathLike) -> None:
    """Create ``path``'s directory; a directory or file that cannot be written is an error now, not after the run."""
    path = Path(path)
    parent = path.parent if path.parent != Path("") else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"Cannot write {path}: the directory or file is not writable")


def run_evaluation(
    config: EvalConfig,
    run_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    save_trace: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
    resume: bool = False,
    lvlm=None,
) -> EvalResult:
    """Evaluate ``config`` into ``run_dir`` (``records.jsonl``, ``result.json``).

    Every check that can fail (method, benchmark, writable outputs, an earlier run's records,
    the baseline file) runs before the model loads.

    Parameters
    ----------
    run_dir : path
        Receives ``records.jsonl`` (one record per sample, as they finish) and ``result.json``.
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
    from v2drop.benchmarks import get_benchmark
    from v2drop.evaluation.harness import evaluate
    from v2drop.method import Method

    method = Method.resolve(config.method)
    benchmark = get_benchmark(config.benchmark, data_dir=config.data_dir, **config.benchmark_args)
    run_dir = Path(run_dir)
    outputs = [run_dir / "result.json"] + [Path(p) for p in (output, save_trace) if p]
    for path in outputs:
        check_writable(path)
    records = run_dir / "records.jsonl"
    if records.exists() and not resume:
        raise ValueError(f"{records} exists from an earlier run; add --resume to continue it or --run-dir to start elsewhere")
    base = None
    if baseline:
        if not Path(baseline).is_file():
            raise FileNotFoundError(f"baseline result {str(baseline)!r} does not exist")
        base = json.loads(Path(baseline).read_text())
    if lvlm is None:
        lvlm = v2drop.load(config.model, attn_implementation=config.attn_implementation, dtype=config.dtype,
                           device=config.device, device_map=config.device_map)
    result = evaluate(lvlm, benchmark, method, config, records_path=records, resume=resume, baseline=base)
    data = json.dumps(result.to_json(), indent=2)
    for path in [run_dir / "result.json"] + ([Path(output)] if output else []):
        path.write_text(data)
    if save_trace:
        write_trace(records, save_trace)
    return result
