"""Fair accounting in every result: tokens both ways, the time split, agreement with the stored no-dropping run and
bootstrap intervals (``v2drop.evaluation.accounting``; definitions in docs/methods.md, "Measurements")."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import evaluate
from v2drop.evaluation.accounting import agreement, bootstrap_ci, paired_difference
from v2drop.evaluation.records import read_records

COMMON = ["--model", "proxy", "--max-new-tokens", "2", "--warmup", "0", "--no-progress", "--benchmark", "digits"]


def _stored(store, label):
    """The result.json and records of the run labelled ``label`` in ``store``."""
    for path in store.rglob("result.json"):
        data = json.loads(path.read_text())
        if data["config"]["label"] == label:
            return data, read_records(path.parent / "records.jsonl")
    raise AssertionError(f"no run labelled {label} in {store}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """No dropping, V²Drop at 64, VisionZip (pre-LLM) at 64 and random at 64 with seeds 0 and 1 on 6 digits samples,
    and V²Drop on 5 (``y``: no no-dropping run on those), in one store."""
    root = tmp_path_factory.mktemp("acct") / "store"
    args = [*COMMON, "--limit", "6", "--store", str(root)]
    evaluate.main([*args, "--method", "none", "--label", "none"])
    evaluate.main([*args, "--method", "v2drop-llava15-64", "--label", "v2drop"])
    evaluate.main([*args, "--method", "visionzip-llava15-64", "--label", "visionzip"])
    evaluate.main([*COMMON, "--limit", "5", "--store", str(root), "--method", "v2drop-llava15-64", "--label", "y"])
    evaluate.main([*args, "--method", "random-llava15-64", "--label", "random", "--seeds", "2"])
    return root


def test_tokens_both_ways(store):
    """per_layer is the mean of the records' per-layer counts, average its mean; entering_llm is what layer 0
    receives (all tokens for an in-LLM method, the pruned count for a pre-LLM one); KV entries add the text tokens in
    every layer and fall below no dropping's."""
    none, none_records = _stored(store, "none")
    for label in ("none", "v2drop", "visionzip"):
        data, records = _stored(store, label)
        tokens = data["tokens"]
        depth = len(records[0]["vision_tokens_per_layer"])
        assert len(tokens["per_layer"]) == depth
        for layer in range(depth):
            mean = sum(r["vision_tokens_per_layer"][layer] for r in records) / len(records)
            assert tokens["per_layer"][layer] == pytest.approx(mean)
        assert tokens["average"] == pytest.approx(sum(tokens["per_layer"]) / depth)
        assert tokens["average"] == pytest.approx(data["metrics"]["average_vision_tokens"])
        for r in records:
            text = r["prompt_tokens"] - r["vision_tokens"]
            assert r["entering_llm_vision_tokens"] == r["vision_tokens_per_layer"][0]
            assert r["kv_cache_tokens"] == sum(text + v for v in r["vision_tokens_per_layer"])
        assert tokens["entering_llm"] == pytest.approx(
            sum(r["entering_llm_vision_tokens"] for r in records) / len(records)
        )
        assert tokens["kv_cache_tokens"] == pytest.approx(sum(r["kv_cache_tokens"] for r in records) / len(records))
        assert tokens["kv_cache_tokens_no_drop"] == none["tokens"]["kv_cache_tokens"]
    full = none["tokens"]["entering_llm"]
    assert none["tokens"]["average"] == full == none["metrics"]["vision_tokens"]
    v2drop, visionzip = _stored(store, "v2drop")[0]["tokens"], _stored(store, "visionzip")[0]["tokens"]
    assert v2drop["entering_llm"] == full > v2drop["average"]  # in-LLM: every token enters, fewer on average
    assert visionzip["entering_llm"] < full and visionzip["entering_llm"] == pytest.approx(visionzip["average"])
    for tokens in (v2drop, visionzip):
        assert tokens["kv_cache_tokens"] < none["tokens"]["kv_cache_tokens"]


