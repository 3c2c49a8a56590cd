"""Every command fails early and clearly (issue 20): one ``error: ...`` line naming the bad value, exit status 2,
no traceback, no model loaded, no sample evaluated, no run directory created.

The table runs each command's ``main(argv)`` in-process (fast); a few cases run as subprocesses to
prove the exit status and the missing traceback end to end. ``v2drop.load`` is replaced by a guard
that fails the test, so a check that happens only after the model loads is caught.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "realbench"
SWEEP = str(ROOT / "configs" / "sweep" / "default.yaml")
UNWRITABLE = "/proc/v2drop-cannot-write-here"  # procfs refuses new files even to root


def _not_a_schedule(tmp: Path) -> str:
    (tmp / "notschedule.yaml").write_text("learning_rate: 0.1\nepochs: 3\n")
    return str(tmp / "notschedule.yaml")


def _bad_yaml(tmp: Path) -> str:
    (tmp / "bad.yaml").write_text("stages: [[1, 0.5]\nkeep_mode: : relative\n")
    return str(tmp / "bad.yaml")


def _broken_json(tmp: Path) -> str:
    (tmp / "base.json").write_text('{"metrics": {"accuracy": 0.5,}')
    return str(tmp / "base.json")


def _not_a_result(tmp: Path) -> str:
    (tmp / "list.json").write_text("[1, 2, 3]")
    return str(tmp / "list.json")


def _a_file(tmp: Path) -> str:
    (tmp / "afile").write_text("x")
    return str(tmp / "afile")


def _pope_copy(tmp: Path) -> Path:
    dest = tmp / "pope"
    shutil.copytree(FIXTURES / "pope", dest)
    return dest


def _broken_jsonl(tmp: Path) -> str:
    dest = _pope_copy(tmp)
    with open(dest / "test.jsonl", "a") as f:
        f.write('{"id": "9999", "question": \n')
    return str(dest)


def _corrupt_image(tmp: Path) -> str:
    dest = _pope_copy(tmp)
    image = sorted((dest / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:40])  # a truncated PNG: header present, pixels missing
    return str(dest)


# (command, argv with {tmp}/{run} placeholders or callables of tmp, words the message must contain)
EVAL = "experiments.evaluate"
SWEEP_CMD = "experiments.sweep"
CASES = [
    # experiments.evaluate
    (EVAL, ["--limit", "-3"], ["limit", "-3", ">= 1"]),
    (EVAL, ["--limit", "0"], ["limit", "got 0"]),
    (EVAL, ["--split", "nosplit"], ["nosplit", "valid splits: train, validation, test"]),
    (EVAL, ["--dtype", "float8"], ["float8", "float32, bfloat16, float16, auto"]),
    (EVAL, ["--device", "cuda"], ["'cuda'", "no usable CUDA"]),
    (EVAL, ["--device", "tpu9"], ["tpu9", "cpu, cuda"]),
    (EVAL, ["--batch-size", "0"], ["batch_size", "got 0"]),
    (EVAL, ["--max-new-tokens", "-1"], ["max_new_tokens", "-1"]),
    (EVAL, ["--warmup", "-1"], ["warmup", "-1", ">= 0"]),
    (EVAL, ["--threads", "0"], ["threads", "got 0"]),
    (EVAL, ["--devices", "0"], ["devices", "got 0"]),
    (EVAL, ["--num-nodes", "0"], ["num_nodes", "got 0"]),
    (EVAL, ["--device-map", "auto", "--devices", "2"], ["device_map 'auto'", "devices=2", "--device cuda"]),
    (
        EVAL,
        ["--method", "v2drop", "--schedule", _not_a_schedule],
        ["notschedule.yaml", "not a method or schedule", "stages"],
    ),
    (EVAL, ["--method", "v2drop", "--schedule", _bad_yaml], ["bad.yaml", "not valid YAML"]),
    (EVAL, ["--method", "v2drop", "--schedule", "missing.yaml"], ["missing.yaml", "does not exist"]),
    (EVAL, ["--method", "nope", "--schedule", "v2drop-llava15-128"], ["nope", "v2drop"]),
    (EVAL, ["--method", "v2drop", "--schedule", "v2drop-llava15-128", "--scorer-args", "nope=1"], ["nope"]),
    (EVAL, ["--method", "v2drop"], ["--method v2drop needs --schedule"]),
    (EVAL, ["--baseline", "{tmp}/missing.json"], ["missing.json", "does not exist"]),
    (EVAL, ["--baseline", _broken_json], ["base.json", "not valid JSON", "line 1"]),
    (EVAL, ["--baseline", _not_a_result], ["list.json", "not an evaluation result"]),
    (EVAL, ["--output", UNWRITABLE + "/result.json"], [UNWRITABLE, "not writable"]),
    (EVAL, ["--output", lambda tmp: _a_file(tmp) + "/result.json"], ["afile", "is a file, not a directory"]),
    (EVAL, ["--save-trace", UNWRITABLE + "/trace.jsonl"], [UNWRITABLE]),
    (EVAL, ["--store", UNWRITABLE + "/run"], [UNWRITABLE, "not writable"]),
    (EVAL, ["--store", _a_file], ["afile", "it is a file"]),
    (EVAL, ["--benchmark", "nope"], ["nope", "digits"]),
    (EVAL, ["--benchmark-args", "nope=1"], ["nope", "does not take"]),
    (EVAL, ["--model", "{tmp}/nomodel"], ["nomodel", "config.json"]),
    (EVAL, ["--benchmark", "pope", "--data-dir", "{tmp}/nodata"], ["nodata", "not a directory"]),
    (EVAL, ["--benchmark", "pope"], ["offline", "HF_HUB_OFFLINE"]),
    (EVAL, ["--benchmark", "pope", "--data-dir", _broken_jsonl], ["test.jsonl", "line", "not JSON"]),
    (EVAL, ["--benchmark", "pope", "--data-dir", _corrupt_image], ["cannot"]),
    (EVAL, ["--attn-implementation", "flash_attention_2"], ["flash-attn", "not installed", "sdpa"]),
    # experiments.sweep
    (SWEEP_CMD, ["--set", "trials=-1"], ["trials", "-1"]),
    (SWEEP_CMD, ["--trials", "0"], ["trials", "got 0"]),
    (SWEEP_CMD, ["--set", "total_trials=0"], ["total_trials", "got 0"]),
    (
        SWEEP_CMD,
        ["--set", "enqueue_presets=[v2drop-llava15-128, nope]"],
        ["nope", "enqueue_presets", "v2drop-llava15-64"],
    ),
    (SWEEP_CMD, ["--set", "sampler=nope"], ["nope", "tpe"]),
    (SWEEP_CMD, ["--set", "objectives=[accuracy, nope]"], ["nope", "prefill_latency"]),
    (SWEEP_CMD, ["--set", "search.scorers={nope: {}}"], ["nope", "v2drop"]),
    (SWEEP_CMD, ["--set", "search.layers=[1, 40]"], ["search.layers [1, 40]", "12 layers"]),
    (
        SWEEP_CMD,
        ["--set", "search.layers=[10, 11]", "--set", "search.stages=[3, 3]"],
        ["search.layers [10, 11]", "3 stages"],
    ),
    (SWEEP_CMD, ["--set", "search.keep=[0.5, 2]"], ["search.keep", "[0, 1]"]),
    (SWEEP_CMD, ["--set", "eval.split=nosplit"], ["nosplit", "valid splits"]),
    (SWEEP_CMD, ["--set", "eval.devices=2"], ["eval.devices=2", "one process"]),
    (SWEEP_CMD, ["--set", "confirm.split=nosplit"], ["nosplit", "valid splits"]),
    (SWEEP_CMD, ["--set", "eval.limit=0"], ["eval.limit", "got 0"]),
    (SWEEP_CMD, ["--set", "eval.batch_size=0"], ["eval.batch_size", "got 0"]),
    (SWEEP_CMD, ["--set", "eval.limt=5"], ["limt", "valid keys"]),
    (SWEEP_CMD, ["--set", "wandb.mode=loud"], ["loud", "offline"]),
    (SWEEP_CMD, ["--set", "model={tmp}/nomodel"], ["nomodel", "config.json"]),
    (SWEEP_CMD, ["--set", "benchmark=nope"], ["nope", "digits"]),
    (SWEEP_CMD, ["--set", f"run_dir={UNWRITABLE}/run"], [UNWRITABLE, "not writable"]),
    (SWEEP_CMD, ["--config", "{tmp}/missing.yaml"], ["missing.yaml", "does not exist"]),
    (SWEEP_CMD, ["--config", _bad_yaml], ["bad.yaml", "not valid YAML"]),
    (
        SWEEP_CMD,
        ["--set", "benchmark=pope", "--set", "eval.split=test", "--set", "confirm.split=null"],
        ["offline", "HF_HUB_OFFLINE"],
    ),
    (SWEEP_CMD, ["--set", "benchmark=pope", "--set", "eval.data_dir={tmp}/nodata"], ["nodata", "not a directory"]),
    (
        SWEEP_CMD,
        ["--set", "benchmark=pope", "--set", "eval.data_dir=" + str(FIXTURES / "pope")],
        ["validation", "valid splits: test"],
    ),
    (
        SWEEP_CMD,
        [
            "--set",
            "benchmark=pope",
            "--set",
            "eval.split=test",
            "--set",
            "confirm.split=null",
            "--set",
            lambda tmp: "eval.data_dir=" + _broken_jsonl(tmp),
        ],
        ["test.jsonl", "line", "not JSON"],
    ),
    (SWEEP_CMD, ["--set", "eval.benchmark_args={nope: 1}"], ["nope", "does not take"]),
    (SWEEP_CMD, ["--set", "eval.sample=shuffled"], ["shuffled", "stratified, first"]),
    (SWEEP_CMD, ["--set", "served.kv_cache_gib=0"], ["served.kv_cache_gib", "positive number of GiB, got 0"]),
    (SWEEP_CMD, ["--set", "served.max_model_len=0"], ["served.max_model_len", "got 0"]),
    (SWEEP_CMD, ["--set", "served.max_num_seqs=0"], ["served.max_num_seqs", "got 0"]),
    (SWEEP_CMD, ["--set", "served.max_len=512"], ["served.max_len", "max_model_len"]),
    ("experiments.serve_bench", ["--kv-cache-gib", "-1"], ["--kv-cache-gib", "positive number of GiB, got -1"]),
    ("experiments.serve_bench", ["--max-model-len", "0"], ["--max-model-len", "got 0"]),
    (SWEEP_CMD, ["--set", "eval.device=tpu9"], ["eval.device", "tpu9"]),
    (SWEEP_CMD, ["--workers", "0"], ["--workers", "got 0"]),
    # experiments.train_proxy
    ("experiments.train_proxy", ["--config", "{tmp}/missing.yaml"], ["missing.yaml", "does not exist"]),
    ("experiments.train_proxy", ["--set", "align.steps=-1"], ["align.steps", "-1"]),
    ("experiments.train_proxy", ["--set", "threads=0"], ["threads", "got 0"]),
    ("experiments.train_proxy", ["--set", f"output={UNWRITABLE}/proxy"], [UNWRITABLE, "not writable"]),
    # experiments.check_proxy
    ("experiments.check_proxy", ["--limit", "0"], ["--limit", "got 0"]),
    ("experiments.check_proxy", ["--split", "nosplit"], ["nosplit", "valid splits"]),
    ("experiments.check_proxy", ["--layer", "99"], ["--layer 99", "12 layers"]),
    ("experiments.check_proxy", ["--model", "{tmp}/nomodel"], ["nomodel", "config.json"]),
    ("experiments.check_proxy", ["--lookups", "-1"], ["--lookups", "got -1"]),
    ("experiments.check_proxy", ["--benchmark", "digits-video", "--lookups", "5"], ["--lookups", "digits-video"]),
    # experiments.bench*
    ("experiments.bench", ["--repeats", "0"], ["--repeats", "got 0"]),
    ("experiments.bench", ["--model", "{tmp}/nomodel"], ["nomodel", "config.json"]),
    ("experiments.bench", ["--output", UNWRITABLE + "/bench"], [UNWRITABLE, "not writable"]),
    ("experiments.bench_engine", ["--preset", "nope"], ["nope", "--preset", "v2drop-llava15-128"]),
    ("experiments.bench_engine", ["--max-new-tokens", "0"], ["--max-new-tokens", "got 0"]),
    ("experiments.bench_sweep", ["--limit", "0"], ["--limit", "got 0"]),
    ("experiments.bench_sweep", ["--methods", "none", "nope"], ["nope", "--methods"]),
    ("experiments.bench_sweep", ["--models", "{tmp}/nomodel"], ["nomodel", "config.json"]),
    ("experiments.bench_attention", ["--frames", "0"], ["--frames", "got 0"]),
    ("experiments.bench_attention", ["--threads", "-2"], ["--threads", "-2"]),
    # analysis.*
    ("analysis.method_table", ["--limit", "0"], ["--limit", "got 0"]),
    ("analysis.method_table", ["--split", "nosplit"], ["nosplit", "valid splits"]),
    ("analysis.metric_ablation", ["--batch-size", "0"], ["--batch-size", "got 0"]),
    ("analysis.oneshot_vs_progressive", ["--benchmark", "nope"], ["nope", "digits"]),
    ("analysis.oneshot_vs_progressive", ["--model", "{tmp}/nomodel"], ["nomodel", "config.json"]),
    ("analysis.positional_bias", ["--keep", "1.5"], ["--keep", "1.5"]),
    ("analysis.positional_bias", ["--layer", "99"], ["--layer 99", "12 layers"]),
    ("analysis.evidence_kept", ["--attn-implementation", "fast"], ["fast", "sdpa"]),
    ("analysis.variation_maps", ["--samples", "0"], ["--samples", "got 0"]),
    ("analysis.real_cost", ["--presets", "nope"], ["nope", "--presets"]),
    ("analysis.real_cost", ["--text-tokens", "-1"], ["--text-tokens", "-1"]),
    ("analysis.pareto", ["--results", "{tmp}/noresults"], ["noresults", "analysis.method_table"]),
    ("analysis.method_table", ["--output", UNWRITABLE + "/table"], [UNWRITABLE, "not writable"]),
]


def _argv(command: str, argv: list, tmp: Path) -> list[str]:
    """Fill placeholders and add the command's run/output directory under ``tmp / "run"`` unless the case sets one."""
    out = []
    for item in argv:
        out.append(item(tmp) if callable(item) else str(item).replace("{tmp}", str(tmp)))
    run = str(tmp / "run")
    if command == EVAL and "--store" not in out:
        out += ["--store", run]
    elif command == SWEEP_CMD:
        if "--config" not in out:
            out = ["--config", SWEEP] + out
        if not any(a.startswith("run_dir=") for a in out):
            out += ["--set", f"run_dir={run}"]
        if not any(a.startswith("wandb.mode=") for a in out):
            out += ["--set", "wandb.mode=disabled"]
    elif command == "experiments.train_proxy" and "--config" not in out:
        out = ["--config", str(ROOT / "configs" / "proxy.yaml"), "--set", f"workdir={run}"] + out
    elif command == "experiments.check_proxy":
        out += ["--output", f"{run}/check.json"]
    elif command in ("experiments.bench", "experiments.bench_attention") and "--output" not in out:
        out += ["--output", run]
    elif command == "experiments.bench_engine":
        out += ["--output", f"{run}/engine.json"]
    elif command.startswith("analysis.") and "--output" not in out:
        out += ["--output", run]
    return out


