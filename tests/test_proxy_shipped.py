"""The bundled proxy (v2drop/assets/proxy) loads offline through the hub code path and reads the image."""

import json
from pathlib import Path

import pytest
import torch

import v2drop
from experiments.check_proxy import main as check_main
from experiments.proxy.check import (
    BAR_CONDITIONS,
    CELL_WORDINGS,
    bar_answers,
    bar_table,
    cell_lookups,
    ident_by_column_mates,
    layer_changes,
    lookup_table,
)
from experiments.proxy.train import TrainConfig
from v2drop.benchmarks import get_benchmark
from v2drop.benchmarks.digits import asked_cell
from v2drop.config import config_to_dict, load_config
from v2drop.lvlm import LOCAL_MODELS

ASSET = LOCAL_MODELS["proxy"]


@pytest.mark.parametrize("name", ["proxy", "proxy-layer0-frozen", "proxy-layer0-trained"])
def test_the_bundled_proxies_are_small_standard_llavas(name):
    """safetensors from save_pretrained, <= 50 MB for all bundled models, >= 12 decoder layers, 256 vision tokens per
    image, recipe alongside.
    """
    files = {p.name for p in LOCAL_MODELS[name].iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "train_config.json"} <= files
    assert (
        sum(p.stat().st_size for asset in LOCAL_MODELS.values() for p in asset.rglob("*") if p.is_file()) <= 50 * 2**20
    )
    lvlm = v2drop.load(name)
    assert type(lvlm.model).__name__ == "LlavaForConditionalGeneration"
    assert lvlm.depth >= 12
    sample = get_benchmark("digits").load("test", 1)[0]
    inputs = lvlm.prepare([lvlm.format_prompt(sample.question)], [list(sample.images)])
    image_id = lvlm.model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == 256


@pytest.mark.slow
def test_the_bundled_proxy_answers_from_the_image():
    """On 50 test questions: clearly above the no-image answers, and keeping the evidence beats as many random
    tokens."""
    torch.set_num_threads(2)
    lvlm = v2drop.load("proxy")
    bench = get_benchmark("digits")
    table = bar_table(lvlm, bench, bench.load("test", 50), layer=2)
    assert table["full"]["overall"] >= 0.7
    assert table["no image"]["overall"] <= table["full"]["overall"] - 0.3
    assert table["evidence"]["overall"] > table["random"]["overall"]


def test_the_shipped_proxy_was_trained_by_the_recipe_in_configs():
    """configs/proxy.yaml describes the bundled model: its resolved recipe equals the shipped train_config.json (paths
    aside).

    Both are resolved against today's TrainConfig, so a key added later with a default that leaves
    training unchanged (such as ``ident_mates`` 0) does not make the shipped recipe differ.
    """
    recipe = config_to_dict(load_config(TrainConfig, Path(__file__).parents[1] / "configs" / "proxy.yaml"))
    shipped = config_to_dict(load_config(TrainConfig, ASSET / "train_config.json"))
    recipe, shipped = (
        json.loads(json.dumps({k: v for k, v in d.items() if k not in ("output", "workdir")}))
        for d in (recipe, shipped)
    )
    assert recipe == shipped


def test_check_cli_prints_the_bars_and_writes_them(tmp_path, capsys):
    """``check_proxy`` on a few questions: every condition in the table, the verdict printed, the JSON equal to what it
    returns.
    """
    result = check_main(["--limit", "4", "--output", str(tmp_path / "bars.json")])
    out = capsys.readouterr().out
    assert list(result["table"]) == list(BAR_CONDITIONS) and result["n"] == 4 and result["model"] == "proxy"
    assert all(0.0 <= row["overall"] <= 1.0 for row in result["table"].values())
    assert out.startswith("condition") and '"validity_evidence_ge_95pct_of_full"' in out
    assert json.loads((tmp_path / "bars.json").read_text()) == json.loads(json.dumps(result))
    assert len(result["layer_changes"]) == 12 and "mean change of the vision tokens per decoder layer" in out


