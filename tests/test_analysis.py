"""Analysis helpers on hand-made records, the real-model cost table, and cached method runs."""

from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from analysis.common import (
    AnalysisConfig,
    budget_method,
    read_records,
    resolve_split,
    run_methods,
    save_figure,
    scorer_variants,
    table_rows,
    vision_tokens_of,
)
from analysis.evidence_kept import evidence_shares
from analysis.method_table import methods_at_budgets
from analysis.pareto import _sweep_points, mark_fronts
from analysis.positional_bias import interval_keep_rates
from analysis.real_cost import MODELS, available_models, cost_rows
from v2drop import Method, Schedule
from v2drop.benchmarks import Benchmark
from v2drop.cli import parse_config
from v2drop.evaluation import EvalConfig
from v2drop.scorers import SCORERS, Scorer
from v2drop.testing import EchoBench


def test_real_cost_table():
    llava = MODELS[0]
    rows = {r["preset"]: r for r in cost_rows(llava, 64, ["v2drop-llava15-192"])}
    n, d, m = 640, 4096, 11008
    assert rows["none"]["tflops"] == pytest.approx(32 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) / 1e12)
    assert rows["v2drop-llava15-192"]["avg_vision_tokens"] == 193.75
    # KV cache grows with the tokens each layer holds: 64 text + present vision tokens.
    per_layer = Method.from_preset("v2drop-llava15-192").schedule.tokens_per_layer(32, 576)
    assert rows["v2drop-llava15-192"]["kv_ratio"] == pytest.approx(sum(64 + v for v in per_layer) / (32 * 640))


def test_real_cost_count_presets_keep_their_share_on_other_token_counts():
    """FastV keeps 98 of 576 on LLaVA-1.5; on 6,273 video tokens it keeps the same share (1,067), not 98."""
    onevision = MODELS[2]
    assert onevision.vision_tokens == 32 * 196 + 1  # 196 pooled tokens a frame, one newline after the clip
    rows = {r["preset"]: r for r in cost_rows(onevision, 64, ["fastv-llava15-128"])}
    kept = int(6273 * 98 / 576)
    assert rows["fastv-llava15-128"]["avg_vision_tokens"] == pytest.approx((2 * 6273 + 26 * kept) / 28)


def test_real_cost_covers_every_family_with_its_real_token_count():
    """One checkpoint per family with a real-geometry builder; vision tokens from the family's own preprocessing."""
    from v2drop.testing import FAMILIES

    models = {m.family: m for m in available_models()}
    assert set(models) == set(FAMILIES)  # every builder has a checkpoint, and only those are in the table
    assert {m.family for m in MODELS} >= {"gemma3"}  # Gemma 3 waits for its builder
    tokens = {f: m.vision_tokens for f, m in models.items()}
    expected = {
        "llava": 576,  # 24 x 24 at 336 px
        "llava_next": 576 + 48 * 48 + 48,  # base view, 2 x 2 tiles of 24 x 24, a newline per row
        "llava_onevision": 32 * 196 + 1,
        "qwen2_vl": 24 * 24,  # 672 / 14 = 48 patches a side, merged 2 x 2
        "qwen2_5_vl": 24 * 24,
        "qwen3_vl": 21 * 21,  # 672 / 16 = 42 patches a side, merged 2 x 2
        "internvl": 5 * 256,  # 2 x 2 tiles of 448 px plus a thumbnail, 256 tokens each
        "gemma3": 256,  # any image: SigLIP at 896 px pooled to 16 x 16 (checked once gemma3 has a builder)
        "qwen3_vl_moe": 21 * 21,  # Qwen3-VL-8B's vision geometry
    }
    assert tokens == {f: expected[f] for f in tokens}
    qwen3 = models["qwen3_vl"]
    rows = {r["preset"]: r for r in cost_rows(qwen3, 64, ["v2drop-llava15-128"])}
    n, d, m = 64 + 441, 4096, 12288
    assert rows["none"]["tflops"] == pytest.approx(36 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) / 1e12)
    assert rows["none"]["kv_cache_mb"] == pytest.approx(36 * n * 2 * 8 * 128 * 2 / 2**20)  # GQA: 8 KV heads of 128
    gemma = next(m for m in MODELS if m.family == "gemma3")
    assert gemma.text_config().head_dim == 256  # not hidden / heads = 320


def test_mark_fronts_flags_the_non_dominated_rows_per_cost():
    points = [(1, 0.5), (2, 0.7), (2, 0.6), (3, 0.7), (0.5, 0.2), (4, 0.9)]
    rows = [{"prefill_ms": c, "flops_ratio": 1.0, "accuracy": a} for c, a in points]
    mark_fronts(rows)
    assert [i for i, r in enumerate(rows) if r["pareto_prefill_ms"]] == [0, 1, 4, 5]
    # Equal cost everywhere: only the most accurate row is on the FLOPs front.
    assert [i for i, r in enumerate(rows) if r["pareto_flops_ratio"]] == [5]