@pytest.fixture
def no_model(monkeypatch):
    """``v2drop.load`` fails the test: every case must stop before a model loads."""
    import v2drop
    import v2drop.lvlm

    def guard(*args, **kwargs):
        raise AssertionError(f"a model was loaded ({args[:1]}) before the bad input was reported")

    monkeypatch.setattr(v2drop, "load", guard)
    monkeypatch.setattr(v2drop.lvlm, "load", guard)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.mark.parametrize(
    "command, argv, words",
    CASES,
    ids=[
        f"{c.split('.')[-1]}:{' '.join(a if isinstance(a, str) else getattr(a, '__name__', '-') for a in v)}"
        for c, v, _ in CASES
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_work(command, argv, words, tmp_path, monkeypatch, capsys, no_model):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # default run directories (runs/...) would appear here
    monkeypatch.syspath_prepend(str(ROOT))
    main = importlib.import_module(command).main
    full = _argv(command, argv, tmp_path)
    before = {p for p in (tmp_path / "run").rglob("*")} if (tmp_path / "run").exists() else None
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(full)
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err + captured.out
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert elapsed < 10, f"took {elapsed:.1f}s"
    if before is None:
        assert not (tmp_path / "run").exists(), "a run directory was created"
    else:
        assert {p for p in (tmp_path / "run").rglob("*")} == before
    assert not any(work.iterdir()), f"files appeared in the working directory: {list(work.iterdir())}"


def test_the_table_has_at_least_40_cases_over_every_command():
    commands = {c for c, _, _ in CASES}
    assert len(CASES) >= 40
    assert {
        EVAL,
        SWEEP_CMD,
        "experiments.train_proxy",
        "experiments.check_proxy",
        "experiments.bench",
        "experiments.bench_engine",
        "experiments.bench_attention",
    } <= commands
    assert sum(c.startswith("analysis.") for c in commands) >= 5


def _subprocess(argv: list[str], cwd: Path, env: dict | None = None):
    environment = {k: v for k, v in os.environ.items() if k != "V2DROP_DEBUG"}
    environment.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "argv, word",
    [
        (["-m", "experiments.evaluate", "--limit", "-3"], "-3"),
        (["-m", "experiments.sweep", "--config", SWEEP, "--set", "trials=-1"], "trials"),
        (["-m", "analysis.real_cost", "--presets", "nope"], "nope"),
    ],
)
def test_end_to_end_exit_status_2_and_no_traceback(argv, word, tmp_path):
    out = _subprocess(argv + (["--store", str(tmp_path / "run")] if "experiments.evaluate" in argv else []), tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and word in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", [{"flag": True}, {"env": {"V2DROP_DEBUG": "1"}}])
def test_debug_shows_the_traceback(how, tmp_path):
    argv = ["-m", "experiments.evaluate", "--limit", "0", "--store", str(tmp_path / "run")] + (
        ["--debug"] if how.get("flag") else []
    )
    out = _subprocess(argv, tmp_path, env=how.get("env"))
    assert out.returncode == 1 and "Traceback" in out.stderr and "limit must be a whole number >= 1" in out.stderr


@contextlib.contextmanager
def read_only(directory: Path):
    """Make ``directory`` read-only for the current user: chmod for a user, the immutable flag for root
    (root writes through permission bits)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode
    ):
        pytest.skip("running as root on a file system without chattr +i: cannot make a read-only directory")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_read_only_run_directory_is_reported(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with read_only(run):
        with pytest.raises(OSError):
            (run / "probe").write_text("x")  # the directory really is read-only
        out = _subprocess(["-m", "experiments.evaluate", "--limit", "1", "--store", str(run)], tmp_path)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
        assert str(run) in out.stderr and "read-only" in out.stderr
        assert "Traceback" not in out.stderr and list(run.iterdir()) == []


def test_python_api_raises_the_same_words(tmp_path):
    """A notebook user calling the library gets the checks as ValueError/FileNotFoundError, before any model loads."""
    import v2drop
    from v2drop.config import config_from_dict
    from v2drop.evaluation import EvalConfig, run_evaluation
    from v2drop.search import SweepConfig, run_sweep

    with pytest.raises(ValueError, match=r"limit must be a whole number >= 1 or None, got -3"):
        run_evaluation(config_from_dict(EvalConfig, {"limit": -3, "store": str(tmp_path / "run")}))
    with pytest.raises(
        ValueError, match=r"dtype 'float8' is not supported; choose one of float32, bfloat16, float16, auto"
    ):
        run_evaluation(config_from_dict(EvalConfig, {"dtype": "float8", "store": str(tmp_path / "run")}))
    with pytest.raises(FileNotFoundError, match=r"baseline result '.*nothere.json' does not exist"):
        run_evaluation(EvalConfig(store=str(tmp_path / "run")), baseline=tmp_path / "nothere.json")
    with pytest.raises(ValueError, match=r"dtype 'float8' is not supported"):
        v2drop.load("proxy", dtype="float8")
    with pytest.raises(ValueError, match=r"device 'cuda' asks for CUDA"):
        v2drop.load("proxy", device="cuda")
    with pytest.raises(ValueError, match=r"trials must be a whole number >= 1, got -1"):
        run_sweep(SweepConfig(trials=-1, run_dir=str(tmp_path / "sweep")))
    with pytest.raises(ValueError, match=r"enqueue_presets: 'nope' matches no preset"):
        run_sweep(SweepConfig(enqueue_presets=["nope"], run_dir=str(tmp_path / "sweep")))
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