def test_time_split(store):
    """Each part is a median and a total over the records; decode = generation - prefill; ttft = vision + prefill;
    scoring is part of prefill; vision time is measured (> 0) in every record."""
    for label in ("none", "v2drop"):
        data, records = _stored(store, label)
        time = data["time"]
        assert set(time) == {"vision", "scoring", "prefill", "decode", "ttft"}
        assert all(r["vision_seconds"] > 0 for r in records)
        for r in records:
            assert r["decode_seconds"] == pytest.approx(r["generate_seconds"] - r["prefill_seconds"])
            assert r["ttft_seconds"] == pytest.approx(r["vision_seconds"] + r["prefill_seconds"])
        assert time["vision"]["total"] == pytest.approx(sum(r["vision_seconds"] for r in records))
        assert time["prefill"]["total"] == pytest.approx(sum(r["prefill_seconds"] for r in records))
        assert time["prefill"]["median"] == pytest.approx(data["metrics"]["prefill_latency_median_s"])
        assert time["decode"]["total"] == pytest.approx(
            sum(r["generate_seconds"] - r["prefill_seconds"] for r in records)
        )
        assert time["ttft"]["total"] == pytest.approx(time["vision"]["total"] + time["prefill"]["total"])
        assert 0 <= time["scoring"]["total"] <= time["prefill"]["total"]
        assert (time["scoring"]["total"] > 0) == (label != "none")


def test_agreement_with_none_reads_the_stored_run(store, tmp_path):
    """The share of answers equal to the stored no-dropping run's, sample by sample; 1 for no dropping itself; null
    with a note when the store holds no no-dropping run of the same key but the method."""
    _none, none_records = _stored(store, "none")
    for label in ("v2drop", "visionzip"):
        data, records = _stored(store, label)
        reference = {r["id"]: r["prediction"] for r in none_records}
        expected = sum(r["prediction"] == reference[r["id"]] for r in records) / len(records)
        assert data["agreement_with_none"] == pytest.approx(expected)
        assert data["notes"] == []
    assert _stored(store, "none")[0]["agreement_with_none"] == 1.0
    alone = tmp_path / "alone"
    evaluate.main([*COMMON, "--limit", "6", "--store", str(alone), "--method", "v2drop-llava15-64", "--label", "x"])
    data, _ = _stored(alone, "x")
    assert data["agreement_with_none"] is None
    assert any(n.startswith("agreement_with_none:") for n in data["notes"])
    # another number of samples is another key: never compared with the 6-sample no-dropping run
    assert _stored(store, "y")[0]["agreement_with_none"] is None


def test_agreement_counts_equal_answers():
    """Over the ids both runs have, the share of equal predictions."""
    runs = [{"id": i, "prediction": p} for i, p in enumerate("abca")]
    none = [{"id": i, "prediction": p} for i, p in enumerate("abcd")] + [{"id": 9, "prediction": "z"}]
    assert agreement(runs, none) == 0.75
    assert agreement(runs, [{"id": 7, "prediction": "a"}]) is None


def test_accuracy_interval_in_every_result(store):
    """``accuracy_ci95`` brackets the accuracy and is the bootstrap interval of the records' correctness."""
    for label in ("none", "v2drop"):
        data, records = _stored(store, label)
        low, high = data["metrics"]["accuracy_ci95"]
        assert low <= data["metrics"]["accuracy"] <= high
        assert [low, high] == bootstrap_ci([float(r["correct"]) for r in records])


