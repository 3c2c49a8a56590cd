"""Killing an evaluation mid-run loses nothing: the same command again gives the records and metrics of an
uninterrupted run (the run store continues the key's records).

The first run is stopped with SIGTERM (what a scheduler sends: the command says ``interrupted``,
where the finished records are and how to continue, exit status 130), the resumed run with SIGKILL
(a crash: no handler runs, a last line may be torn), and a third run finishes the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 16
ARGS = [
    "--model",
    "proxy",
    "--benchmark",
    "digits",
    "--method",
    "v2drop",
    "--schedule",
    "v2drop-llava15-128",
    "--limit",
    str(LIMIT),
    "--warmup",
    "0",
    "--max-new-tokens",
    "2",
    "--threads",
    "1",
    "--no-progress",
]
# Timings and memory differ from run to run; everything else in a record is a function of the sample.
VOLATILE = {
    "prefill_seconds",
    "vision_seconds",
    "generate_seconds",
    "decode_seconds",
    "ttft_seconds",
    "scoring_seconds",
    "peak_memory_bytes",
    "data_wait_seconds",
    "step_seconds",
}
METRICS = ("accuracy", "n", "average_vision_tokens", "vision_tokens", "flops", "flops_ratio")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "V2DROP_DEBUG"}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def _dir(store: Path) -> Path:
    """The run's key folder in the run store ``store`` (each test's store holds one run; before it exists, a path that
    does not)."""
    found = sorted(p for p in store.glob("*") if p.is_dir()) if store.is_dir() else []
    return found[0] if found else store / "pending"


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _start_and_kill(run: Path, sig: int, at_least: int, extra=()) -> subprocess.CompletedProcess:
    """Start the evaluation, wait until ``at_least`` records are on disk, send ``sig``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.evaluate", *ARGS, "--store", str(run), *extra],
        cwd=run.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while _lines(_dir(run) / "records.jsonl") < at_least and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def test_killed_evaluation_resumes_to_the_uninterrupted_result(tmp_path):
    from v2drop.config import config_from_dict
    from v2drop.evaluation import EvalConfig, read_records, run_evaluation
    from v2drop.method import resolve_method

    method = resolve_method("v2drop", "v2drop-llava15-128")
    cfg = config_from_dict(
        EvalConfig,
        {
            "model": "proxy",
            "benchmark": "digits",
            "method": method.to_dict(),
            "limit": LIMIT,
            "warmup": 0,
            "max_new_tokens": 2,
            "threads": 1,
            "progress": False,
        },
    )
    reference = run_evaluation(replace(cfg, store=str(tmp_path / "reference")))
    ref_records = {r["id"]: _stable(r) for r in read_records(reference.records_path)}

    run = tmp_path / "run"
    first = _start_and_kill(run, signal.SIGTERM, at_least=3)
    kept = _lines(_dir(run) / "records.jsonl")
    if first.returncode == 0 or kept >= LIMIT:
        pytest.skip("the run finished before it could be interrupted")  # a very fast machine
    assert first.returncode == 130, first.stderr
    assert "interrupted" in first.stderr and "Traceback" not in first.stderr
    assert f"finished sample(s) are kept in {_dir(run) / 'records.jsonl'}" in first.stderr
    assert "rerun the same command" in first.stderr
    assert not (_dir(run) / "result.json").exists()

    second = _start_and_kill(run, signal.SIGKILL, at_least=kept + 2)
    assert second.returncode in (-signal.SIGKILL, 0), second.stderr

    third = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", *ARGS, "--store", str(run)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert third.returncode == 0, third.stderr
    records = read_records(_dir(run) / "records.jsonl")
    assert sorted(r["id"] for r in records) == sorted(ref_records)  # every sample exactly once
    assert {r["id"]: _stable(r) for r in records} == ref_records
    result = json.loads((_dir(run) / "result.json").read_text())
    assert {k: result["metrics"][k] for k in METRICS} == {k: reference.metrics[k] for k in METRICS}
    assert result["per_family"] == reference.per_family and result["split"] == reference.split == "test"