def test_save_figure_writes_the_png_and_reports_it(tmp_path, capsys):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path, "line")
    assert path == tmp_path / "line.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path}"
    assert not plt.fignum_exists(fig.number)


def test_scorer_variants_follow_the_registry(monkeypatch):
    """Every registered scorer gets a row; one without presets runs on V²Drop's schedule."""
    variants = scorer_variants()
    assert list(variants)[:3] == ["v2drop-l2", "v2drop-l1", "v2drop-cosine"]
    assert variants["fastv"] == ("fastv", {}) and variants["random"] == ("random", {})
    # scorers without presets of their own name run on the first preset that uses them, fitted to each budget
    assert variants["composite"] == ("composite-v2drop-dart", {}) and variants["staged"] == ("visionzip-v2drop", {})
    assert "given" not in variants  # an oracle needs each sample's positions
    # a scorer's named variants (official behaviour) are rows of their own, right after it
    keys = list(variants)
    assert variants["dart-official"] == ("dart-official", {}) and keys.index("dart-official") == keys.index("dart") + 1
    assert variants["visionzip-official"] == ("visionzip-official", {})

    @dataclass
    class NormScorer(Scorer):
        def score(self, state):
            return state.hidden.float().norm(dim=-1).gather(1, state.vision_idx)

    monkeypatch.setitem(SCORERS._items, "norm-test", NormScorer)
    variants = scorer_variants()
    assert variants["norm-test"] == ("v2drop", {"name": "norm-test"})
    methods, info = methods_at_budgets(12, 256, {"norm-test": variants["norm-test"]})
    assert isinstance(methods["norm-test@128"].scorer, NormScorer)
    assert methods["norm-test@128"].schedule.layers == methods_at_budgets(12, 256)[0]["v2drop-l2@128"].schedule.layers


def test_sweep_front_prefers_the_one_confirmed_on_test(tmp_path):
    """The overlay sits on the methods' split: the test-confirmed front when the sweep wrote one, else the validation
    one.
    """
    (tmp_path / "pareto.csv").write_text("trial,accuracy,prefill_ms,flops_ratio\n3,0.55,9.2,0.137\n")
    rows, split = _sweep_points(tmp_path)
    assert split == "validation sample" and rows[0]["accuracy"] == "0.55"
    (tmp_path / "pareto_confirmed.csv").write_text(
        "trial,label,schedule,validation_accuracy,test_accuracy,test_prefill_ms,test_flops_ratio,test_average_tokens\n"
        "3,,1:0.05,0.55,0.597,9.5,0.137,26.8\n"
    )
    rows, split = _sweep_points(tmp_path)
    assert split == "confirmed" and rows == [{"accuracy": "0.597", "prefill_ms": "9.5", "flops_ratio": "0.137"}]
    with pytest.raises(ValueError, match="has no pareto.csv"):
        _sweep_points(tmp_path / "missing")


def record(kept_stages, runs=((10, 20),), depth=4, family="a", rid="x"):
    n = sum(length for _, length in runs)
    return {
        "id": rid,
        "family": family,
        "vision_runs": [list(r) for r in runs],
        "kept": kept_stages,
        "vision_tokens_per_layer": [n] * depth,
        "vision_tokens": n,
        "average_vision_tokens": 0.0,
    }


def test_interval_keep_rates():
    # 20 vision tokens at prompt positions 10..29; keep the last 10 -> tenths 6-10 kept, 1-5 dropped.
    r = record([{"layer": 1, "kept": list(range(20, 30))}])
    assert interval_keep_rates([r]) == [0.0] * 5 + [1.0] * 5


def test_evidence_shares():
    # 20 vision tokens (positions 10..29); evidence = vision tokens 0..3 (positions 10..13).
    r = record([{"layer": 1, "kept": [10, 11, 20, 21]}, {"layer": 3, "kept": [10]}], depth=4)
    r["vision_tokens_per_layer"] = [20, 4, 4, 1]
    r["average_vision_tokens"] = 29 / 4
    shares = evidence_shares([r], {"x": (0, 1, 2, 3)})
    assert shares["after_first_stage"] == 0.5 and shares["after_last_stage"] == 0.25
    # per layer: 1.0 (all present), 0.5, 0.5, 0.25 -> mean 0.5625
    assert shares["layer_average"] == pytest.approx(0.5625)
    assert shares["enrichment"] == pytest.approx(0.5625 / (29 / 80))


