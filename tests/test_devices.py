"""Evaluation on several ranks (``--devices N``, ``--num-nodes M``) gives exactly the single-process records and
metrics.

Two CPU processes (Lightning's DDP launcher, gloo) predict each sample once, write one records file
per rank, and rank 0 merges them in sample order; a two-rank run killed mid-way resumes, on two
ranks or on one, to the same result without predicting a finished sample again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from v2drop.evaluation.ranks import (
    ShardSampler,
    earlier_records,
    launched_rank,
    merge_records,
    rank_file,
    rank_files,
    read_finished,
    shard,
)
from v2drop.evaluation.records import append_records, read_records, repair_tail

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 12
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
# Timings and memory differ from run to run; everything else in a record is a function of the sample and its batch.
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


# --- sharding and the files, without processes -------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_shards_cover_every_sample_once_in_whole_batches(world_size, batch_size):
    for n in range(0, 14):
        shards = [shard(n, batch_size, rank, world_size) for rank in range(world_size)]
        assert [i for s in shards for i in s] == list(range(n))  # each sample once, in order
        batches = [list(s[i : i + batch_size]) for s in shards for i in range(0, len(s), batch_size)]
        assert batches == [
            list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)
        ]  # one process's batches
        n_batches = [-(-len(s) // batch_size) for s in shards]
        assert max(n_batches) - min(n_batches) <= 1  # balanced to within one batch; ranks beyond the batches get none


def test_sampler_outside_a_process_group_yields_everything():
    assert list(ShardSampler(5, 2)) == [0, 1, 2, 3, 4] and len(ShardSampler(5, 2)) == 5


def test_rank_files_resume_and_merge(tmp_path):
    path = tmp_path / "records.jsonl"
    assert earlier_records(path) is None
    append_records([{"id": "c", "v": 1}], rank_file(path, 1))
    assert earlier_records(path) == rank_file(path, 1)  # rank files alone are an earlier run too
    append_records([{"id": "a", "v": 1}], path)
    append_records(
        [{"id": "b", "v": 1}, {"id": "a", "v": 2}], rank_file(path, 0)
    )  # "a" twice: a crash between merge and cleanup
    append_records([{"id": "x", "v": 1}], rank_file(path, 10))  # an id outside this run's samples
    with open(rank_file(path, 1), "a") as f:
        f.write('{"id": "d", "v"')  # torn
    (tmp_path / "records.rankx.jsonl").write_text("not a rank file\n")
    assert rank_files(path) == [rank_file(path, 0), rank_file(path, 1), rank_file(path, 10)]
    done = read_finished(path)
    assert {k: r["v"] for k, r in done.items()} == {"a": 1, "b": 1, "c": 1, "x": 1}
    merged = merge_records(path, ["d", "c", "b", "a"])
    assert [r["id"] for r in merged] == ["c", "b", "a", "x"] == [r["id"] for r in read_records(path)]
    assert rank_files(path) == [] and (tmp_path / "records.rankx.jsonl").exists()


def test_repair_tail_cuts_a_torn_line_and_ends_a_whole_one(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "x')
    repair_tail(path)
    assert path.read_text() == '{"id": "a"}\n'
    path.write_text('{"id": "a"}\n{"id": "b"}')  # killed between the record and its newline
    repair_tail(path)
    append_records([{"id": "c"}], path)
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "env, launched",
    [
        ({}, False),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, False),
        ({"LOCAL_RANK": "1"}, True),
        ({"NODE_RANK": "2", "LOCAL_RANK": "0"}, True),
        ({"RANK": "3"}, True),
    ],
)
def test_launched_rank_reads_the_launchers_variables(monkeypatch, env, launched):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_rank() is launched


def test_several_ranks_need_a_records_path(tiny):
    from v2drop import Method
    from v2drop.evaluation import EvalConfig, evaluate
    from v2drop.testing import EchoBench

    config = EvalConfig(
        model="tiny", benchmark="echo", warmup=0, max_new_tokens=1, progress=False, accelerator="cpu", devices=2
    )
    with pytest.raises(ValueError, match="2 ranks .* needs a records path"):
        evaluate(tiny("llava"), EchoBench(2), Method.none(), config)


# --- two processes ---------------------------------------------------------------------------


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("V2DROP_DEBUG", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")
    }
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def _dir(store: Path) -> Path:
    """The run's key folder in the run store ``store`` (each test's store holds one run; before it exists, a path that
    does not)."""
    found = sorted(p for p in store.glob("*") if p.is_dir()) if store.is_dir() else []
    return found[0] if found else store / "pending"


def _command(run: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "experiments.evaluate", *ARGS, "--store", str(run), *extra]


def _evaluate(run: Path, *extra) -> dict:
    done = subprocess.run(
        _command(run, *extra), cwd=run.parent, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads((_dir(run) / "result.json").read_text())


def _reference(run: Path, batch_size: int):
    """The single-process run, in this process: (stable records in order, result)."""
    from v2drop.config import config_from_dict
    from v2drop.evaluation import EvalConfig, run_evaluation
    from v2drop.method import resolve_method

    method = resolve_method("v2drop", "v2drop-llava15-128")
    cfg = config_from_dict(
        EvalConfig,
        {
            "model": "proxy",
            "benchmark": "digits",
            "method": method.to_dict(),
            "limit": LIMIT,
            "batch_size": batch_size,
            "warmup": 0,
            "max_new_tokens": 2,
            "threads": 1,
            "progress": False,
        },
    )
    result = run_evaluation(replace(cfg, store=str(run)))
    return [_stable(r) for r in read_records(result.records_path)], result.to_json()


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def _all_lines(run: Path) -> list[dict]:
    """Every whole record in the run's files, duplicates included (a sample predicted twice shows twice)."""
    return [
        r
        for path in [_dir(run) / "records.jsonl"] + rank_files(_dir(run) / "records.jsonl")
        if path.exists()
        for r in read_records(path)
    ]


