"""The evaluation harness: records as samples finish, resume, aggregates, and errors before long work."""

import json

import pytest
from PIL import Image

from v2drop import Method, Schedule
from v2drop.config import config_from_dict
from v2drop.evaluation import EvalConfig, evaluate, format_table, read_records, run_evaluation
from v2drop.testing import EchoBench, Item, image


def config(**kw):
    return EvalConfig(model="tiny", benchmark="echo", warmup=1, max_new_tokens=2, progress=False, **kw)


def test_records_and_aggregates(tiny, tmp_path):
    lvlm = tiny("llava")
    bench = EchoBench()
    method = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.5, 0.25]))
    result = evaluate(lvlm, bench, method, config(), records_path=tmp_path / "r.jsonl")
    records = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"s{i}" for i in range(5)]
    assert all(r["vision_tokens_per_layer"] == [64, 32, 32, 8, 8, 8] for r in records)
    assert result.metrics["average_vision_tokens"] == pytest.approx(152 / 6)
    assert 0 < result.metrics["flops_ratio"] < 1
    assert result.metrics["accuracy"] == sum(r["correct"] for r in records) / 5
    assert result.environment["torch_threads"] == 2 and result.config["benchmark"] == "echo"
    assert "overall" in format_table(result)


def test_no_drop_flops_ratio_is_one(tiny, tmp_path):
    result = evaluate(tiny("llava"), EchoBench(2), Method.none(), config())
    assert result.metrics["flops_ratio"] == 1.0 and result.metrics["average_vision_tokens"] == 64


def test_resume_skips_finished_samples(tiny, tmp_path):
    lvlm, path = tiny("llava"), tmp_path / "r.jsonl"
    evaluate(lvlm, EchoBench(), Method.none(), config(limit=3), records_path=path)
    with open(path, "a") as f:
        f.write('{"id": "s3", "torn')  # a process killed mid-write leaves a torn line
    with pytest.raises(ValueError, match="already exists; pass resume=True"):
        evaluate(lvlm, EchoBench(), Method.none(), config(), records_path=path)
    result = evaluate(lvlm, EchoBench(), Method.none(), config(), records_path=path, resume=True)
    ids = [json.loads(l)["id"] for l in path.read_text().splitlines() if l.endswith("}")]
    assert ids == ["s0", "s1", "s2", "s3", "s4"]  # the first three were not redone
    assert result.metrics["n"] == 5


def test_resume_refuses_a_corrupt_middle_line_and_leaves_the_file(tiny, tmp_path):
    lvlm, path = tiny("llava"), tmp_path / "r.jsonl"
    evaluate(lvlm, EchoBench(), Method.none(), config(limit=3), records_path=path)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"  # a damaged record that is not the last line
    path.write_text("".join(lines))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"r\.jsonl, line 2 is not a JSON record.*left as it is"):
        evaluate(lvlm, EchoBench(), Method.none(), config(), records_path=path, resume=True)
    assert path.read_bytes() == before


def test_a_torn_last_line_is_skipped_with_a_warning_naming_it(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": "c", "to')
    with pytest.warns(UserWarning, match=r"r\.jsonl, line 4: a torn last line"):
        assert [r["id"] for r in read_records(path)] == ["a", "b"]
    path.write_text('{"id": "a"}\n{"id": "b"}')  # a whole last record missing only its newline is kept
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    path.write_text('{"id": "a"}\n[1, 2]\n')  # valid JSON but not a record
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):
        read_records(path)


def test_relative_to_baseline(tiny):
    lvlm = tiny("llava")
    base = evaluate(lvlm, EchoBench(4, answer="0"), Method.none(), config()).to_json()
    base["metrics"]["accuracy"] = 0.5
    base["per_family"] = {"a": 0.5, "b": 0.25}
    result = evaluate(lvlm, EchoBench(4, answer="0"), Method.none(), config(), baseline=base)
    assert result.metrics["relative_accuracy"] == pytest.approx(result.metrics["accuracy"] / 0.5)
    assert result.metrics["relative_per_family"]["b"] == pytest.approx(result.per_family["b"] / 0.25)


def test_bad_samples_stop_before_work(tiny, tmp_path):
    bench = EchoBench(2)
    bench.items[1] = Item("s1", "q", "a", "a", ())
    with pytest.raises(ValueError, match="'s1' of image benchmark 'echo' has no image"):
        evaluate(tiny("llava"), bench, Method.none(), config())
    broken = tmp_path / "broken.png"
    image(0).save(tmp_path / "ok.png")
    broken.write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    bench.items[1] = Item("s1", "q", "a", "a", (Image.open(broken),))
    with pytest.raises(ValueError, match="'s1': image 0 cannot be decoded"):
        evaluate(tiny("llava"), bench, Method.none(), config())