def test_bootstrap_interval_covers_the_true_accuracy_at_the_nominal_rate():
    """200 synthetic Bernoulli benchmarks of 100 samples: the 95% interval holds the true accuracy in 90-99% of
    them; a fixed seed gives the same interval twice."""
    rng = np.random.default_rng(2024)
    p = 0.7
    datasets = [(rng.random(100) < p).astype(float) for _ in range(200)]
    covered = [low <= p <= high for low, high in map(bootstrap_ci, datasets)]
    assert 0.90 <= sum(covered) / len(covered) <= 0.99
    assert bootstrap_ci(datasets[0]) == bootstrap_ci(datasets[0])
    assert bootstrap_ci([1.0, 1.0, 1.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_paired_difference():
    """Paired over the shared sample ids: the mean difference, an interval around it, and whether it holds zero."""
    rng = np.random.default_rng(0)
    none = {i: bool(rng.random() < 0.8) for i in range(300)}
    same = paired_difference(dict(none), none)
    assert same == {"n": 300, "difference": 0.0, "ci95": [0.0, 0.0], "contains_zero": True}
    worse = {i: c and i % 3 != 0 for i, c in none.items()}  # a third of the samples turned wrong
    diff = paired_difference(worse, none)
    assert diff["difference"] == pytest.approx(sum(worse.values()) / 300 - sum(none.values()) / 300)
    assert diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1] < 0 and not diff["contains_zero"]
    shuffled = dict(zip(none, rng.permutation(list(none.values()))))  # other samples right, same accuracy
    noisy = paired_difference(shuffled, none)
    assert noisy["difference"] == 0.0 and noisy["ci95"][0] < 0 < noisy["ci95"][1] and noisy["contains_zero"]
    assert paired_difference({"a": True}, none) is None


def test_report_shows_intervals_and_paired_differences(store, tmp_path, capsys):
    """``experiments.report`` writes and prints, per run, the accuracy interval, the paired difference to the
    no-dropping run of the same samples (marked ``ns`` when its interval holds zero) and the agreement."""
    from experiments import report

    tables = report.main([str(store), "--output", str(tmp_path / "out")])
    assert {r["method"] for r in tables["proxy"]} == {"none", "v2drop", "visionzip", "y", "random"}
    text = (tmp_path / "out" / "report-proxy-intervals.md").read_text()
    assert text.splitlines()[0] == (
        "| method | benchmark | n | seeds | accuracy | accuracy ci95 | Δ vs none | Δ ci95 | agreement with none |"
    )
    assert text in capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    none, none_records = _stored(store, "none")
    for label in ("v2drop", "visionzip"):
        data, records = _stored(store, label)
        correct = {r["id"]: r["correct"] for r in records}
        diff = paired_difference(correct, {r["id"]: r["correct"] for r in none_records})
        cells = [c.strip() for c in rows[label].strip("|").split("|")]
        low, high = data["metrics"]["accuracy_ci95"]
        assert cells[3] == "1"  # one seed
        assert cells[5] == f"[{low:+.3f}, {high:+.3f}]"
        assert cells[6] == f"{diff['difference']:.3f}"
        assert cells[7] == f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]" + (
            " ns" if diff["contains_zero"] else ""
        )
        assert cells[8] == f"{data['agreement_with_none']:.3f}"
    none_cells = [c.strip() for c in rows["none"].strip("|").split("|")]
    y_cells = [c.strip() for c in rows["y"].strip("|").split("|")]
    assert none_cells[6:] == ["", "", ""] and y_cells[6:] == ["", "", ""]  # no baseline on y's 5 samples


def test_terminal_table_shows_the_accounting(store):
    """The table ``experiments.evaluate`` prints has the interval, the agreement, the tokens and the time split."""
    from v2drop.evaluation import format_table
    from v2drop.evaluation.store import read_stored

    for path in store.rglob("result.json"):
        data = json.loads(path.read_text())
        if data["config"]["label"] != "v2drop":
            continue
        text = format_table(read_stored(path.parent))
        low, high = data["metrics"]["accuracy_ci95"]
        assert f"accuracy 95% bootstrap interval [{low:.3f}, {high:.3f}]" in text
        assert f"answers equal to no dropping's: {data['agreement_with_none']:.1%}" in text
        assert f"vision tokens entering the LLM {data['tokens']['entering_llm']:.1f}" in text
        assert f"time to first token {data['time']['ttft']['median'] * 1e3:.1f}" in text


def _by_seed(store, label):
    """``{seed: (result data, records)}`` of the runs labelled ``label`` (one per scorer seed)."""
    out = {}
    for path in store.rglob("result.json"):
        data = json.loads(path.read_text())
        if data["config"]["label"] == label:
            out[data["method"]["scorer"]["seed"]] = data, read_records(path.parent / "records.jsonl")
    return out