def test_budget_methods_meet_their_budgets():
    methods, info = methods_at_budgets(12, 256)
    assert "none" in methods and "v2drop-l1@128" in methods and "random@64" in methods
    for label, method in methods.items():
        if label == "none":
            continue
        target = info[label]["budget"] / 576 * 256
        avg = method.schedule.average_tokens(12, 256)
        assert target - 12 < avg <= target, (label, avg, target)
    assert methods["v2drop-cosine@192"].scorer.metric == "cosine"
    assert budget_method("no-such-method", 128, 12, 256) is None
    for budget in (192, 128, 64):  # the staged and composite presets exist at 128 only
        assert (
            methods[f"staged@{budget}"].schedule.layers == (-1, 1, 6, 8)
            and methods[f"staged@{budget}"].scorer.pre_llm["name"] == "visionzip"
        )
        assert [p["name"] for p in methods[f"composite@{budget}"].scorer.parts] == ["v2drop", "dart"]
    assert methods["divprune@64"].schedule.layers == (-1,)


def test_pre_llm_composite_and_staged_methods_run_through_the_analysis_helpers(tiny, tmp_path):
    """method_table's methods for the new scorers run, and their records feed positional_bias and evidence_kept."""
    lvlm, bench = tiny("llava"), EchoBench(2)
    n_vision = vision_tokens_of(lvlm, bench.load("test", 1)[0])
    names = ("composite", "staged", "visionzip", "divprune")
    # half of the tokens: the tiny model's few layers and tokens cannot reach the paper budgets with a stage at layer 1
    picked, info = methods_at_budgets(
        lvlm.depth, n_vision, {n: v for n, v in scorer_variants().items() if n in names}, budgets=(288,)
    )
    picked.pop("none")
    assert set(picked) == {f"{n}@288" for n in names}
    config = EvalConfig(model="tiny", benchmark="echo", warmup=0, max_new_tokens=1, progress=False)
    results = run_methods(lvlm, bench, picked, config)
    for label, method in picked.items():
        records = read_records(results[label])
        assert len(records) == 2 and results[label]["metrics"]["average_vision_tokens"] < n_vision
        assert [s["layer"] for s in records[0]["kept"]] == list(method.schedule.layers)
        rates = interval_keep_rates(records)
        assert len(rates) == 10 and 0 < sum(rates) < 10
        shares = evidence_shares(records, {r["id"]: (0, 1, 2) for r in records})
        assert 0 <= shares["layer_average"] <= 1 and shares["after_first_stage"] is not None


def test_run_methods_reuses_finished_runs_from_the_store(tiny, tmp_path):
    lvlm, bench = tiny("llava"), EchoBench(3)
    config = EvalConfig(model="tiny", benchmark="echo", warmup=0, max_new_tokens=1, progress=False, store=str(tmp_path))
    methods = {"none": Method.none(), "drop": Method("v2drop", schedule=Schedule.one_shot(2, 0.5))}
    first = run_methods(lvlm, bench, methods, config)
    result_json = Path(first["drop"]["records_path"]).parent / "result.json"
    stamp = result_json.stat().st_mtime_ns
    again = run_methods(lvlm, bench, methods, config)
    assert result_json.stat().st_mtime_ns == stamp and again["drop"]["reused"] and not first["drop"]["reused"]
    assert again["drop"]["metrics"] == first["drop"]["metrics"]
    changed = run_methods(lvlm, bench, {"drop": Method("v2drop", schedule=Schedule.one_shot(2, 0.25))}, config)
    assert changed["drop"]["metrics"]["average_vision_tokens"] < first["drop"]["metrics"]["average_vision_tokens"]
    assert not changed["drop"]["reused"] and len(list(tmp_path.iterdir())) == 3