def test_video_sample_without_frames_names_the_modality(tiny):
    bench = EchoBench(2)
    bench.modality, bench.name = "video", "clips"
    bench.items[0] = Item("s0", "q", "a", "a", ())
    with pytest.raises(ValueError, match="'s0' of video benchmark 'clips' has no frames"):
        evaluate(tiny("llava"), bench, Method.none(), config())


def test_eval_config_typo_lists_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key 'limt' in EvalConfig; valid keys: .*limit"):
        config_from_dict(EvalConfig, {"limt": 5})


def stored_config(tmp_path, limit: int) -> EvalConfig:
    """V²Drop (one stage) on ``limit`` digits questions of the tiny model, filed in a store under ``tmp_path``."""
    return config_from_dict(
        EvalConfig,
        {
            "model": "tiny",
            "benchmark": "digits",
            "limit": limit,
            "warmup": 0,
            "max_new_tokens": 1,
            "progress": False,
            "method": Method("v2drop", schedule=Schedule.one_shot(1, 0.5)).to_dict(),
            "store": str(tmp_path / "store"),
        },
    )


def test_run_evaluation_files_the_run_in_the_store_and_reuses_it(tiny, tmp_path, monkeypatch):
    """The default split is the benchmark's; records, result, key and trace are written under the run's key; the same
    run again is read back from the store without one generate call, its records untouched."""
    from v2drop.evaluation import RunKey

    cfg = stored_config(tmp_path, limit=2)
    lvlm = tiny("llava")
    calls = []
    generate = lvlm.generate_from_inputs

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(lvlm, "generate_from_inputs", counted)
    result = run_evaluation(cfg, save_trace=tmp_path / "trace.jsonl", lvlm=lvlm)
    assert result.split == "test" and result.metrics["n"] == 2 and not result.reused and calls
    (folder,) = (tmp_path / "store").iterdir()
    key = RunKey.from_json(json.loads((folder / "key.json").read_text()))
    assert folder.name == key.folder_name == f"tiny-digits-{key.digest}" and result.key == key.to_json()
    assert key.weights == lvlm.weights_fingerprint and key.n == 2 and key.split == "test"
    saved = json.loads((folder / "result.json").read_text())
    assert saved["metrics"]["n"] == 2 and saved["method"]["scorer"]["name"] == "v2drop"
    trace = [json.loads(l) for l in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [t["id"] for t in trace] == [r["id"] for r in read_records(folder / "records.jsonl")]
    assert all(t["stages"][0]["layer"] == 1 for t in trace)

    stamp = (folder / "records.jsonl").stat().st_mtime_ns, (folder / "result.json").stat().st_mtime_ns
    calls.clear()
    again = run_evaluation(cfg, lvlm=lvlm)
    assert again.reused and not calls and again.metrics == result.metrics
    assert ((folder / "records.jsonl").stat().st_mtime_ns, (folder / "result.json").stat().st_mtime_ns) == stamp
    # Another output-changing setting is another key: evaluated, in its own folder.
    other = run_evaluation(config_from_dict(EvalConfig, {**vars(cfg), "max_new_tokens": 2}), lvlm=lvlm)
    assert not other.reused and calls and len(list((tmp_path / "store").iterdir())) == 2


def test_a_stored_result_filed_before_the_accounting_gets_it_from_its_records(tiny, tmp_path):
    """A result.json without ``tokens``, ``time`` and ``accuracy_ci95`` (filed by an older version) is completed
    from its own records when read back, with no model work, to the values a fresh run writes, and says so."""
    cfg = stored_config(tmp_path, limit=3)
    lvlm = tiny("llava")
    fresh = run_evaluation(cfg, lvlm=lvlm)
    (folder,) = (tmp_path / "store").iterdir()
    saved = json.loads((folder / "result.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("tokens", "time")}
    old["metrics"] = {k: v for k, v in saved["metrics"].items() if k != "accuracy_ci95"}
    (folder / "result.json").write_text(json.dumps(old))
    again = run_evaluation(cfg, lvlm=lvlm)
    assert (
        again.reused
        and again.tokens == fresh.tokens
        and again.metrics["accuracy_ci95"] == fresh.metrics["accuracy_ci95"]
    )
    assert {k: v["median"] for k, v in again.time.items()} == {k: v["median"] for k, v in fresh.time.items()}
    assert any("added from records.jsonl" in n for n in again.notes)
    assert json.loads((folder / "result.json").read_text())["tokens"] == fresh.tokens  # written back


def test_a_second_process_on_the_same_key_waits_for_the_first_then_reads_its_result(tiny, tmp_path, capsys):
    """Two processes asking for one key never both append to its records: while another process holds the folder's
    lock the evaluation waits (saying for whom), and once that process has filed the result it is read back with no
    model work."""
    import subprocess
    import sys
    import threading

    cfg = stored_config(tmp_path, limit=2)
    lvlm = tiny("llava")
    first = run_evaluation(cfg, lvlm=lvlm)
    (folder,) = (tmp_path / "store").iterdir()
    (folder / "result.json").rename(tmp_path / "result.json")  # as if the other process were still at work
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; h = open(sys.argv[1], 'a+'); fcntl.flock(h, fcntl.LOCK_EX); "
            "h.truncate(0); h.write(str(os.getpid())); h.flush(); print('locked', flush=True); "
            "sys.stdin.readline(); os.replace(sys.argv[2], sys.argv[3])",
            str(folder / "lock"),
            str(tmp_path / "result.json"),
            str(folder / "result.json"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    calls, outcome = [], {}
    generate = lvlm.generate_from_inputs
    lvlm.generate_from_inputs = lambda *a, **k: calls.append(1) or generate(*a, **k)
    waiter = threading.Thread(target=lambda: outcome.setdefault("result", run_evaluation(cfg, lvlm=lvlm)))
    waiter.start()
    said = ""
    for _ in range(600):
        said += capsys.readouterr().err
        if "waiting for process" in said:
            break
        waiter.join(0.1)
    assert f"waiting for process {holder.pid}, which is evaluating {folder}" in said
    assert waiter.is_alive() and not calls  # still waiting: no sample evaluated, no record appended
    holder.communicate("go\n", timeout=60)
    waiter.join(120)
    again = outcome["result"]
    assert again.reused and not calls and again.metrics == first.metrics
    ids = [r["id"] for r in read_records(folder / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 2  # each sample once


def test_processor_args_a_family_does_not_take_fail_before_any_sample(tiny, tmp_path):
    """Pan-and-scan asked of llava: one clear error naming what its processor accepts, nothing filed in the store."""
    cfg = {"model": "tiny", "limit": 1, "progress": False, "store": str(tmp_path / "store")}
    cfg = config_from_dict(EvalConfig, {**cfg, "processor_args": {"do_pan_and_scan": True}})
    with pytest.raises(ValueError, match=r"\['do_pan_and_scan'\] not supported by LlavaProcessor"):
        run_evaluation(cfg, lvlm=tiny("llava"))
    assert not list((tmp_path / "store").glob("*/key.json"))


def test_run_key_digest_is_stable_and_covers_every_field():
    """The folder name depends on the key's content only; changing any field changes it."""
    from dataclasses import fields, replace

    from v2drop.evaluation import RunKey

    key = RunKey("w", "proxy", "digits", "{}", "test", 2, "ids", '{"scorer":"none"}', 8, "sdpa", "float32", 1)
    assert key.digest == RunKey.from_json(key.to_json()).digest and len(key.digest) == 16
    for f in fields(RunKey):
        changed = replace(key, **{f.name: getattr(key, f.name) + (1 if isinstance(getattr(key, f.name), int) else "x")})
        assert changed.digest != key.digest, f.name
    with pytest.raises(ValueError, match="not a run key"):
        RunKey.from_json({"weights": "w"})


def test_run_key_without_processor_args_hashes_as_before_and_with_them_is_another_key(tiny):
    """Runs filed before ``processor_args`` existed keep their folders: an unset option is left out of the hash, the
    key file and the comparable text; set, it changes all three (pan-and-scan never shares results with plain)."""
    import hashlib
    from types import SimpleNamespace

    from v2drop.evaluation import RunKey
    from v2drop.evaluation.store import _canonical

    lvlm = tiny("gemma3")
    samples = [SimpleNamespace(id=i) for i in range(2)]
    plain = config_from_dict(EvalConfig, {"model": "tiny", "benchmark": "digits"})
    crops = config_from_dict(EvalConfig, {**vars(plain), "processor_args": {"do_pan_and_scan": True}})
    key = RunKey.of(lvlm, plain, "test", samples, Method.resolve("none"))
    other = RunKey.of(lvlm, crops, "test", samples, Method.resolve("none"))
    old_fields = [f for f in vars(key) if f != "processor_args"]  # the key's fields before the option existed
    old_digest = hashlib.blake2b(_canonical({f: getattr(key, f) for f in old_fields}).encode(), digest_size=8)
    assert key.digest == old_digest.hexdigest() and "processor_args" not in key.to_json()
    assert RunKey.from_json(key.to_json()) == key and RunKey.from_json(other.to_json()) == other
    assert other.to_json()["processor_args"] == {"do_pan_and_scan": True}
    assert other.digest != key.digest and other.comparable() != key.comparable()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "v2drop"], "error: --method v2drop needs --schedule"),
        (["--method", "v2drop", "--schedule", "missing.yaml"], "error: method file 'missing.yaml' does not exist"),
        (["--benchmark", "nope"], "error: Unknown benchmark 'nope'"),
        (["--method", "random-llava15-64", "--seeds", "0"], "error: seeds must be a whole number >= 1"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    from experiments.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--store", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith(message) and "\n" not in err
    assert not (tmp_path / "run").exists()