def test_seeds_file_one_run_per_seed_and_an_interval_over_samples_and_seeds(store, capsys):
    """``--seeds 2`` on the random scorer files two store keys (seeds 0 and 1, otherwise equal); the result reports the
    mean of their accuracies with the samples-and-seeds bootstrap interval around it, and the terminal table prints
    it; running it again reuses both keys."""
    from v2drop.evaluation.accounting import seed_sample_ci

    runs = _by_seed(store, "random")
    assert sorted(runs) == [0, 1]
    (zero, zero_records), (one, one_records) = runs[0], runs[1]
    assert zero["key"] != one["key"] and {**zero["method"]["scorer"], "seed": 1} == one["method"]["scorer"]
    again = evaluate.main(
        [*COMMON, "--limit", "6", "--store", str(store), "--method", "random-llava15-64"]
        + ["--label", "random", "--seeds", "2"]
    )
    assert again["reused"] and "over 2 seeds: accuracy" in capsys.readouterr().out
    seeds = again["seeds"]
    accuracies = [zero["metrics"]["accuracy"], one["metrics"]["accuracy"]]
    assert seeds["seeds"] == [0, 1] and seeds["accuracy"] == accuracies
    assert seeds["mean"] == pytest.approx(sum(accuracies) / 2)
    assert seeds["ci95"][0] <= seeds["mean"] <= seeds["ci95"][1]
    matrix = [[float(r["correct"]) for r in records] for records in (zero_records, one_records)]
    assert seeds["ci95"] == seed_sample_ci(matrix)
    assert sorted(seeds["folders"]) == sorted(
        p.parent.name
        for p in store.rglob("result.json")
        if "random" in str(json.loads(p.read_text())["config"]["label"])
    )


def test_a_deterministic_method_given_seeds_runs_once(store):
    """``--seeds`` on a deterministic scorer files no new key: the one run, with a note saying so."""
    folders = sorted(p.parent for p in store.rglob("result.json"))
    result = evaluate.main(
        [*COMMON, "--limit", "6", "--store", str(store), "--method", "v2drop-llava15-64"]
        + ["--label", "v2drop", "--seeds", "3"]
    )
    assert sorted(p.parent for p in store.rglob("result.json")) == folders
    assert result["seeds"] is None and "seeds: v2drop is deterministic; run once" in result["notes"]


def test_seed_sample_interval():
    """Two-way resampling: identical seeds give the samples-only width or more, a spread between seeds widens it; a
    single seed is bootstrap_ci; a fixed seed gives the same interval; bad shapes are errors."""
    from v2drop.evaluation.accounting import seed_sample_ci

    rng = np.random.default_rng(1)
    row = (rng.random(60) < 0.6).astype(float)
    assert seed_sample_ci([row]) == bootstrap_ci(row)
    apart = seed_sample_ci([row, np.ones(60)])
    assert apart == seed_sample_ci([row, np.ones(60)]) and apart[0] <= (row.mean() + 1) / 2 <= apart[1]
    low, high = seed_sample_ci([row, row])
    assert low <= row.mean() <= high
    with pytest.raises(ValueError, match="seeds × samples"):
        seed_sample_ci([1.0, 0.0])


