"""Sweeps: artifacts and a truly non-dominated front, concurrent workers, a killed worker, wandb modes, bad input."""

import csv
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from v2drop.search import (
    SweepConfig,
    finish_sweep,
    make_storage,
    pareto_indices,
    run_sweep,
    validate,
    wandb_mode,
)
from v2drop.testing import EchoBench

ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path, **kw):
    data = {
        "study": "tiny",
        "model": "tiny",
        "benchmark": "echo",
        "trials": 8,
        "total_trials": None,
        "run_dir": str(tmp_path / "run"),
        "eval": {"limit": 3, "batch_size": 3, "max_new_tokens": 1, "warmup": 0},
        "confirm": {"limit": 3},
        "search": {
            "scorers": {"v2drop": {"metric": ["l2", "l1"]}, "random": {}},
            "kinds": ["one-shot", "progressive"],
            "stages": [2, 3],
        },
        "wandb": {"mode": "disabled"},
    }
    data.update(kw)
    return SweepConfig.from_dict(data)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_writes_artifacts_and_a_true_front(tiny, tmp_path, run_store):
    cfg = config(tmp_path, objectives=["accuracy", "average_tokens"])
    result = run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
    run = tmp_path / "run"
    for name in ("trials.csv", "pareto.csv", "pareto_confirmed.csv", "pareto.png", "config.json", "journal.log"):
        assert (run / name).exists(), name
    trials = read_csv(run / "trials.csv")
    assert len(trials) == 8
    labels = {t["label"] for t in trials}
    assert {"none", "v2drop-llava15-192", "v2drop-llava15-128", "v2drop-llava15-64"} <= labels
    values = [[float(t["accuracy"]), float(t["average_tokens"])] for t in trials]
    expected = {trials[i]["trial"] for i in pareto_indices(values, ["maximize", "minimize"])}
    front = read_csv(run / "pareto.csv")
    assert {f["trial"] for f in front} == expected
    for f in front:  # nobody dominates a front member
        a, t = float(f["accuracy"]), float(f["average_tokens"])
        assert not any(
            float(o["accuracy"]) >= a
            and float(o["average_tokens"]) <= t
            and (float(o["accuracy"]) > a or float(o["average_tokens"]) < t)
            for o in trials
        )
    assert len(result["confirmed"]) == len(front)
    # The front is confirmed through the run store: one finished key per distinct method, on the 3 confirm samples.
    stored = {p: json.loads(p.read_text()) for p in run_store.glob("*/result.json")}
    assert stored and {r["key"]["n"] for r in stored.values()} == {3}
    assert {r["config"]["label"] for r in stored.values()} <= {f["label"] or f"tiny#{f['trial']}" for f in front}
    by_label = {r["config"]["label"]: r["metrics"]["accuracy"] for r in stored.values()}
    assert all(by_label[c["label"] or f"tiny#{c['trial']}"] == c["test_accuracy"] for c in result["confirmed"])
    # Finishing again confirms the same front from the store: no finished key is evaluated or rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in run_store.rglob("*") if p.is_file()}
    assert (
        finish_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)["confirmed"]
        == result["confirmed"]
    )
    assert {p: p.stat().st_mtime_ns for p in run_store.rglob("*") if p.is_file()} == stamps
    # Re-running resumes the same study: 8 more trials join the first 8.
    again = run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
    assert len(again["rows"]) == 16


def test_constraint_marks_infeasible_trials(tiny, tmp_path):
    cfg = config(tmp_path, trials=5, max_average_tokens=20.0)
    result = run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
    none = next(r for r in result["rows"] if r["label"] == "none")
    assert none["feasible"] is False and not none["is_pareto"]
    assert all(r["feasible"] for r in result["front"])


