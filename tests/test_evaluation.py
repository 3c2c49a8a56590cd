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


def test_run_evaluation_writes_the_run_and_refuses_to_overwrite_it(tiny, tmp_path):
    """The default split is the benchmark's; records, result and trace are written; a second run needs resume."""
    cfg = config_from_dict(
        EvalConfig,
        {
            "model": "tiny",
            "benchmark": "digits",
            "limit": 2,
            "warmup": 0,
            "max_new_tokens": 1,
            "progress": False,
            "method": Method("v2drop", schedule=Schedule.one_shot(1, 0.5)).to_dict(),
        },
    )
    run = tmp_path / "run"
    result = run_evaluation(cfg, run, save_trace=tmp_path / "trace.jsonl", lvlm=tiny("llava"))
    assert result.split == "test" and result.metrics["n"] == 2
    saved = json.loads((run / "result.json").read_text())
    assert saved["metrics"]["n"] == 2 and saved["method"]["scorer"]["name"] == "v2drop"
    trace = [json.loads(l) for l in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [t["id"] for t in trace] == [r["id"] for r in read_records(run / "records.jsonl")]
    assert all(t["stages"][0]["layer"] == 1 for t in trace)
    with pytest.raises(ValueError, match="exists from an earlier run; add --resume"):
        run_evaluation(cfg, run, lvlm=tiny("llava"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "v2drop"], "error: --method v2drop needs --schedule"),
        (["--method", "v2drop", "--schedule", "missing.yaml"], "error: method file 'missing.yaml' does not exist"),
        (["--benchmark", "nope"], "error: Unknown benchmark 'nope'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    from experiments.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith(message) and "\n" not in err
    assert not (tmp_path / "run").exists()
