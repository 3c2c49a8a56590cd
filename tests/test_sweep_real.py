"""Sweeps on a real benchmark's local copy and a local checkpoint, offline; bad data settings; the trial sample;
--workers.
"""

import csv
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from experiments import sweep
from v2drop.benchmarks import Sample
from v2drop.search import SweepConfig
from v2drop.search.data import stratified, sweep_benchmark, trial_samples

ROOT = Path(__file__).resolve().parent.parent
POPE = ROOT / "tests" / "fixtures" / "realbench" / "pope"


@pytest.fixture(scope="module")
def local_llava(tmp_path_factory):
    """A tiny LLaVA saved as a local checkpoint directory (what --set model=<dir> loads)."""
    from v2drop.testing import build

    path = tmp_path_factory.mktemp("tiny-llava")
    lvlm = build("llava")
    lvlm.model.save_pretrained(path)
    lvlm.processor.save_pretrained(path)
    return path


def pope_argv(model, run_dir, *extra):
    return [
        "--config",
        str(ROOT / "configs" / "sweep" / "default.yaml"),
        "--no-progress",
        "--trials",
        "3",
        "--set",
        f"model={model}",
        "--set",
        "benchmark=pope",
        "--set",
        f"eval.data_dir={POPE}",
        "--set",
        "eval.split=test",
        "--set",
        "eval.limit=4",
        "--set",
        "eval.batch_size=2",
        "--set",
        "eval.max_new_tokens=1",
        "--set",
        "eval.warmup=0",
        "--set",
        "confirm.limit=3",
        "--set",
        "total_trials=null",
        "--set",
        "enqueue_presets=[v2drop-llava15-128]",
        "--set",
        f"run_dir={run_dir}",
        "--set",
        "wandb.mode=disabled",
        *extra,
    ]