def _same_result(result: dict, reference: dict) -> None:
    assert {k: result["metrics"][k] for k in METRICS} == {k: reference["metrics"][k] for k in METRICS}
    assert result["per_family"] == reference["per_family"] and result["split"] == reference["split"] == "test"


@pytest.mark.integration
def test_two_ranks_give_the_single_process_records_and_metrics(tmp_path):
    ref_records, reference = _reference(tmp_path / "one", batch_size=2)
    run = tmp_path / "two"
    result = _evaluate(run, "--batch-size", "2", "--devices", "2")
    records = read_records(_dir(run) / "records.jsonl")
    assert [_stable(r) for r in records] == ref_records  # same ids in sample order, predictions, correct, kept, batches
    assert rank_files(_dir(run) / "records.jsonl") == []  # merged into records.jsonl
    _same_result(result, reference)
    assert result["config"]["devices"] == 2

    # Resume with one batch left: one rank predicts it, the other has no sample and still takes part.
    (_dir(run) / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:-2]))
    (_dir(run) / "result.json").unlink()
    result = _evaluate(run, "--batch-size", "2", "--devices", "2")
    resumed = read_records(_dir(run) / "records.jsonl")
    assert resumed[:-2] == records[:-2]  # the finished samples were not predicted again (same timings)
    assert [_stable(r) for r in resumed] == ref_records
    _same_result(result, reference)


def _start_and_kill(run: Path, ready, *extra) -> int:
    """Start a two-rank evaluation, SIGKILL its whole process group (both ranks) once ``ready(run)``; its exit
    status."""
    proc = subprocess.Popen(
        _command(run, "--devices", "2", *extra),
        cwd=run.parent,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not ready(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGKILL, 0), err
    return proc.returncode


@pytest.mark.integration
def test_killed_two_rank_run_resumes_without_redoing_finished_samples(tmp_path):

    ref_records, reference = _reference(tmp_path / "one", batch_size=1)
    run = tmp_path / "run"

    def both_ranks_wrote(run):
        files = [rank_file(_dir(run) / "records.jsonl", k) for k in (0, 1)]
        return all(f.exists() and read_records(f) for f in files) and len(_all_lines(run)) >= 3

    if _start_and_kill(run, both_ranks_wrote) == 0 or len(_all_lines(run)) >= LIMIT:
        pytest.skip("the run finished before it could be killed")  # a very fast machine
    first = {r["id"]: r for r in _all_lines(run)}
    assert len(first) == len(_all_lines(run)) and not (_dir(run) / "result.json").exists()
    assert all(
        len(read_records(rank_file(_dir(run) / "records.jsonl", k))) >= 1 for k in (0, 1)
    )  # both ranks were predicting

    if _start_and_kill(run, lambda run: len(_all_lines(run)) >= len(first) + 2) == 0:
        pytest.skip("the resumed run finished before it could be killed")
    lines = _all_lines(run)
    assert max(Counter(r["id"] for r in lines).values()) == 1  # no sample predicted twice, on any rank
    second = {r["id"]: r for r in lines}
    assert len(second) > len(first) and all(second[i] == r for i, r in first.items())

    result = _evaluate(run)  # one process finishes what two started
    records = read_records(_dir(run) / "records.jsonl")
    assert [_stable(r) for r in records] == ref_records and rank_files(_dir(run) / "records.jsonl") == []
    assert all(r == second[r["id"]] for r in records if r["id"] in second)  # finished samples were not predicted again
    _same_result(result, reference)