def test_report_pairs_every_two_methods(store, tmp_path, capsys):
    """``experiments.report`` writes one row per pair of methods on the same samples: the paired-bootstrap difference
    equals a hand-made ``scipy.stats.bootstrap`` call on the per-sample differences with the same seed (a seeded
    method's correctness averaged over its seeds); ``--compare`` keeps the pairs of the labels it names."""
    from scipy.stats import bootstrap

    from experiments import report
    from v2drop.evaluation.accounting import RESAMPLES, SEED

    report.main([str(store), "--output", str(tmp_path / "out")])
    text = (tmp_path / "out" / "report-proxy-pairs.md").read_text()
    assert text.splitlines()[0] == "| method | vs | benchmark | n | Δ | Δ ci95 |" and text in capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    labels = ("none", "random", "v2drop", "visionzip")  # y ran on other samples: paired with none of them
    assert [(r[0], r[1]) for r in rows] == [(b, a) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    correct = {label: {r["id"]: float(r["correct"]) for r in _stored(store, label)[1]} for label in labels}
    seeds = _by_seed(store, "random")
    correct["random"] = {
        i: sum(float(r["correct"]) for records in (seeds[0][1], seeds[1][1]) for r in records if r["id"] == i) / 2
        for i in correct["none"]
    }
    for method, vs, _bench, n, delta, ci in rows:
        diff = np.array([correct[method][i] - correct[vs][i] for i in correct[vs]])
        assert int(n) == len(diff) == 6 and delta == f"{diff.mean():.3f}"
        if np.all(diff == diff[0]):
            low = high = diff[0]
        else:
            res = bootstrap(
                (diff,), np.mean, n_resamples=RESAMPLES, method="percentile", random_state=np.random.default_rng(SEED)
            )
            low, high = res.confidence_interval
        assert ci == f"[{low:+.3f}, {high:+.3f}]" + (" ns" if low <= 0 <= high else "")
    report.main([str(store), "--output", str(tmp_path / "some"), "--compare", "none,visionzip"])
    some = (tmp_path / "some" / "report-proxy-pairs.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[:2] for line in some] == [["| visionzip", "none"]]


def test_pairs_mark_a_difference_whose_interval_holds_zero(tmp_path):
    """On synthetic runs of 40 samples: a method right wherever no dropping is has Δ 0 with interval [0, 0], marked
    ``ns``; one wrong on half of them has Δ -0.5 and an interval below zero, unmarked; so does the pair between them."""
    from v2drop.evaluation.collect import pairwise_rows, run_result

    runs = [
        _synthetic(tmp_path, "none", [True] * 40, drops=False),
        _synthetic(tmp_path, "same", [True] * 40),
        _synthetic(tmp_path, "half", [i % 2 == 0 for i in range(40)]),
    ]
    rows = {(r["method"], r["vs"]): r for r in pairwise_rows([run_result(*run) for run in runs])["proxy"]}
    assert rows[("same", "none")]["Δ"] == 0.0 and rows[("same", "none")]["Δ ci95"] == "[+0.000, +0.000] ns"
    half = rows[("half", "none")]
    assert half["Δ"] == -0.5 and half["n"] == 40 and not half["Δ ci95"].endswith("ns")
    low, high = (float(x) for x in half["Δ ci95"].strip("[]").split(","))
    assert low <= -0.5 <= high < 0
    assert rows[("same", "half")]["Δ"] == 0.5 and not rows[("same", "half")]["Δ ci95"].endswith("ns")
    only = pairwise_rows([run_result(*run) for run in runs], compare=["none", "half"])["proxy"]
    assert [(r["method"], r["vs"]) for r in only] == [("half", "none")]


def _synthetic(root, label, correct, drops=True):
    """A stored run (result.json data and its path) of ``label`` whose records are right where ``correct`` says."""
    from v2drop.evaluation.records import write_records

    method = {"scorer": {"name": "position"} if drops else "none", "schedule": {"stages": [[1, 0.5]] if drops else []}}
    key = {
        "weights": "w",
        "model": "proxy",
        "benchmark": "digits",
        "benchmark_args": {},
        "split": "test",
        "n": len(correct),
        "samples": "s",
        "method": method,
        "max_new_tokens": 2,
        "attn_implementation": "sdpa",
        "dtype": "float32",
        "batch_size": 1,
    }
    data = {
        "config": {"model": "proxy", "benchmark": "digits", "label": label},
        "metrics": {
            "n": len(correct),
            "accuracy": sum(correct) / len(correct),
            "average_vision_tokens": 1.0,
            "flops_ratio": 1.0,
        },
        "method": method,
        "key": key,
    }
    folder = root / label
    folder.mkdir()
    write_records(
        [{"id": i, "correct": c, "prediction": str(c)} for i, c in enumerate(correct)], folder / "records.jsonl"
    )
    (folder / "result.json").write_text(json.dumps(data))
    return data, folder / "result.json"


def test_scoring_time_is_the_scorers_whole_work_its_selection_included(tiny):
    """``scoring_seconds`` covers ``select`` as well as ``score`` (methods such as HoliTom or DivPrune choose their
    tokens there), and stays within the prefill."""
    import time
    from dataclasses import dataclass

    from v2drop import Method, Schedule, register_scorer
    from v2drop.scorers.baselines import UniformScorer
    from v2drop.testing import batch_for

    @register_scorer("test-slow-select")  # the registry fixture removes it after the test
    @dataclass
    class SlowSelect(UniformScorer):
        def select(self, state, scores, counts):
            time.sleep(0.25)
            return super().select(state, scores, counts)

    lvlm = tiny("llava", "sdpa")
    prompts, images = batch_for(lvlm, 2, "llava")
    inputs = lvlm.prepare(prompts, images)
    slow = lvlm.generate_from_inputs(inputs, Method(SlowSelect(), schedule=Schedule.one_shot(2, 0.5)), max_new_tokens=1)
    assert 0.25 <= slow.scoring_seconds <= slow.prefill_seconds
    fast = lvlm.generate_from_inputs(
        inputs, Method(UniformScorer(), schedule=Schedule.one_shot(2, 0.5)), max_new_tokens=1
    )
    assert fast.generated_ids == slow.generated_ids and fast.scoring_seconds < 0.25