@pytest.mark.integration
def test_offline_sweep_on_a_local_pope_copy_writes_its_front(local_llava, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = sweep.main(pope_argv(local_llava, tmp_path / "run"))
    with open(tmp_path / "run" / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    assert front and {r["trial"] for r in front} == {str(r["trial"]) for r in result["front"]}
    assert len(result["rows"]) == 3 and (tmp_path / "run" / "pareto_confirmed.csv").exists()
    config = yaml.safe_load((tmp_path / "run" / "config.json").read_text())
    assert config["eval"]["data_dir"] == str(POPE) and config["benchmark"] == "pope"


def _no_images(tmp):
    dest = tmp / "pope"
    shutil.copytree(POPE, dest)
    shutil.rmtree(dest / "images")
    return str(dest)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"eval.data_dir": "{tmp}/nodata"}, ["nodata", "not a directory"]),
        ({"eval.benchmark_args": "{nope: 1}"}, ["nope", "does not take"]),
        ({"eval.benchmark_args": "{answer_reading: sloppy}"}, ["sloppy"]),
        ({"eval.split": "validation"}, ["validation", "valid splits: test"]),
        ({"confirm.split": "train"}, ["train", "valid splits: test"]),
        ({"eval.data_dir": _no_images}, ["COCO_val2014_000000000042"]),
        ({"eval.sample": "shuffled"}, ["shuffled", "stratified, first"]),
        ({"eval.pool": 0}, ["eval.pool", "got 0"]),
        ({"eval.device": "tpu9"}, ["eval.device", "tpu9"]),
        ({"eval.dtype": "float8"}, ["eval.dtype", "float8"]),
        ({"vision_cache_mb": -1}, ["vision_cache_mb", "-1"]),
    ],
)
def test_a_bad_data_setting_fails_before_the_study_exists(local_llava, tmp_path, capsys, change, words):
    key, value = next(iter(change.items()))
    value = value(tmp_path) if callable(value) else str(value).replace("{tmp}", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        sweep.main(pope_argv(local_llava, tmp_path / "run", "--set", f"{key}={value}"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()  # no run directory, no journal, no study


def test_the_hub_offline_without_data_dir_is_reported_before_the_study(local_llava, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        sweep.main(pope_argv(local_llava, tmp_path / "run", "--set", "eval.data_dir=null"))
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_stratified_sample_keeps_family_shares_and_is_seeded():
    samples = [Sample(f"{f}{i}", "q", "a", f, ()) for f, n in (("a", 50), ("b", 30), ("c", 20)) for i in range(n)]
    picked = stratified(samples, 10, seed=0)
    assert Counter(s.family for s in picked) == {"a": 5, "b": 3, "c": 2}
    assert [s.id for s in picked] == [
        s.id for s in stratified(list(samples), 10, seed=0)
    ]  # the same draw in every worker
    assert [s.id for s in picked] != [s.id for s in stratified(samples, 10, seed=1)]
    assert picked == sorted(picked, key=samples.index)  # split order
    odd = stratified(samples, 7, seed=0)  # 3.5, 2.1, 1.4: the largest remainder (a) gets the place left
    assert Counter(s.family for s in odd) == {"a": 4, "b": 2, "c": 1}
    assert stratified(samples[:5], 10, seed=0) == samples[:5]


def test_trial_samples_follow_eval_sample_and_pool():
    cfg = SweepConfig.from_dict({"benchmark": "pope", "eval": {"data_dir": str(POPE), "split": "test", "limit": 3}})
    bench = sweep_benchmark(cfg)
    everything = bench.load("test")
    first = SweepConfig.from_dict(
        {**{"benchmark": "pope"}, "eval": {"data_dir": str(POPE), "split": "test", "limit": 3, "sample": "first"}}
    )
    assert [s.id for s in trial_samples(bench, "test", first)] == [s.id for s in everything[:3]]
    drawn = trial_samples(bench, "test", cfg)
    assert len(drawn) == 3 and len({s.family for s in drawn}) == min(3, len({s.family for s in everything}))
    pooled = SweepConfig.from_dict(
        {"benchmark": "pope", "eval": {"data_dir": str(POPE), "split": "test", "limit": 2, "pool": 4}}
    )
    assert {s.id for s in trial_samples(bench, "test", pooled)} <= {s.id for s in everything[:4]}


def test_worker_devices_take_the_visible_gpus_in_turn(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert sweep.worker_devices(3) == ["2", "5", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.worker_devices(2) == [None, None]


@pytest.mark.integration
def test_two_workers_run_one_study_then_the_front_is_written_once(local_llava, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    argv = pope_argv(local_llava, tmp_path / "run", "--workers", "2", "--set", "study=two")
    out = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("worker ") >= 2 and "Pareto front of two (6 complete trials" in out.stdout
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(
        study_name="two", storage=JournalStorage(JournalFileBackend(str(tmp_path / "run" / "journal.log")))
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 and len(study.trials) == 6  # 3 per worker
    with open(tmp_path / "run" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "run" / "pareto_confirmed.csv").exists()


def test_a_sweep_with_the_vision_cache_finds_the_same_trials_as_one_without(tiny, tmp_path):
    """Objectives that do not depend on timing: the seeded sampler sees the same values, so every trial is the same."""
    from v2drop.search import run_sweep
    from v2drop.testing import EchoBench

    rows = {}
    for mb in (0, 64):
        cfg = SweepConfig.from_dict(
            {
                "study": "cache",
                "benchmark": "echo",
                "trials": 4,
                "total_trials": None,
                "run_dir": str(tmp_path / f"run{mb}"),
                "objectives": ["accuracy", "average_tokens"],
                "vision_cache_mb": mb,
                "enqueue_presets": ["v2drop-llava15-128"],
                "eval": {"limit": 3, "batch_size": 2, "max_new_tokens": 2, "warmup": 1},
                "confirm": {"limit": 3},
                "search": {"scorers": {"v2drop": {}, "visionzip": {}}, "kinds": ["one-shot", "progressive"]},
                "wandb": {"mode": "disabled"},
            }
        )
        result = run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
        keep = ("trial", "label", "scorer", "schedule", "accuracy", "average_tokens", "flops_ratio")
        rows[mb] = [{k: r.get(k) for k in keep} for r in result["rows"]]
    assert len(rows[0]) == 4 and rows[0] == rows[64]
