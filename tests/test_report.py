"""``experiments.report``: finished runs under a directory become one method × benchmark table relative to no
dropping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import evaluate, report
from v2drop.evaluation.collect import collect_results, method_benchmark_table

COMMON = ["--model", "proxy", "--max-new-tokens", "2", "--warmup", "0", "--no-progress"]
DATA = {
    "digits": ["--limit", "4"],
    "pope": ["--data-dir", str(Path(__file__).parent / "fixtures" / "realbench" / "pope")],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """none and V²Drop at 128 on digits and POPE (the fixture), FastV at 128 on digits; evaluated through the CLI."""
    root = tmp_path_factory.mktemp("runs") / "eval"
    for bench in ("digits", "pope"):
        args = [*COMMON, *DATA[bench], "--benchmark", bench]
        evaluate.main([*args, "--method", "none", "--run-dir", str(root / f"{bench}-none")])
        evaluate.main([*args, "--method", "v2drop-llava15-128", "--run-dir", str(root / f"{bench}-v2drop")])
    evaluate.main(
        [
            *COMMON,
            *DATA["digits"],
            "--benchmark",
            "digits",
            "--method",
            "fastv",
            "--schedule",
            "fastv-llava15-128",
            "--run-dir",
            str(root / "digits-fastv"),
        ]
    )
    return root


def test_table_is_the_runs_relative_to_none(runs, tmp_path):
    tables = report.main([str(runs), "--output", str(tmp_path / "out")])
    rows = {r["method"]: r for r in tables["proxy"]}
    assert list(rows) == ["none", "fastv-llava15-128", "v2drop-llava15-128"]
    results = {p.parent.name: json.loads(p.read_text()) for p in runs.rglob("result.json")}
    for bench, metric in (("digits", "accuracy"), ("pope", "f1_mean_of_splits")):
        base = results[f"{bench}-none"]["metrics"][metric]
        mine = results[f"{bench}-v2drop"]["metrics"][metric]
        assert rows["v2drop-llava15-128"][bench] == mine and rows["none"][bench] == base
        assert rows["v2drop-llava15-128"][f"{bench} vs none"] == pytest.approx(mine / base)
    assert rows["v2drop-llava15-128"]["avg_vs_none"] == pytest.approx(
        sum(rows["v2drop-llava15-128"][f"{b} vs none"] for b in ("digits", "pope")) / 2
    )
    assert "pope" not in rows["fastv-llava15-128"] and rows["none"]["avg_vs_none"] == 1.0
    assert rows["v2drop-llava15-128"]["flops_ratio"] < 1.0 == rows["none"]["flops_ratio"]
    markdown = (tmp_path / "out" / "report-proxy.md").read_text()
    assert markdown.splitlines()[0] == "| method | digits | pope | avg_vs_none | avg_vision_tokens | flops_ratio |"
    assert (tmp_path / "out" / "report-proxy.csv").read_text().startswith("method,")


def test_runs_on_other_samples_are_not_compared(runs, tmp_path):
    """A run on 3 samples has no no-dropping run on the same 3: no ratio, and the report says so."""
    evaluate.main(
        [
            *COMMON,
            "--limit",
            "3",
            "--benchmark",
            "digits",
            "--method",
            "v2drop-llava15-64",
            "--run-dir",
            str(tmp_path / "runs" / "short"),
        ]
    )
    for path in runs.rglob("result.json"):
        target = tmp_path / "runs" / path.parent.name / "result.json"
        target.parent.mkdir(parents=True)
        target.write_text(path.read_text())
    rows = {r["method"]: r for r in method_benchmark_table(collect_results(tmp_path / "runs"))["proxy"]}
    assert rows["v2drop-llava15-64"]["digits"] is not None and rows["v2drop-llava15-64"]["avg_vs_none"] is None


def test_paper_metrics_are_aggregate_keys():
    from v2drop.benchmarks import BENCHMARKS

    assert {n: BENCHMARKS.get(n).paper_metric for n in ("pope", "mme", "mvbench", "gqa")} == {
        "pope": "f1_mean_of_splits",
        "mme": "total",
        "mvbench": "mean_of_tasks",
        "gqa": "accuracy",
    }


def test_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "No runs directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "empty")])
    assert "No result.json under" in capsys.readouterr().err
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "result.json").write_text("{}")
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "bad")])
    assert "is not an evaluation result" in capsys.readouterr().err
