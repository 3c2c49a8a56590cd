"""``experiments.report``: the finished runs of a run store become one method × benchmark table relative to no
dropping, the same table ``analysis.method_table`` writes from the same store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from experiments import evaluate, report
from v2drop.budgets import CONTROLS, missing_controls
from v2drop.evaluation.collect import TOKEN_NOTE, collect_results, method_benchmark_table

COMMON = ["--model", "proxy", "--max-new-tokens", "2", "--warmup", "0", "--no-progress"]
DATA = {
    "digits": ["--limit", "4"],
    "pope": ["--data-dir", str(Path(__file__).parent / "fixtures" / "realbench" / "pope")],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """none and V²Drop at 128 on digits and POPE (the fixture), FastV at 128 on digits; evaluated through the CLI."""
    root = tmp_path_factory.mktemp("runs") / "store"
    for bench in ("digits", "pope"):
        args = [*COMMON, *DATA[bench], "--benchmark", bench, "--store", str(root)]
        evaluate.main([*args, "--method", "none"])
        evaluate.main([*args, "--method", "v2drop-llava15-128"])
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
            "--store",
            str(root),
        ]
    )
    return root


def test_table_is_the_runs_relative_to_none(runs, tmp_path):
    tables = report.main([str(runs), "--output", str(tmp_path / "out")])
    rows = {r["method"]: r for r in tables["proxy"]}
    assert list(rows) == ["none", "fastv-llava15-128", "v2drop-llava15-128"]
    stored = [json.loads(p.read_text()) for p in runs.rglob("result.json")]
    results = {(r["config"]["benchmark"], r["config"]["label"]): r for r in stored}
    assert len(results) == len(stored) == 5
    for bench, metric in (("digits", "accuracy"), ("pope", "f1_mean_of_splits")):
        base = results[(bench, "none")]["metrics"][metric]
        mine = results[(bench, "v2drop-llava15-128")]["metrics"][metric]
        assert rows["v2drop-llava15-128"][bench] == mine and rows["none"][bench] == base
        assert rows["v2drop-llava15-128"][f"{bench} vs none"] == pytest.approx(mine / base)
    assert rows["v2drop-llava15-128"]["avg_vs_none"] == pytest.approx(
        sum(rows["v2drop-llava15-128"][f"{b} vs none"] for b in ("digits", "pope")) / 2
    )
    assert "pope" not in rows["fastv-llava15-128"] and rows["none"]["avg_vs_none"] == 1.0
    assert rows["v2drop-llava15-128"]["flops_ratio"] < 1.0 == rows["none"]["flops_ratio"]
    for label in ("none", "v2drop-llava15-128"):  # both token counts: averaged over the layers, entering the LLM
        tokens = [results[(b, label)]["tokens"] for b in ("digits", "pope")]
        assert rows[label]["avg_vision_tokens"] == pytest.approx(sum(t["average"] for t in tokens) / 2)
        assert rows[label]["entering_llm_tokens"] == pytest.approx(sum(t["entering_llm"] for t in tokens) / 2)
    assert rows["v2drop-llava15-128"]["avg_vision_tokens"] < rows["v2drop-llava15-128"]["entering_llm_tokens"]
    markdown = (tmp_path / "out" / "report-proxy.md").read_text().splitlines()
    assert markdown[0] == TOKEN_NOTE and "avg_vision_tokens = retained per decoder layer, averaged" in TOKEN_NOTE
    assert markdown[2] == (
        "| method | digits | pope | avg_vs_none | avg_vision_tokens | entering_llm_tokens | flops_ratio |"
    )
    assert (tmp_path / "out" / "report-proxy.csv").read_text().startswith("method,")


def test_runs_on_other_samples_are_not_compared(runs, tmp_path):
    """A run on 3 samples has no no-dropping run on the same 3: no ratio, and the report says so."""
    shutil.copytree(runs, tmp_path / "store")
    evaluate.main(
        [
            *COMMON,
            "--limit",
            "3",
            "--benchmark",
            "digits",
            "--method",
            "v2drop-llava15-64",
            "--store",
            str(tmp_path / "store"),
        ]
    )
    rows = {r["method"]: r for r in method_benchmark_table(collect_results(tmp_path / "store"))["proxy"]}
    assert rows["v2drop-llava15-64"]["digits"] is not None and rows["v2drop-llava15-64"]["avg_vs_none"] is None


def test_a_finished_run_is_reused_without_model_work(runs, tmp_path, capsys):
    """The same command again reads the stored run back: records and result untouched, the command says so."""
    argv = [*COMMON, *DATA["digits"], "--benchmark", "digits", "--method", "none", "--store", str(runs)]
    files = sorted(runs.rglob("*.json*"))
    stamps = [p.stat().st_mtime_ns for p in files]
    again = evaluate.main(argv)
    assert again["reused"] and "finished earlier, reused in" in capsys.readouterr().out
    assert sorted(runs.rglob("*.json*")) == files and [p.stat().st_mtime_ns for p in files] == stamps


def test_method_table_and_report_give_the_same_table_one(tmp_path):
    """``analysis.method_table`` (which evaluates into the store) and ``experiments.report`` (which only reads it) lay
    out the same numbers: one builder, one ratio."""
    from analysis import method_table

    store = tmp_path / "store"
    argv = ["--limit", "2", "--scorers", "v2drop-l2", "fastv", "--budgets", "128", "--batch-size", "2"]
    table = method_table.main([*argv, "--store", str(store), "--out", str(tmp_path / "analysis")])
    # the controls (v2drop.budgets.CONTROLS) are rows at every budget besides the chosen scorers, in registry order
    assert [r["method"] for r in table] == [
        "none",
        "v2drop-l2@128",
        "downsample@128",
        "fastv@128",
        "pool@128",
        "random@128",
    ]
    controls = {r["method"]: r["avg_vision_tokens"] for r in table if r["method"].split("@")[0] in CONTROLS}
    assert controls == {"random@128": pytest.approx(56.67, abs=0.01), "downsample@128": 56, "pool@128": 56}  # 7 x 8
    files = sorted(store.rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in files]
    reported = {r["method"]: r for r in report.main([str(store), "--output", str(tmp_path / "report")])["proxy"]}
    assert set(reported) == {r["method"] for r in table}
    numbers = ("digits", "digits vs none", "avg_vs_none", "avg_vision_tokens", "entering_llm_tokens", "flops_ratio")
    numbers += ("prefill_ms",)
    for row in table:
        assert {k: row.get(k) for k in numbers} == {k: reported[row["method"]].get(k) for k in numbers}
        families = {k: v for k, v in row.items() if k.startswith("digits/")}
        assert families and families == {k: v for k, v in reported[row["method"]].items() if k.startswith("digits/")}
    assert table[0]["avg_vs_none"] == 1.0 and table[1]["flops_ratio"] < 1.0
    assert sorted(store.rglob("*")) == files and [p.stat().st_mtime_ns for p in files] == stamps  # report only reads
    again = method_table.main([*argv, "--store", str(store), "--out", str(tmp_path / "again")])
    assert again == table and [p.stat().st_mtime_ns for p in files] == stamps  # every run reused, none redone
    plain = method_table.main([*argv, "--no-controls", "--store", str(store), "--out", str(tmp_path / "plain")])
    assert [r["method"] for r in plain] == ["none", "v2drop-l2@128", "fastv@128"]


def test_report_names_the_controls_missing_at_the_budgets_it_shows(runs, tmp_path, capsys):
    report.main([str(runs), "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert (
        "controls not run at 128 tokens: random-llava15-128, downsample-llava15-128, pool-llava15-128 "
        "(python -m experiments.evaluate --method <preset>, on the same benchmarks)"
    ) in out
    assert "at 64 tokens" not in out and "at 192 tokens" not in out  # only the budgets the table shows
    assert missing_controls(["none", "pool@64", "random-llava15-64", "fastv@64", "v2drop-llava15-192"]) == {
        192: ["random-llava15-192", "downsample-llava15-192", "pool-llava15-192"],
        64: ["downsample-llava15-64"],
    }


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


def test_compare_names_labels_of_the_store(runs, tmp_path, capsys):
    for value in ("none", "none,nope"):
        with pytest.raises(SystemExit) as exit_:
            report.main([str(runs), "--output", str(tmp_path / "out"), "--compare", value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "--compare takes two or more method labels of the store" in err
    assert "(nope not in the store)" in err and "labels: fastv-llava15-128, none, v2drop-llava15-128" in err