def test_ident_split_by_column_mates_adds_up_to_the_bar_tables_ident():
    """``ident_by_column_mates`` scores every ``ident`` question once: its two parts average to the bar table's
    full-image ``ident``.
    """
    lvlm, bench = v2drop.load("proxy"), get_benchmark("digits")
    samples = bench.load("test", 60)
    full = bar_answers(lvlm, bench, samples, conditions=("full",))["full"]
    split = ident_by_column_mates(bench, samples, full)
    ident = bar_table(lvlm, bench, samples, conditions=("full",))["full"]["ident"]
    n = sum(v["n"] for v in split.values())
    assert n == sum(s.family == "ident" for s in samples) == 12 and all(v["n"] for v in split.values())
    assert sum(v["accuracy"] * v["n"] for v in split.values()) / n == pytest.approx(ident)
    assert asked_cell("What digit is in the lower row, left column?") == (2, 1)
    for sample in samples:
        if sample.family == "ident":
            row, col = asked_cell(sample.question)
            objects = bench.scene("test", int(sample.id.split("-")[1]))[1]
            assert sample.answer == next((str(o.label) for o in objects if (o.row, o.col) == (row, col)), "none")


def test_layer_changes_are_the_mean_norm_of_each_layers_update_to_the_vision_tokens():
    """``layer_changes`` equals ‖h_{l+1} − h_l‖ averaged over the vision tokens, read from transformers' own hidden
    states.
    """
    lvlm = v2drop.load("proxy")
    samples = get_benchmark("digits").load("test", 2)
    per_token = []
    for sample in samples:
        inputs = lvlm.prepare([lvlm.format_prompt(sample.question)], [list(sample.images)])
        with torch.no_grad():
            hidden = lvlm.model(**inputs, output_hidden_states=True).hidden_states
        vision = inputs["input_ids"][0] == lvlm.model.config.image_token_id
        per_token.append(torch.stack([(hidden[l + 1][0] - hidden[l][0])[vision].norm(dim=-1) for l in range(12)]))
    expected = torch.cat(per_token, dim=1).mean(dim=1)
    assert torch.allclose(torch.tensor(layer_changes(lvlm, samples)), expected, rtol=1e-5)


def test_the_shipped_proxy_trains_every_decoder_layer():
    """Every decoder layer of the shipped proxy moves the vision tokens by the same order as the others (no untrained
    layer).
    """
    changes = layer_changes(v2drop.load("proxy"), get_benchmark("digits").load("test", 10))
    median = sorted(changes)[len(changes) // 2]
    assert min(changes) >= median / 10, changes
    recipe = json.loads(
        (ASSET / "train_config.json").read_text()
    )  # and its recipe's last image stage trains the frozen layers
    settle = recipe["settle"]
    assert recipe["frozen_decoder_layers"] == 0 or (
        settle["steps"] > 0 and not settle["frozen"] and settle["frozen_lr"] > 0
    )


def test_check_cli_reports_a_missing_model_in_one_line_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        check_main(["--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "nowhere" in err


def test_cell_lookups_ask_every_digit_in_every_wording_and_the_question_as_evaluated():
    """One record per digit and wording; the ``question`` wording is the evaluation prompt, so its answer is right
    exactly when the bar's ``full`` answer is.
    """
    torch.set_num_threads(2)
    lvlm, bench = v2drop.load("proxy"), get_benchmark("digits")
    records = cell_lookups(lvlm, bench, "test", 10)
    scenes = [bench.scene("test", s)[1] for s in range(10)]
    assert len(records) == len(CELL_WORDINGS) * sum(len(objects) for objects in scenes)
    for r in records:
        assert r["mate"] == any(o.col == r["col"] and o.row != r["row"] for o in scenes[r["scene"]])
    question = {(r["scene"], r["row"], r["col"]): r["correct"] for r in records if r["wording"] == "question"}
    samples = [s for scene in range(10) for s in bench.scene_samples("test", scene) if s.family == "ident"]
    full = bar_answers(lvlm, bench, samples, conditions=("full",))["full"]
    compared = 0
    for sample, ok in zip(samples, full):
        cell = (int(sample.id.split("-")[1]), *asked_cell(sample.question))
        if cell in question:  # an occupied cell (an empty one answers `none`, which the lookups do not ask)
            assert question[cell] == ok
            compared += 1
    assert compared >= 3
    table = lookup_table(records)
    assert set(table) == set(CELL_WORDINGS)
    assert sum(v["n"] for v in table["cells"].values()) == len(question)