def test_run_methods_reruns_when_the_weights_change_under_the_same_name(tiny, tmp_path):
    """A model retrained under the same name (a bundled proxy replaced) is not served the old model's results."""
    import copy

    from v2drop.lvlm import LVLM

    lvlm, bench = tiny("llava"), EchoBench(3)
    config = EvalConfig(model="tiny", benchmark="echo", warmup=0, max_new_tokens=1, progress=False, store=str(tmp_path))
    methods = {"drop": Method("v2drop", schedule=Schedule.one_shot(2, 0.5))}
    first = run_methods(lvlm, bench, methods, config)
    assert LVLM(copy.deepcopy(lvlm.model), lvlm.processor, lvlm.name).weights_fingerprint == lvlm.weights_fingerprint
    model = copy.deepcopy(lvlm.model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    retrained = LVLM(model, lvlm.processor, lvlm.name)
    assert retrained.weights_fingerprint != lvlm.weights_fingerprint
    result = run_methods(retrained, bench, methods, config)
    assert not result["drop"]["reused"] and result["drop"]["records_path"] != first["drop"]["records_path"]
    assert result["drop"]["key"]["weights"] == retrained.weights_fingerprint
    assert first["drop"]["key"]["weights"] == lvlm.weights_fingerprint


def test_variation_maps_plot_the_recorded_v2drop_scores(tmp_path):
    """``analysis.variation_maps`` runs on the bundled proxy: one panel per V²Drop stage, and the scorer is left
    unpatched afterwards.
    """
    from analysis.variation_maps import main as maps_main
    from v2drop.scorers.v2drop import V2DropScorer

    score = V2DropScorer.score
    rows = maps_main(["--samples", "1", "--output", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["stages"] and V2DropScorer.score is score
    assert any(p.suffix == ".png" for p in tmp_path.rglob("*"))


def test_table_rows_relate_each_method_to_no_dropping_of_the_same_key(tiny, tmp_path):
    """Rows follow run_methods' order; the benchmark score's ratio to none is avg_vs_none (one benchmark here), the
    per-family scores and the extra columns are there."""
    lvlm = tiny("llava")
    config = EvalConfig(model="tiny", benchmark="echo", warmup=0, max_new_tokens=1, progress=False)
    methods = {"drop": Method("v2drop", schedule=Schedule.one_shot(1, 0.25)), "none": Method.none()}
    # Answers the model gives without dropping for half the samples, so that no dropping scores above zero.
    bench = EchoBench(4)
    probe = run_methods(lvlm, bench, {"none": Method.none()}, replace(config, store=str(tmp_path / "probe")))
    said = {r["id"]: r["prediction"] for r in read_records(probe["none"])}
    bench.items = [replace(s, answer=said[s.id] if k % 2 else "?") for k, s in enumerate(bench.items)]
    results = run_methods(lvlm, bench, methods, replace(config, store=str(tmp_path / "store")))
    rows = table_rows(results, extra={"drop": {"budget": 128}})
    assert [r["method"] for r in rows] == ["drop", "none"] and rows[0]["budget"] == 128
    acc = {label: res["metrics"]["accuracy"] for label, res in results.items()}
    assert acc["none"] == 0.5 and rows[1]["avg_vs_none"] == 1.0
    assert rows[0]["avg_vs_none"] == pytest.approx(acc["drop"] / 0.5) == rows[0]["echo vs none"]
    assert rows[0]["accuracy"] == acc["drop"] and rows[0]["echo"] == acc["drop"]
    assert {k for k in rows[0] if k.startswith("echo/")} == {f"echo/{f}" for f in results["drop"]["per_family"]}


def test_vs_none_is_the_one_ratio():
    from v2drop.evaluation.collect import vs_none

    ratios, mean = vs_none({"a": 0.25, "b": 0.9, "c": 0.5, "d": None}, {"a": 0.5, "b": 1.0, "c": 0.0, "d": 1.0})
    assert ratios == {"a": 0.5, "b": 0.9} and mean == pytest.approx(0.7)
    assert vs_none({"a": 1.0}, {}) == ({}, None)


def test_split_defaults_to_the_benchmarks_own():
    """No --split: the benchmark's default split (MMBench's is dev); --split given: checked against its splits."""

    class DevOnly(Benchmark):
        name = "dev-only"
        splits = ("dev", "validation")
        default_split = "dev"

    args = parse_config(AnalysisConfig, [])
    assert resolve_split(args, DevOnly()) == "dev" and args.split == "dev"
    assert resolve_split(parse_config(AnalysisConfig, ["--split", "validation"]), DevOnly()) == "validation"
    with pytest.raises(ValueError, match="no split 'test'; valid splits: dev, validation"):
        resolve_split(parse_config(AnalysisConfig, ["--split", "test"]), DevOnly())


def test_method_table_entering_budgets_keep_exact_counts_before_the_llm(capsys):
    """``--budget-count entering``: each pre-LLM variant lets exactly the budget's share of the model's vision tokens
    enter the LLM; variants without a stage before the LLM are left out; an unknown count is a one-line error."""
    from analysis import method_table

    methods, info = methods_at_budgets(12, 256, budgets=(128, 64), count="entering")
    methods.pop("none")
    assert methods and all(label.endswith("-entering") for label in methods)
    assert {"visionzip@64-entering", "divprune@128-entering"} <= set(methods)
    assert not any(label.startswith(("fastv@", "v2drop-l2@")) for label in methods)  # in-LLM: every token enters
    for label, method in methods.items():
        assert method.schedule.tokens_per_layer(12, 256)[0] == int(info[label]["budget"] / 576 * 256), label
    with pytest.raises(SystemExit) as exit_:
        method_table.main(["--budget-count", "layers"])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2 and "--budget-count: budget count must be one of average, entering, got 'layers'" in err
    )