def test_entering_budget_constrains_the_tokens_entering_the_llm(tiny, tmp_path):
    """``budget: {tokens, count: entering}`` bounds the vision tokens entering the LLM: in-LLM trials let every token
    enter, so under a 1-token entering budget no trial is feasible, whatever its average."""
    from analysis.common import vision_tokens_of

    cfg = config(tmp_path, trials=3, budget={"tokens": 1, "count": "entering"})
    result = run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
    assert result["rows"] and not any(r["feasible"] for r in result["rows"])
    study = optuna.load_study(study_name="tiny", storage=make_storage(cfg))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    bench = EchoBench(3)
    n_vision = vision_tokens_of(tiny("llava"), bench.load(bench.resolve_split(None), 1)[0])
    assert len(done) == 3 and all(t.constraints == {"entering_tokens": n_vision - 1} for t in done)  # all enter


def test_sweep_budget_forms(tmp_path):
    """A plain budget is max_average_tokens; giving both, or a bad budget, is a one-line error before any trial."""
    from v2drop.budgets import Budget
    from v2drop.checks import check_sweep, sweep_budget

    assert (
        sweep_budget(config(tmp_path, budget=20))
        == Budget(20.0)
        == sweep_budget(config(tmp_path, max_average_tokens=20))
    )
    assert sweep_budget(config(tmp_path)) is None
    with pytest.raises(ValueError, match=r"budget=20 and max_average_tokens=20.0 both bound the tokens; give one"):
        check_sweep(config(tmp_path, budget=20, max_average_tokens=20))
    with pytest.raises(ValueError, match=r"^budget: budget count must be one of average, entering, got 'first'"):
        check_sweep(config(tmp_path, budget={"tokens": 20, "count": "first"}))
    with pytest.raises(ValueError, match=r"^budget: budget tokens must be a positive number of vision tokens, got -1"):
        check_sweep(config(tmp_path, budget=-1))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"objectives": ["accuracy", "speed"]}, "Unknown objective 'speed'"),
        ({"search": {"scorers": {"nope": {}}}}, r"Unknown scorer 'nope'"),
        ({"search": {"scorers": {"v2drop": {}}, "layers": [2, 9]}}, r"must lie within the model's 6 layers"),
        ({"search": {"scorers": {"v2drop": {}}, "keep": [0.5, 0.2]}}, r"search.keep \[0.5, 0.2\]"),
        ({"search": {"scorers": {"v2drop": {}}, "layers": [4, 5], "stages": [3, 3]}}, "fewer layers than the 3 stages"),
        ({"sampler": "cmaes"}, "Unknown sampler"),
    ],
)
def test_bad_search_spaces_stop_before_any_trial(tmp_path, change, message):
    cfg = config(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        validate(cfg, depth=6)


def test_unreachable_storage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot reach the storage postgresql://nobody@127.0.0.1:1/none"):
        make_storage(config(tmp_path, storage="postgresql://nobody@127.0.0.1:1/none"))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["trails=3"], ["unknown key 'trails'", "trials"]),
        (["eval.limt=5"], ["unknown key 'eval.limt'", "limit", "batch_size"]),
        (["confirm.splt=test"], ["unknown key 'confirm.splt'", "split", "limit"]),
        (["wandb.mod=offline"], ["unknown key 'wandb.mod'", "mode", "per_trial_runs"]),
        (["search.kind=[one-shot]"], ["unknown key 'search.kind'", "kinds"]),
        (["eval.limit=many"], ["eval.limit", "many"]),
    ],
)
def test_config_typos_are_one_line_errors_listing_the_valid_keys(overrides, words):
    with pytest.raises(ValueError) as err:
        SweepConfig.load(ROOT / "configs" / "sweep" / "default.yaml", overrides=overrides)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_cli_config_error_exits_2_before_the_model_loads(tmp_path, capsys):
    from experiments.sweep import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(ROOT / "configs" / "sweep" / "default.yaml"), "--set", "search.keep=[0.5, 0.2]"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: search.keep [0.5, 0.2] must be a range inside [0, 1]"


def test_default_config_sections_are_typed():
    cfg = SweepConfig.load(ROOT / "configs" / "sweep" / "default.yaml", overrides=["eval.limit=7", "confirm.limit=3"])
    assert (cfg.eval.split, cfg.eval.limit, cfg.eval.batch_size) == ("validation", 7, 10)
    assert (cfg.confirm.split, cfg.confirm.limit) == ("test", 3)
    assert cfg.wandb.project == "v2drop" and cfg.search.layers == [1, None]


def test_pareto_indices_keeps_ties_and_drops_dominated_rows():
    rows = [[0.9, 10.0], [0.9, 10.0], [0.8, 5.0], [0.7, 6.0], [0.95, 20.0]]
    assert pareto_indices(rows, ["maximize", "minimize"]) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="'max'"):
        pareto_indices(rows, ["max", "minimize"])


def test_wandb_offline_writes_a_run_with_the_trials_table(tiny, tmp_path):
    cfg = config(tmp_path, trials=5, wandb={"mode": "offline"})
    run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].rglob("trials_*.table.json"))
    assert tables and len(json.loads(tables[0].read_text())["data"]) == 5


def test_wandb_disabled_writes_nothing(tiny, tmp_path):
    run_sweep(config(tmp_path, trials=4), lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
    assert not (tmp_path / "run" / "wandb").exists()


# -- workers in separate processes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from v2drop.testing import build

    path = tmp_path_factory.mktemp("tiny-model")
    lvlm = build("llava")
    lvlm.model.save_pretrained(path)
    lvlm.processor.save_pretrained(path)
    return path


def worker_config(tmp_path, model, storage, trials):
    data = {
        "study": "shared",
        "model": str(model),
        "benchmark": "digits",
        "trials": trials,
        "total_trials": None,
        "run_dir": str(tmp_path / "run"),
        "storage": storage,
        "heartbeat": 1,
        "retries": 2,
        "eval": {"limit": 10, "batch_size": 5, "max_new_tokens": 1, "warmup": 0},
        "confirm": {"split": "validation", "limit": 5},
        "search": {"scorers": {"v2drop": {}}, "kinds": ["progressive"], "stages": [2, 2]},
        "enqueue_presets": ["v2drop-llava15-128"],
        "wandb": {"mode": "disabled"},
    }
    path = tmp_path / f"sweep-{os.getpid()}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_worker(cfg_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.sweep", "--config", str(cfg_path), "--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def complete_trials(storage_url, study="shared"):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = storage_url if "://" in storage_url else JournalStorage(JournalFileBackend(storage_url))
    study = optuna.load_study(study_name=study, storage=storage)
    return study, [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_two_workers_share_one_study(saved_model, tmp_path, kind):
    if kind == "postgres":
        url = os.environ.get("V2DROP_TEST_POSTGRES")
        if not url:
            pytest.skip("V2DROP_TEST_POSTGRES is not set (.ci/run starts a PostgreSQL server and sets it)")
        storage = url
        if "shared" in optuna.get_all_study_names(url):
            optuna.delete_study(study_name="shared", storage=url)
    else:
        storage = str(tmp_path / "journal.log")
    workers = [start_worker(worker_config(tmp_path, saved_model, storage, 3)) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    _, done = complete_trials(storage)
    assert len(done) == 6
    assert len({tuple(sorted(t.params.items())) for t in done}) == 6  # distinct trials


def _completed_and_running(study, db) -> bool:
    """True when ``study`` holds a finished trial and a running one that has sent a heartbeat.

    Optuna never fails a running trial without a heartbeat row (its worker died between ``ask``
    and the heartbeat thread's first write), so the kill must land after that write.
    """
    states = [t.state for t in study.trials]
    running = {t._trial_id for t in study.trials if t.state == optuna.trial.TrialState.RUNNING}
    if optuna.trial.TrialState.COMPLETE not in states or not running:
        return False
    conn = sqlite3.connect(db, timeout=1)
    try:
        beating = {row[0] for row in conn.execute("SELECT trial_id FROM trial_heartbeats")}
    except sqlite3.OperationalError:  # locked by a writer: look again
        return False
    finally:
        conn.close()
    return running <= beating


def test_killed_worker_trial_is_failed_and_retried(saved_model, tmp_path):
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    victim = start_worker(worker_config(tmp_path, saved_model, url, 50))
    deadline = time.time() + 300
    study = None
    while time.time() < deadline:  # kill it while a trial is running, after at least one completed
        time.sleep(0.05)
        try:
            study = optuna.load_study(study_name="shared", storage=url)
        except Exception:  # noqa: BLE001 - not created yet
            continue
        if not _completed_and_running(study, db):
            continue
        victim.send_signal(signal.SIGSTOP)  # frozen, so the trial cannot finish between this check and the kill
        try:
            confirmed = _completed_and_running(optuna.load_study(study_name="shared", storage=url), db)
        except Exception:  # noqa: BLE001 - frozen while holding the database lock
            confirmed = False
        if confirmed:
            victim.send_signal(signal.SIGKILL)
            break
        victim.send_signal(signal.SIGCONT)
    victim.wait(timeout=30)
    victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="shared", storage=url)
    before = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    running = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert running
    time.sleep(3)  # past the heartbeat grace period
    survivor = start_worker(worker_config(tmp_path, saved_model, url, 3))
    out = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, out
    study = optuna.load_study(study_name="shared", storage=url)
    by_number = {t.number: t for t in study.trials}
    assert all(by_number[n].state == optuna.trial.TrialState.FAIL for n in running)
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") in running]
    # The kill can land mid-suggestion: the retry replays every parameter the killed trial had
    # chosen and suggests the rest itself.
    assert retried and by_number[running[0]].params.items() <= retried[0].params.items()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == before + 3


def test_wandb_per_trial_runs(tiny, tmp_path):
    cfg = config(tmp_path, trials=3, wandb={"mode": "offline", "per_trial_runs": True})
    run_sweep(cfg, lvlm=tiny("llava"), benchmark=EchoBench(3), progress=False)
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1 + 3


def test_wandb_mode_comes_from_the_config_then_the_environment_then_offline(monkeypatch):
    """An unset wandb.mode follows $WANDB_MODE (so CI's `disabled` holds), else offline.

    A set one wins; a bad one is a clear error.
    """
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(SweepConfig()) == "disabled"
    assert wandb_mode(SweepConfig.from_dict({"wandb": {"mode": "offline"}})) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(SweepConfig()) == "offline"
    with pytest.raises(ValueError, match="wandb mode 'ofline' is not one of"):
        wandb_mode(SweepConfig.from_dict({"wandb": {"mode": "ofline"}}))


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: the objective is available"
)
def test_served_throughput_objective_without_vllm_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"^objective 'served_throughput' needs vLLM.*scripts/vllm_env.sh") as err:
        validate(config(tmp_path, objectives=["accuracy", "served_throughput"]))
    assert "\n" not in str(err.value)


def test_served_throughput_objective_prunes_methods_vllm_cannot_run():
    """The reason a trial is pruned is the plugin's own: DART's in-LLM drops and 'preserve' positions of
    pre-LLM methods; pre-LLM methods and V²Drop's, FastV's, PDrop's and SparseVLM's decoder stages run."""
    from v2drop.method import Method
    from v2drop.search.config import OBJECTIVES
    from v2drop.search.served import served_reason

    assert OBJECTIVES["served_throughput"] == ("served_requests_per_s", "maximize")
    assert "drops tokens inside the decoder" in served_reason(Method.from_preset("dart-llava15-64", depth=12))
    for preset in ("v2drop-llava15-128", "fastv-llava15-128", "pdrop-llava15-128", "sparsevlm-llava15-64"):
        assert served_reason(Method.from_preset(preset, depth=12)) is None
    preserve = Method.from_dict({**Method.from_preset("divprune-llava15-64").to_dict(), "position_policy": "preserve"})
    assert "use position_policy 'renumber'" in served_reason(preserve)
    assert served_reason(Method.from_preset("divprune-llava15-64")) is None
    assert served_reason(Method.none()) is None
